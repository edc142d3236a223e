"""Build the CPU demo: a synthetic task, a byte-level BPE tokenizer and a tiny Qwen2 base model.

    python data/demo.py --out data/demo            # seconds: the task files + the shipped base model (seed 0)
    python data/demo.py --out data/demo --rebuild  # pretrain the base model here (~2.5 min), deterministic for --seed

The base model of seed 0 ships with the repo (data/demo_model/, 660 KB), so a newcomer's first run does not
wait for pretraining; `--rebuild` makes it again and says whether its weights are bit-identical to the shipped
ones (they were on the machine that built them; floating-point kernels may differ on other CPUs).

Writes  data/demo/train.jsonl     {"problem", "answer"}  the RL prompts (18,088 problems)
        data/demo/heldout.jsonl   512 problems never seen in pretraining or RL, for the accuracy figure
        data/demo/model/          HF directory (config, safetensors, tokenizer) for transformers and vLLM

The task: one-digit word problems ("Ann has 7 coins and gives away 3. How many coins does Ann have now?"),
rendered with the qwen_math template, graded by grader.py. The pretraining corpus answers each question in
one of two styles, chosen by a coin flip:
  careful: "7 - 3 = 4. The answer is \\boxed{4}."   (the arithmetic written out, right when the model is),
  guess:   "The answer is \\boxed{5}."              (always off by 1 to 3: a bad habit).
So the base model writes the careful style about half of the time, and RL has something real to learn:
the first response token chooses the style, and the reward favours the careful one.

The model: Qwen2, hidden 64, 2 layers, head_dim 32 (vLLM's CPU attention rejects 16), 2,048 positions,
~0.16M parameters, 400 pretraining steps of 128 documents.
Held-out accuracy, defined once and used everywhere (train.py's evaluation, this script): the mean qwen_math
reward of 8 samples at temperature 1 per problem on heldout.jsonl (eval.evaluate).
Measured here (seed 0, 1 torch thread, 2-core machine, 2026-12-01): built in 156 s (the shipped model);
train.py measures 39.8 % held-out accuracy before RL. (The build of 2026-11-22 measured 48.8 %: same code,
another machine's kernels, another model.)
"""
import argparse
import json
import os
import random
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from templates import render  # noqa: E402

SHIPPED = os.path.join(REPO, "data", "demo_model")  # the seed-0 base model, built by --rebuild, committed
SHIPPED_SHA256 = "2be5575d42971e52e376704a7facdef05964ba77d8093ae7b1f8c2e096aae30b"  # its model.safetensors

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split: single digits, words, punctuation runs, whitespace (a published regex).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# A little real LaTeX so that MATH text tokenizes into sensible pieces, not only bytes.
LATEX_SAMPLE = (r"Let $x$ be a real number such that $\frac{a}{b} = \sqrt{2}$. Find $\dfrac{x^2+1}{x-1}$, "
                r"$\left(\pi, \infty\right]$, $\sin \theta \cdot \cos \theta \le 3\%$ and $\boxed{\text{(A)}}$.")


NAMES = ["Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivan", "Jo", "Kim", "Leo"]
THINGS = ["apples", "books", "coins", "cards", "eggs", "pens", "shells", "stamps", "toys", "cups"]


def split_problems(seed: int, n_heldout: int = 512):
    """Every (name, thing, a, op, b) problem, shuffled by seed; the first n_heldout are held out."""
    ops = [(a, "+", b) for a in range(10) for b in range(10)] + [(a, "-", b) for a in range(10) for b in range(a + 1)]
    probs = [(n, t, a, op, b) for n in NAMES for t in THINGS for a, op, b in ops]
    random.Random(seed).shuffle(probs)
    return probs[n_heldout:], probs[:n_heldout]


def question(p) -> str:
    name, thing, a, op, b = p
    change = f"gets {b} more" if op == "+" else f"gives away {b}"
    return f"{name} has {a} {thing} and {change}. How many {thing} does {name} have now?"


def solution(p) -> int:
    _, _, a, op, b = p
    return a + b if op == "+" else a - b


def careful_answer(p) -> str:
    _, _, a, op, b = p
    return f"{a} {op} {b} = {solution(p)}. The answer is \\boxed{{{solution(p)}}}."


def guess_answer(p, rng: random.Random) -> str:
    # Never right: the guess style is a wrong habit that RL should unlearn.
    s = solution(p) + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if solution(p) + d >= 0])
    return f"The answer is \\boxed{{{s}}}."


def corpus(probs, seed: int, careful: float = 0.5):
    """Pretraining documents: prompt + one answer in a random style + <|im_end|>."""
    rng = random.Random(seed + 1)
    for p in probs:
        ans = careful_answer(p) if rng.random() < careful else guess_answer(p, rng)
        yield render("qwen_math", question(p)) + ans + "<|im_end|>"


def build_tokenizer(texts, vocab_size: int = 512):
    """Byte-level BPE (any text encodes, MATH included) with Qwen's special tokens and digit splitting."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    # Qwen2.5 base models: eos = pad = <|endoftext|>; <|im_end|> ends a chat turn.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def tiny_config(tokenizer, hidden: int = 64, layers: int = 4):
    """A Qwen2 of ~0.3M parameters: head_dim 32 (vLLM's CPU attention rejects 16), 2,048 positions."""
    from transformers import Qwen2Config
    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32, head_dim=32,
        max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")],
        torch_dtype="float32")


def save_model(model, tokenizer, out: str):
    """HF directory that both transformers and vLLM load: config.json, model.safetensors, tokenizer files."""
    from transformers import GenerationConfig
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out)


