"""`bench.py pack`: one update step on 2 ranks, padded vs packed: real/computed tokens and the time ratio."""
import math

from benchmarks.common import BENCH, torchrun

PACK_VARIANTS = ("padded", "packed")


def pack_lengths(n: int, max_new: int, seed: int = 0) -> list:
    """(prompt, response) token counts of n responses, long-tailed like an R1-Zero run on Qwen2.5-Math:
    response lengths lognormal with median 200 and sigma 0.9 (mean ~300), cut at max_new (a few percent hit
    it); prompts uniform in 40..160 tokens (MATH problems under the qwen_math template)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    resp = (torch.randn(n, generator=g) * 0.9 + math.log(200)).exp().round().clamp(1, max_new).long()
    prompt = torch.randint(40, 161, (n,), generator=g)
    return list(zip(prompt.tolist(), resp.tolist()))


def pack_worker(args):
    """One rank of `bench.py pack` (under torchrun): the same optimizer step, padded (train.py before packing:
    each rank its own responses, micro-batches of 8 in random order, each padded to its longest, no mask on
    CPU) and packed (train.py now: token-balanced ranks, padding-free rows, one causal sdpa call per
    sequence), interleaved; rank 0 prints the figures."""
    import statistics
    import time

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import loss as L
    import model as M
    import packing
    import train
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    M.register_packed_attention()
    n_params = sum(p.numel() for p in model.parameters())
    for m in [*model.model.layers, model]:
        fully_shard(m)
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    g = torch.Generator().manual_seed(1)
    seqs = [{"ids": torch.randint(1, 4096, (p + r,), generator=g), "prompt": p, "keep": True,
             "adv": float(torch.randn(1, generator=g)), "old": -torch.rand(r, generator=g)}
            for p, r in pack_lengths(args.responses, args.max_new)]
    N = len(seqs)  # one optimizer minibatch: every response

    def rows_padded():  # this rank's responses (it generated them), 8 at a time in a seeded order, padded
        mine = list(range(rank, N, world))
        perm = torch.randperm(len(mine), generator=torch.Generator().manual_seed(0))
        order = [mine[i] for i in perm.tolist()]
        for k in range(0, len(order), args.micro_batch):
            idx = order[k:k + args.micro_batch]
            T = max(len(seqs[i]["ids"]) for i in idx)
            ids = torch.zeros(len(idx), T, dtype=torch.long)                     # (b, T)
            for j, i in enumerate(idx):
                ids[j, :len(seqs[i]["ids"])] = seqs[i]["ids"]
            pos = torch.arange(T)[None]                                          # (1, T)
            resp = (pos >= torch.tensor([seqs[i]["prompt"] for i in idx])[:, None]) & \
                (pos < torch.tensor([len(seqs[i]["ids"]) for i in idx])[:, None])  # (b, T)
            old = torch.zeros(ids.shape)                                         # (b, T)
            old[resp] = torch.cat([seqs[i]["old"] for i in idx])
            yield ids, None, resp, torch.arange(len(idx))[:, None].expand(ids.shape), old, \
                torch.tensor([seqs[i]["adv"] for i in idx])

    plan = packing.balance({i: len(s["ids"]) for i, s in enumerate(seqs)}, world, args.max_tokens)

    def rows_packed():
        for step in plan:
            row = packing.packed_row(seqs, step[rank], pad_id=0)
            yield row["ids"], row["pos"], row["resp"], row["seq"], \
                packing.at_responses(row, [seqs[i]["old"] for i in row["idx"]]), row["adv"]

    def step(variant):
        # packed: train.py's attention for packed rows on CPU (one causal sdpa call per sequence); padded:
        # sdpa's causal path, no mask, as train.py ran it before
        model.set_attn_implementation("packed_sdpa" if variant == "packed" else "sdpa")
        t0 = time.perf_counter()
        for ids, pos, resp, seq, old, adv in (rows_packed() if variant == "packed" else rows_padded()):
            logp, _ = L.token_logprobs(model, ids, None, resp, 1.0, position_ids=pos)
            loss, _ = L.drgrpo_loss(logp, old, adv, seq, resp, N, args.max_new)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    # computed tokens: per micro-step, world x the busiest rank's (rows x padded length), from every rank's
    # view
    local = [int(ids.numel()) for ids, *_ in rows_padded()]
    per_rank = train.gather_all(local, world)
    computed = {"padded": sum(world * max(r[k] for r in per_rank) for k in range(len(local))),
                "packed": sum(world * max(sum(len(seqs[i]["ids"]) for i in row) for row in s) for s in plan)}
    real = sum(len(s["ids"]) for s in seqs)
    times = {v: [] for v in PACK_VARIANTS}
    step("packed"), step("padded")  # warm-up
    for r in range(args.runs):
        for v in (PACK_VARIANTS if r % 2 == 0 else PACK_VARIANTS[::-1]):
            dist.barrier()
            times[v].append(step(v))
    # attention's share of each step: one more profiled step per variant (forward + backward kernels)
    share = {}
    for v in PACK_VARIANTS:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            total = step(v)
        attn = sum(e.self_cpu_time_total for e in prof.key_averages()
                   if "scaled_dot_product" in e.key or "flash_attention" in e.key
                   or "_efficient_attention" in e.key)
        share[v] = attn / 1e6 / total
    if rank == 0:
        med = {v: statistics.median(times[v]) for v in PACK_VARIANTS}
        ratio = statistics.median(p / q for p, q in zip(times["packed"], times["padded"]))
        eff = {v: real / computed[v] for v in PACK_VARIANTS}
        resp = [r for _, r in pack_lengths(args.responses, args.max_new)]
        print(f"pack: one optimizer step (log-probs, Dr. GRPO loss, backward, AdamW), {world} ranks, FSDP2 "
              f"over gloo, random Qwen2 {n_params / 1e6:.1f}M params (hidden 256, 6 layers, head_dim 32)")
        print(f"  {args.responses} responses, lognormal lengths (median 200, sigma 0.9, max {args.max_new}): "
              f"mean {sum(resp) / len(resp):.0f}, {sum(r == args.max_new for r in resp)} at the cap; "
              f"prompts 40-160")
        print(f"  {'variant':7s} | {'real/computed tokens':>20s} | "
              f"{'step s (median of %d)' % args.runs:>21s} | attention share of step")
        for v, how in (("padded", f"micro-batch {args.micro_batch}"),
                       ("packed", f"{args.max_tokens} tokens/row")):
            print(f"  {v:7s} | {eff[v]:20.3f} | {med[v]:21.2f} | {share[v]:.2f}   ({how})")
        print(f"  packed / padded step time: {ratio:.2f}x (median of per-pair ratios; target <= 0.75); "
              f"packed efficiency target >= 0.9")
        print(f"  GPU arithmetic: flash-attention's varlen kernel computes no cross-sequence or pad "
              f"attention, so update time ~ computed tokens: packed/padded ~ "
              f"{eff['padded'] / eff['packed']:.2f}x "

              f"(on CPU too: train.py's packed attention runs one causal sdpa per sequence, no dense block "
              f"mask)")
    dist.destroy_process_group()


def bench_pack(argv):
    """Padded vs packed update step on 2 ranks under torchrun; see pack_worker."""
    import argparse
    import os
    import subprocess
    p = argparse.ArgumentParser(prog="bench.py pack", description=pack_worker.__doc__)
    p.add_argument("--responses", type=int, default=64)
    p.add_argument("--max-new", type=int, default=1024, help="generation budget: lengths are cut here")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="padded: responses per micro-batch (train.py before)")
    p.add_argument("--max-tokens", type=int, default=4096, help="packed: tokens per row")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return pack_worker(args)
    cmd = torchrun(args.nproc, BENCH, "pack", "--worker", *argv)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

