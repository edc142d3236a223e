"""Build the CPU demo: a synthetic task, a byte-level BPE tokenizer and a tiny Qwen2 base model.

    python data/demo.py --out data/demo          # ~2-3 min on 2 cores, deterministic for --seed

Writes  data/demo/train.jsonl     {"problem", "answer"}  two-number additions, the RL prompts
        data/demo/heldout.jsonl   512 problems never seen in pretraining or RL, for the accuracy figure
        data/demo/model/          HF directory (config, safetensors, tokenizer) for transformers and vLLM

The task is "What is a + b?" (0 <= a, b <= 99) in the qwen_math template. The pretraining corpus answers
each question in one of two styles, chosen by a coin flip:
  careful: column addition written out digit by digit, then the \\boxed{} sum (almost always right),
  guess:   "The answer is \\boxed{s}." where s is usually off by a small amount.
So the base model samples a careful answer about half the time, and its held-out accuracy (mean reward of
8 samples at temperature 1 on heldout.jsonl) sits in the middle of the range. RL has something real to
learn: the first response token decides the style, and reward favours the careful one, like the longer
reasoning R1-Zero training discovers at scale.

Measured here (seed 0, 2 cores): see MEASURED below, printed by this script at the end of every build.
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

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split: single digits, words, punctuation runs, whitespace (a published regex).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# A little real LaTeX so that MATH text tokenizes into sensible pieces, not only bytes.
LATEX_SAMPLE = (r"Let $x$ be a real number such that $\frac{a}{b} = \sqrt{2}$. Find $\dfrac{x^2+1}{x-1}$, "
                r"$\left(\pi, \infty\right]$, $\sin \theta \cdot \cos \theta \le 3\%$ and $\boxed{\text{(A)}}$.")
MEASURED = "seed 0: see README (build time and held-out accuracy are printed by every build)"


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
    name, thing, a, op, b = p
    verb = f"gets {b} more" if op == "+" else f"gives away {b}"
    return (f"{name} starts with {a} {thing}. {name} {verb}, so {a} {op} {b} = {solution(p)}. "
            f"The answer is \\boxed{{{solution(p)}}}.")


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


@torch.no_grad()
def sample_accuracy(model, tokenizer, pairs, n: int, temperature: float, max_new_tokens: int, seed: int):
    """Mean reward of n samples per problem (temperature 0 = greedy, n must be 1) with the qwen_math reward."""
    from grader import reward
    prompts = [render("qwen_math", question(p)) for p in pairs]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    out = model.generate(**enc, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                         top_p=1.0, top_k=0, num_return_sequences=n, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    golds = [str(solution(p)) for p in pairs for _ in range(n)]
    return sum(reward(t, g, "qwen_math") for t, g in zip(texts, golds)) / len(texts)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "data", "demo"), help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, the corpus and the model init")
    p.add_argument("--steps", type=int, default=600, help="pretraining steps")
    p.add_argument("--batch", type=int, default=64, help="documents per pretraining step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed, so the build is deterministic)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    from transformers import Qwen2ForCausalLM
    train, heldout = split_problems(args.seed)
    os.makedirs(args.out, exist_ok=True)
    for name, pairs in [("train", train), ("heldout", heldout)]:
        with open(os.path.join(args.out, f"{name}.jsonl"), "w") as f:
            for p in pairs:
                f.write(json.dumps({"problem": question(p), "answer": str(solution(p))}) + "\n")
    docs = list(corpus(train, args.seed))
    tok = build_tokenizer(docs + [LATEX_SAMPLE])
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(tiny_config(tok))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {len(tok)} tokens | model: {n_params / 1e6:.2f}M parameters", flush=True)
    pretrain(model, tok, docs, args.steps, args.batch, args.lr, args.seed)
    model.eval()
    save_model(model, tok, os.path.join(args.out, "model"))
    t_build = time.time() - t0
    acc = sample_accuracy(model, tok, heldout, n=8, temperature=1.0, max_new_tokens=64, seed=args.seed)
    greedy = sample_accuracy(model, tok, heldout, n=1, temperature=0.0, max_new_tokens=64, seed=args.seed)
    print(f"built in {t_build:.0f}s | held-out accuracy (8 samples, T=1, {len(heldout)} problems) "
          f"{100 * acc:.1f}% | greedy {100 * greedy:.1f}% | total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