def random_model(out: str, seed: int = 0, hidden: int = 64, layers: int = 2, texts=None):
    """A randomly initialised tiny model + tokenizer: what the tests use when learning is beside the point."""
    from transformers import Qwen2ForCausalLM
    texts = list(texts) if texts is not None else list(corpus(split_problems(seed)[0][:2000], seed))
    tok = build_tokenizer(texts + [LATEX_SAMPLE])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(tok, hidden, layers))
    save_model(model, tok, out)
    return out


def pretrain(model, tokenizer, docs, steps: int, batch: int, lr: float, seed: int, log_every: int = 100):
    g = torch.Generator().manual_seed(seed)
    ids = [tokenizer(d)["input_ids"] for d in docs]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.1, 1 - s / steps))
    pad = tokenizer.pad_token_id
    model.train()
    for step in range(steps):
        rows = [ids[i] for i in torch.randint(len(ids), (batch,), generator=g).tolist()]
        T = max(map(len, rows))
        x = torch.full((batch, T), pad)                        # (B, T)
        mask = torch.zeros(batch, T, dtype=torch.bool)          # (B, T)
        for i, r in enumerate(rows):
            x[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = True
        logits = model(input_ids=x, attention_mask=mask.long()).logits[:, :-1]   # (B, T-1, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                                 reduction="none")
        loss = (loss * mask[:, 1:].reshape(-1)).sum() / mask[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"pretrain step {step:4d} | loss {loss.item():.4f}", flush=True)


def heldout_accuracy(model_dir: str, rows, seed: int, engine: str = "auto"):
    """THE held-out accuracy of the demo, as train.py measures it: mean qwen_math reward of 8 samples at
    temperature 1 per problem (eval.evaluate); the greedy accuracy beside it."""
    from eval import evaluate
    from grader import GraderPool
    from rollout import make_engine
    with GraderPool(workers=1) as pool:  # before the engine: forking after vLLM starts can hang
        eng = make_engine(engine, model_dir, seed=seed, max_model_len=256)
        kw = dict(top_p=1.0, max_new_tokens=64, seed=seed)
        sampled, _ = evaluate(eng, pool, rows, "qwen_math", n=8, temperature=1.0, **kw)
        greedy, _ = evaluate(eng, pool, rows, "qwen_math", n=1, temperature=0.0, **kw)
    return sampled["accuracy"], greedy["accuracy"]


def sha256(path: str) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_task(out: str, seed: int):
    """train.jsonl and heldout.jsonl under out (seconds)."""
    os.makedirs(out, exist_ok=True)
    for name, probs in zip(("train", "heldout"), split_problems(seed)):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            for p in probs:
                f.write(json.dumps({"problem": question(p), "answer": str(solution(p))}) + "\n")


def shipped(out: str) -> str:
    """The task files and a copy of the shipped seed-0 base model under out; return the model directory."""
    import shutil
    if sha256(os.path.join(SHIPPED, "model.safetensors")) != SHIPPED_SHA256:
        sys.exit(f"data/demo.py: {SHIPPED}/model.safetensors is not the shipped model (sha256 differs); "
                 "restore it with git, or use --rebuild")
    write_task(out, seed=0)
    shutil.copytree(SHIPPED, os.path.join(out, "model"), dirs_exist_ok=True)
    return os.path.join(out, "model")


def build(out: str, seed: int = 0, steps: int = 400, batch: int = 128, lr: float = 1e-2, hidden: int = 64,
          layers: int = 2, log_every: int = 50, make_corpus=corpus) -> str:
    """Write train.jsonl, heldout.jsonl and a freshly pretrained model/ under out; return the model directory.
    make_corpus(problems, seed) yields the pretraining documents (data/demo_length.py brings its own)."""
    from transformers import Qwen2ForCausalLM
    write_task(out, seed)
    train, heldout = split_problems(seed)
    docs = list(make_corpus(train, seed))
    tok = build_tokenizer(docs + [LATEX_SAMPLE])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(tok, hidden, layers))
    print(f"tokenizer: {len(tok)} tokens | model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters | {len(train)} train / {len(heldout)} held-out problems", flush=True)
    pretrain(model, tok, docs, steps, batch, lr, seed, log_every)
    save_model(model.eval(), tok, os.path.join(out, "model"))
    return os.path.join(out, "model")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "data", "demo"), help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, the corpus and the model init")
    p.add_argument("--steps", type=int, default=400, help="pretraining steps")
    p.add_argument("--batch", type=int, default=128, help="documents per pretraining step")
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads: fixed, so the build is deterministic (and 1 is fastest for a model this small)")
    p.add_argument("--rebuild", action="store_true", help="pretrain the base model here instead of copying the "
                   "shipped one (always, for a seed other than 0)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out accuracy measurement")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.rebuild or args.seed != 0:
        model_dir = build(args.out, args.seed, args.steps, args.batch, args.lr)
        same = sha256(os.path.join(model_dir, "model.safetensors")) == SHIPPED_SHA256
        print(f"built {model_dir} in {time.time() - t0:.0f}s" + (f"; bit-identical to the shipped model: {same}"
                                                                 if args.seed == 0 else ""), flush=True)
    else:
        model_dir = shipped(args.out)
        print(f"wrote the task files and the shipped base model to {args.out}", flush=True)
    if not args.no_eval:
        with open(os.path.join(args.out, "heldout.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        acc, greedy = heldout_accuracy(model_dir, rows, args.seed)
        print(f"held-out accuracy (8 samples at T=1, {len(rows)} problems): {100 * acc:.1f}% | greedy "
              f"{100 * greedy:.1f}% | total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
