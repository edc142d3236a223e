"""`bench.py grader`: our grader's accuracy against Math-Verify's on generated and hand-labelled cases,
then its speed and latency."""
from benchmarks.common import BENCH_PYTHON

GRADER_DATA = "../shared/data/train/math12k.jsonl"
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

    Returns {"correct": [...], "wrong": [...]}, items {"kind", "gold", "pred", "response", "label"}. The
    response is the row's own reference solution with its last \\boxed{gold} replaced by \\boxed{pred}."""
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
        if ("\\sqrt" in g or "\\pi" in g) and not re.search(
                r"[a-zA-Z](?<!\\[a-z]{3})(?<!\\[a-z]{4})",
                g.replace("\\sqrt", "").replace("\\pi", "").replace("\\frac", "").replace("\\dfrac", "")):
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
    if not os.path.exists(BENCH_PYTHON):
        return None
    lines = "".join(json.dumps([it["response"], [it["gold"]] if isinstance(it["gold"], str) else it["gold"]])
                    + "\n" for it in items)
    done = subprocess.run([BENCH_PYTHON, "-c", MV_SCRIPT], input=lines, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def _ours(it: dict) -> bool:
    import grader
    if it.get("template", "qwen_math") == "grade":
        return grader.grade(it["response"], it["gold"])
    return grader.reward(it["response"], it["gold"], it.get("template", "qwen_math")) == 1.0


def bench_grader(argv):
    """Accuracy on the generated sets and the hand-labelled cases (ours vs Math-Verify), then speed and
    latency."""
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
    p.add_argument("--mv-pairs", type=int, default=2000,
                   help="math12k pairs also graded by Math-Verify (slow)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="accuracy per hand-labelled rule, and our misses")
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
    if not os.path.exists(BENCH_PYTHON):
        print(f"Math-Verify column skipped: create its venv with `python -m venv .venv-bench && "
              f"{BENCH_PYTHON.replace('python', 'pip')} install math-verify`")
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
    # worker counts interleaved; a fresh pool per run: cold caches, as for new responses
    for _ in range(args.runs):

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
