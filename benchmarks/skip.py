"""`bench.py skip`: the update's time when a share of the responses (by tokens) has advantage exactly 0,
with train.py's skip (packing.trains: such responses get no row) against computing them as before."""
import sys


def bench_skip(argv):
    """train.optimize on one FSDP2 rank (gloo), Dr. GRPO, beta 0: 128 responses in groups of 8, whole groups
    set to advantage 0 until their tokens reach each share; variants interleaved, medians reported."""
    import argparse
    import math
    import os
    import socket
    import statistics
    import time
    import warnings

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import train
    from model import register_packed_attention, setup_distributed
    from packing import balance, trains
    p = argparse.ArgumentParser(prog="bench.py skip", description=bench_skip.__doc__)
    p.add_argument("--runs", type=int, default=5, help="timed updates per variant and share (median)")
    p.add_argument("--responses", type=int, default=128, help="responses in the minibatch (G = 8)")
    p.add_argument("--max-new", type=int, default=256, help="longest response (lognormal, median / 3)")
    p.add_argument("--hidden", type=int, default=256, help="model width (head_dim 32)")
    p.add_argument("--layers", type=int, default=4, help="model depth")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per packed row")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args(argv)
    with socket.socket() as s:  # a world of one on a free port, as bench.py gpu
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    _, _, device = setup_distributed(threads=args.threads, timeout_min=10)
    register_packed_attention()
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # as train.py
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                      num_key_value_heads=1, head_dim=32, max_position_embeddings=args.max_new + 64,
                      tie_word_embeddings=True, attn_implementation="packed_sdpa")
    model = Qwen2ForCausalLM(cfg)
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    for m in model.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)
    os.environ["WORLD_SIZE"] = "1"
    run = train.Run(train.parse_config(["--beta", "0", "--max-new-tokens", str(args.max_new)]), 0, 1, device,
                    tokenizer=None, model_path="")  # optimize reads neither
    run.model = model
    run.opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0)
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lambda step: 1.0)
    g = torch.Generator().manual_seed(0)
    lengths = (torch.randn(args.responses, generator=g) * 0.9 + math.log(args.max_new / 3)).exp().round()
    lengths = lengths.clamp(1, args.max_new).long().tolist()                      # (n,) response tokens
    seqs = [{"ids": torch.randint(1, args.vocab, (40 + r,), generator=g), "prompt": 40, "keep": True,
             "sampler": torch.zeros(r), "ok": torch.zeros(r, dtype=torch.bool)} for r in lengths]
    total = sum(lengths)

    def with_zero_share(share: float) -> float:  # whole groups to advantage 0 until their tokens reach share
        zero = 0
        for k in range(0, len(seqs), 8):
            for j, s in enumerate(seqs[k:k + 8]):
                s["adv"] = 0.0 if zero < share * total else (1.0 if j % 2 else -1.0)
            zero += sum(lengths[k:k + 8]) if seqs[k]["adv"] == 0 else 0
        return sum(r for r, s in zip(lengths, seqs) if s["adv"] == 0) / total

    def update(skip: bool) -> float:
        idx = [i for i, s in enumerate(seqs) if not skip or trains(s, 0.0)]
        plans = [[(len(seqs), balance({i: len(seqs[i]["ids"]) for i in idx}, 1, args.max_tokens))]]
        t0 = time.perf_counter()
        train.optimize(run, seqs, plans, {}, {})
        return time.perf_counter() - t0

    print(f"update of {args.responses} responses ({total} response tokens, + 40-token prompts), hidden "
          f"{args.hidden}, {args.layers} layers, vocab {args.vocab}, FSDP2 on 1 rank, {args.threads} "
          f"threads; median of {args.runs}")
    print(f"{'zero-adv share (tokens)':>23s} | {'today s':>7s} | {'skip s':>7s} | {'skip / today':>12s} | "
          f"{'1 - share':>9s}")
    for want in (0.0, 0.25, 0.5, 0.75):
        share = with_zero_share(want)
        update(False)  # warm-up at this shape
        times = {False: [], True: []}
        for r in range(args.runs):
            for skip in ((False, True) if r % 2 == 0 else (True, False)):  # interleaved, alternating order
                times[skip].append(update(skip))
        today, skipped = statistics.median(times[False]), statistics.median(times[True])
        print(f"{share:23.2f} | {today:7.2f} | {skipped:7.2f} | {skipped / today:12.2f} | {1 - share:9.2f}",
              flush=True)


if __name__ == "__main__":
    bench_skip(sys.argv[1:])
