"""Speed and memory figures, one subcommand per concern (like nanoGPT's bench.py).

    python bench.py grader     # accuracy vs Math-Verify, responses/s, latency percentiles
    python bench.py step       # one update step: chunked log-probs vs naive full log_softmax
    python bench.py rollout    # tokens/s of our vLLM engine vs raw vLLM vs the transformers fallback
    python bench.py pack       # one update step, padded vs packed: real/computed tokens, time ratio
    python bench.py train      # seconds per RL step on a fixed CPU workload, and its split

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
