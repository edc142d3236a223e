"""build_policy (meta-device build, FSDP2 shards, rank 0 reads and broadcasts) gives the model from_pretrained gives.

    torchrun --standalone --nproc_per_node 2 tests/test_model.py DIR...    # each rank prints OK lines

pytest builds the model directories and runs this file under real torchrun with 2 gloo ranks. Each rank builds the
policy with build_policy and a plain from_pretrained copy, and compares their full logits on one packed row, then
again after one SGD step on both (a tied lm_head that came apart would train differently from the embedding).
The variants: the shipped demo model (tied embeddings), an untied Qwen2 saved in several files with an index, one
with a non-default rotary base (rope_theta: a wrongly initialised inv_freq shows) and a bf16 checkpoint written by
checkpoint.save_hf (the lm_head dropped, as the trainer saves a tied model). World sizes 2 and 1.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
VARIANTS = ("demo_tied", "untied", "rope_theta", "save_hf_bf16")


def tiny_qwen2(out: str, tied: bool, rope_theta: float = 10000.0, seed: int = 0, shard: str = "5GB") -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                      tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).save_pretrained(out, max_shard_size=shard)  # a small shard size: an index + files
    return out


def save_hf_copy(src: str, out: str) -> str:
    """The demo model as the trainer exports it: checkpoint.save_hf, bf16, tied lm_head dropped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import checkpoint
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    os.makedirs(out)
    checkpoint.save_hf(dict(m.state_dict()), m.config, AutoTokenizer.from_pretrained(src), out, torch.bfloat16)
    return out


def check(path: str, rank: int, world: int) -> str:
    """One variant on this rank: logits before and after one SGD step, build_policy vs from_pretrained."""
    from transformers import AutoModelForCausalLM

    import model as M
    policy = M.build_policy(path, torch.device("cpu"), seed=0, grad_checkpointing=False)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="packed_sdpa")
    tied = ref.config.tie_word_embeddings
    assert (policy.lm_head.weight is policy.model.embed_tokens.weight) == tied, "tie state differs"
    vocab = ref.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, 40), generator=g)                        # (1, T): two sequences, packed
    pos = torch.cat([torch.arange(25), torch.arange(15)])[None]                # (1, T)
    target = torch.randint(0, vocab, (1, 40), generator=g)                     # (1, T)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (policy, ref)]
    diffs = []
    for step in range(2):
        logits = [m(input_ids=ids, position_ids=pos, use_cache=False).logits for m in (policy, ref)]  # (1, T, V)
        diffs.append((logits[0] - logits[1]).abs().max().item())
        if step == 0:  # FSDP sums gradients over ranks (divide factor 1): the reference loss counts world times
            for lg, scale, opt in zip(logits, (1, world), opts):
                (scale * torch.nn.functional.cross_entropy(lg[0], target[0])).backward()
                opt.step()
    assert diffs[0] <= 1e-6 and diffs[1] <= 1e-5, f"max |logits diff| before / after a step: {diffs}"
    return f"OK rank={rank} {os.path.basename(path)} tied={tied} diff={diffs[0]:.1e}/{diffs[1]:.1e}"


def main(paths):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for path in paths:
        print(check(path, rank, world), flush=True)
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 1], ids=lambda n: f"world{n}")
def torchrun_out(request, demo_model_dir, tmp_path_factory):
    """One torchrun (1 or 2 gloo ranks) over every variant: (world, its stdout)."""
    tmp = tmp_path_factory.mktemp("build_policy")
    dirs = [demo_model_dir, tiny_qwen2(str(tmp / "untied"), tied=False, shard="40KB"),
            tiny_qwen2(str(tmp / "rope_theta"), tied=True, rope_theta=1234.5, seed=1),
            save_hf_copy(demo_model_dir, str(tmp / "save_hf_bf16"))]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(request.param), os.path.abspath(__file__), *dirs],
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return request.param, p.stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_build_policy_logits_equal_from_pretrained(torchrun_out, variant):
    world, out = torchrun_out
    name = "model" if variant == "demo_tied" else variant
    assert len(re.findall(rf"OK rank=\d {name} tied=", out)) == world, out  # one per rank


if __name__ == "__main__":
    main(sys.argv[1:])


def test_an_architecture_without_model_layers_is_one_line(tmp_path):
    """GPT-2 keeps its blocks at transformer.h: build_policy stops on the meta device, before any process
    group, with one line naming the model, instead of an AttributeError from the FSDP2 wrap."""
    import model
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0).save_pretrained(
        tmp_path)
    with pytest.raises(SystemExit) as e:
        model.build_policy(str(tmp_path), torch.device("cpu"), seed=0, grad_checkpointing=False)
    assert str(e.value) == (f"train.py: --model {tmp_path}: GPT2LMHeadModel keeps no decoder layers at "
                            "model.model.layers to shard")
