"""`bench.py step`: one update step, chunked log-probs (loss.token_logprobs) vs a naive full log_softmax."""
import sys

from benchmarks.common import BENCH

STEP_VARIANTS = ("naive", "chunked")  # full (B, T, V) log_softmax  vs  loss.token_logprobs


def step_once(variant: str, args) -> dict:
    """One update step (log-probs + Dr. GRPO loss + backward) in THIS process; returns its seconds and peak
    RSS."""
    import resource
    import time

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from loss import drgrpo_loss, token_logprobs
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                      num_key_value_heads=1, head_dim=32, max_position_embeddings=args.seq,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))                   # (B, T)
    attn = torch.ones_like(ids)                                                  # (B, T)
    mask = torch.ones_like(ids, dtype=torch.bool)  # every position is a target: the worst case for chunking
    adv = torch.randn(args.batch)                                                # (B,)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if variant == "chunked":
        logp, entropy = token_logprobs(model, ids, attn, mask, args.temperature, args.chunk)  # (B, T)
    else:
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # (B, T, V)
        logprobs = (logits.float() / args.temperature).log_softmax(-1)           # (B, T, V)
        del logits
        logp = torch.zeros(ids.shape)                                            # (B, T)
        logp[:, 1:] = logprobs[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
        with torch.no_grad():
            entropy = torch.zeros(ids.shape)                                     # (B, T)
            entropy[:, 1:] = -(logprobs[:, :-1].exp() * logprobs[:, :-1]).sum(-1)
    seq = torch.arange(args.batch)[:, None].expand(ids.shape)  # (B, T) response of each token
    loss, _ = drgrpo_loss(logp, logp.detach(), adv, seq, mask, args.batch, args.seq)
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mib": rss_before, "loss": loss.item(), "entropy": float(entropy[:, 1:].mean())}


def bench_step(argv):
    """Chunked vs naive log-probs for one update step; each measurement in a fresh subprocess (ru_maxrss)."""
    import argparse
    import json
    import statistics
    import subprocess
    p = argparse.ArgumentParser(prog="bench.py step", description=bench_step.__doc__)
    p.add_argument("--runs", type=int, default=5, help="subprocesses per variant (median reported)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--vocab", type=int, default=151936, help="Qwen2.5's vocabulary size")
    p.add_argument("--hidden", type=int, default=64, help="tiny model width (head_dim 32)")
    p.add_argument("--layers", type=int, default=2, help="tiny model depth")
    p.add_argument("--chunk", type=int, default=1024, help="token_logprobs chunk (its default)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampler temperature (paper: 1.0)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    p.add_argument("--worker", choices=STEP_VARIANTS, help=argparse.SUPPRESS)  # internal: one measurement
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(step_once(args.worker, args)), flush=True)
        return
    res = {v: [] for v in STEP_VARIANTS}
    for r in range(args.runs):
        for v in (STEP_VARIANTS if r % 2 == 0 else STEP_VARIANTS[::-1]):  # interleaved, alternating order
            out = subprocess.run([sys.executable, BENCH, "step", "--worker", v] + argv,
                                 capture_output=True, text=True, check=True)
            res[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  run {r} {v:8s} {res[v][-1]['seconds']:6.2f}s  peak RSS "
                  f"{res[v][-1]['rss_mib']:7.0f} MiB", flush=True)
    tokens = args.batch * args.seq
    med = {v: {k: statistics.median(x[k] for x in res[v]) for k in ("seconds", "rss_mib", "rss_before_mib")}
           for v in STEP_VARIANTS}
    print(f"\none update step, {args.batch} x {args.seq} tokens, vocab {args.vocab}, hidden {args.hidden}, "
          f"{args.layers} layers, {args.threads} threads, median of {args.runs} fresh processes per variant")
    print(f"{'variant':8s} | {'tokens/s':>9s} | {'step s':>7s} | {'peak RSS MiB':>12s} | "
          f"{'RSS before step':>15s}")
    for v in STEP_VARIANTS:
        m = med[v]
        print(f"{v:8s} | {tokens / m['seconds']:9.0f} | {m['seconds']:7.2f} | {m['rss_mib']:12.0f} | "
              f"{m['rss_before_mib']:15.0f}")
    t_ratio = med["chunked"]["seconds"] / med["naive"]["seconds"]
    m_ratio = med["chunked"]["rss_mib"] / med["naive"]["rss_mib"]
    print(f"chunked / naive: time {t_ratio:.2f}x (target <= 1.15x), peak memory {m_ratio:.2f}x "
          f"(target <= 0.33x)")

