"""Score a model on the paper's five benchmarks: AIME24, AMC23, MATH500, Minerva, OlympiadBench.

    python eval.py runs/drgrpo/                 # a run dir: evaluates its latest step_* checkpoint
    python eval.py runs/drgrpo/step_000016/     # one checkpoint (its saved Config names the template)
    python eval.py /models/Qwen2.5-Math-1.5B --template r1 --benchmarks aime24,math500 --limit 50
    python eval.py --regrade out/eval.samples.jsonl   # re-score saved responses with the current grader
    torchrun --nproc_per_node 8 eval.py runs/drgrpo/  # an engine per GPU, each on every 8th problem

The paper's protocol is the default: greedy decoding, 3,000 new tokens, and the headline score is the
template's TRAINING reward (strict extraction) averaged per benchmark; avg is the unweighted mean of the
benchmark scores. The lenient column (any final-answer form) is a diagnostic, never the headline.
`evaluate` is also what train.py calls for its periodic held-out evaluation.
"""
import argparse
import json
import math
import os
import re
import time

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # as train.py: no vLLM-CPU NUMA note
import config  # noqa: E402
from data import prepare  # noqa: E402
from model import local_path  # noqa: E402
from templates import TEMPLATES, get_template, render  # noqa: E402

BENCHMARKS = ("aime24", "amc23", "math500", "minerva", "olympiadbench")
# The paper's self-reflection ("aha moment") keywords, matched as lowercase substrings.
REFLECTION_KEYWORDS = ("recheck", "rethink", "reassess", "reevaluate", "re-evaluate", "reevaluation",
                       "re-examine", "reexamine", "reconsider", "reanalyze", "double-check", "check again",
                       "think again", "verify again", "go over the steps")
DEFAULT_TEMPLATE = "qwen_math"


def is_reflective(text: str) -> bool:
    return any(k in text.lower() for k in REFLECTION_KEYWORDS)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    Written as a product, 1 - prod_{i=n-c+1}^{n} (1 - k/i), so large n never forms huge binomials."""
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(n: int) -> list:
    """k in 1, 2, 4, ... up to n, plus n itself."""
    ks = [1 << j for j in range(n.bit_length()) if 1 << j <= n]
    return ks if ks[-1] == n else ks + [n]


def summarize(records: list) -> dict:
    """Benchmark-level figures from per-sample records (samples of one problem share its text)."""
    groups = {}  # problem -> its samples, in order of appearance
    for r in records:
        groups.setdefault(r["problem"], []).append(r)
    m = max(len(records), 1)
    s = {
        "n_problems": len(groups),
        "n_samples": len(records),
        "accuracy": sum(r["reward"] for r in records) / m,
        "format_rate": sum(r["extracted"] is not None for r in records) / m,
        "lenient_accuracy": sum(r["lenient"] for r in records) / m,
        "mean_length": sum(r["length"] for r in records) / m,
        "truncation_rate": sum(r["truncated"] for r in records) / m,
        "reflection_rate": sum(is_reflective(r["response"]) for r in records) / m,
        "reflection_question_rate": sum(any(is_reflective(r["response"]) for r in g) for g in groups.values())
        / max(len(groups), 1),
    }
    n = min((len(g) for g in groups.values()), default=1)
    if n > 1:  # problems with more samples than the smallest group use their first n
        for k in pass_ks(n):
            s[f"pass@{k}"] = sum(pass_at_k(n, sum(r["reward"] > 0 for r in g[:n]), k)
                                 for g in groups.values()) / len(groups)
    return s


def pass_rates(records: list, n: int) -> list:
    """Each problem's solve rate as training scores its n samples (records problem-major): the template's
    strict reward, and 0 for a truncated response."""
    return [{"benchmark": g[0]["benchmark"], "problem": g[0]["problem"], "gold": g[0]["gold"], "n": n,
             "correct": sum(r["reward"] > 0 and not r["truncated"] for r in g)}
            for g in (records[j:j + n] for j in range(0, len(records), n))]


def score(pool, responses: list, golds: list, template_name: str) -> list:
    """(reward, extracted, lenient) per response: the grader's strict template reward, its lenient grade."""
    from grader import extract_answer
    rewards = pool.rewards(responses, golds, template_name)
    lenient = pool.grades(responses, golds)
    # Extraction only scans the text (no equivalence check), so it runs here without the pool's time limit.
    return [(float(rw), extract_answer(resp, template_name) if found else None, bool(ok))
            for (rw, found), resp, ok in zip(rewards, responses, lenient)]


def regrade(pool, records: list, template_name=None) -> list:
    """Re-score saved records in place with the current grader; template: given, else the record's own."""
    by_template = {}
    for r in records:
        r["template"] = template_name or r.get("template") or DEFAULT_TEMPLATE
        by_template.setdefault(r["template"], []).append(r)
    for name, rs in by_template.items():
        if name not in TEMPLATES:  # checked here: the grader's workers would quietly score it 0
            fail(f"unknown template {name!r}; choose from {', '.join(TEMPLATES)}")
        graded = score(pool, [r["response"] for r in rs], [r["gold"] for r in rs], name)
        for r, (rw, extracted, lenient) in zip(rs, graded):
            r.update(reward=rw, extracted=extracted, lenient=lenient)
    return records


def evaluate(engine, pool, rows, template, *, n, temperature, top_p, max_new_tokens, seed, tokenizer=None,
             progress=False, ids=None):
    """Generate n responses per row ({"problem", "answer"[, "benchmark"]}) and grade them. ids: the rows'
    places in the whole set (default 0, 1, ...), which seed their sampling: a rank's share samples as a whole.

    Returns (summary, records): `summarize`'s + generate_s, records one dict per sample, problem-major."""
    t = get_template(template) if isinstance(template, str) else template
    prompts = [render(t.name, row["problem"], tokenizer) for row in rows]
    # One seed per request, from the run seed and the row's index: the same rows sample the same way however
    # the engine batches them or was restarted (an engine-level seed would not survive a restart).
    seeds = [(seed * 1_000_003 + i) % 2**31 for i in (range(len(rows)) if ids is None else ids)]
    t0 = time.time()
    outs = engine.generate(prompts, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                           stop=tuple(t.stop), seeds=seeds, progress=progress)
    gen_s = time.time() - t0
    flat = [(row, c) for row, cs in zip(rows, outs) for c in cs]
    graded = score(pool, [c.text for _, c in flat], [row["answer"] for row, _ in flat], t.name)
    records = [{**({"benchmark": row["benchmark"]} if "benchmark" in row else {}),
                "problem": row["problem"], "gold": row["answer"], "response": c.text, "extracted": extracted,
                "reward": rw, "lenient": lenient, "length": len(c.token_ids), "truncated": bool(c.truncated),
                "template": t.name} for (row, c), (rw, extracted, lenient) in zip(flat, graded)]
    return {**summarize(records), "generate_s": gen_s}, records


# ---- command line ----------------------------------------------------------------------------------------

def fail(msg: str):  # one line, printed once under torchrun (config.fail)
    config.fail(msg, prog="eval.py")


def read_jsonl(path: str, required: tuple) -> list:
    """data/prepare.py's reader (file:line on a malformed row), with eval.py's one-line error."""
    try:
        return prepare.read_jsonl(path, required)
    except prepare.DataError as e:
        fail(str(e))


def resolve_model(path: str, template):
    """(model path for the engine, template name). A run dir means its latest complete step_* checkpoint.
    A path under an existing dir (or starting with /, ., ~) is local: missing, it is never a hub name."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            steps = sorted((int(m.group(1)), d) for d in os.listdir(path)
                           if (m := re.fullmatch(r"step_(\d+)", d)) and os.path.isdir(os.path.join(path, d)))
            if not steps:
                fail(f"{path} is neither an HF model dir (config.json) nor a run dir (step_* subdirs)")
            path = os.path.join(path, steps[-1][1])  # main's first line names it
        cfg_file = os.path.join(path, "train_config.json")
        if template is None and os.path.isfile(cfg_file):
            try:
                with open(cfg_file) as f:
                    template = json.load(f)["template"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                fail(f"unreadable checkpoint config {cfg_file} ({type(e).__name__}: {e})")
    elif os.path.exists(path):
        fail(f"{path} is not a model directory")
    elif local_path(path):
        fail(f"{path}: no such directory")
    # else: a hub name such as Qwen/Qwen2.5-Math-7B, resolved by the engine.
    if (template or DEFAULT_TEMPLATE) not in TEMPLATES:
        fail(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")
    return path, template or DEFAULT_TEMPLATE


def format_table(results: dict) -> str:
    """One row per benchmark then avg; rates in %."""
    ks = [k for k in results["avg"] if k.startswith("pass@")]
    cols = [("accuracy", "acc"), ("format_rate", "format"), ("lenient_accuracy", "lenient"),
            ("mean_length", "len"), ("truncation_rate", "trunc"), ("reflection_rate", "reflect")]
    if ks:
        cols += [("reflection_question_rate", "reflect_q")] + [(k, k) for k in ks]
    lines = [f"{'benchmark':<14}{'n':>6}" + "".join(f"{h:>10}" for _, h in cols)]
    for name, s in results.items():
        cells = "".join(f"{s[k]:>10.1f}" if k == "mean_length" else f"{100 * s[k]:>10.1f}" for k, _ in cols)
        lines.append(f"{name:<14}{s['n_problems']:>6}" + cells)
    return "\n".join(lines)


def tabulate(records: list) -> dict:
    """Summary per benchmark, in order of appearance, then avg: the unweighted mean of each figure over
    benchmarks (avg accuracy is the paper's headline number)."""
    groups = {}
    for r in records:
        groups.setdefault(r.get("benchmark", "all"), []).append(r)
    per = {b: summarize(rs) for b, rs in groups.items()}
    shared = [k for k in next(iter(per.values())) if all(k in s for s in per.values())]
    avg = {k: sum(s[k] for s in per.values()) / len(per) for k in shared}
    avg["n_problems"] = sum(s["n_problems"] for s in per.values())
    return {**per, "avg": avg}


def write_outputs(out: str, results: dict, settings: dict, records: list, rates=None):
    """The results json, the samples beside it and (--pass-rates) each problem's solve rate."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"settings": settings, "results": results}, f, indent=2)
    files = {".samples.jsonl": records, ".pass_rates.jsonl": rates}
    files = {os.path.splitext(out)[0] + ext: rows for ext, rows in files.items() if rows is not None}
    for path, rows in files.items():
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {out} and {' and '.join(files)}")


def load_model(args, model_path: str, tname: str, rows: list, colocated: bool):
    """(tokenizer, engine), or one line on why the model cannot score these rows, before the engine starts."""
    from rollout import make_engine
    from transformers import AutoConfig, AutoTokenizer
    try:  # a model that does not load is a one-line error, not a traceback
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        context = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None) or 10**9
        if not tokenizer("1 + 1 = 2").input_ids:  # e.g. no tokenizer files: a tokenizer with no vocabulary
            fail(f"{model_path} has no usable tokenizer (text encodes to no tokens): expected tokenizer.json "
                 "(or vocab.json + merges.txt) and tokenizer_config.json, as in the base model")
        longest = max([len(tokenizer(render(tname, r["problem"], tokenizer)).input_ids) for r in rows] + [0])
        if longest >= context:  # scoring such problems 0 would quietly change the benchmark
            fail(f"a prompt of {longest} tokens does not fit the model's context of {context} tokens")
        # Room for the longest prompt plus the budget, within the context (Qwen2.5-Math: 4,096 positions).
        return tokenizer, make_engine(args.engine, model_path, seed=args.seed, tensor_parallel_size=args.tp,
                                      max_model_len=min(longest + args.max_new_tokens, context),
                                      enforce_eager=args.eager, colocated=colocated,
                                      gpu_memory_utilization=args.gpu_memory_utilization)
    except Exception as e:
        fail(f"cannot load model {model_path}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")


def gather_shards(records: list, gen_s: float, timeouts: int, *, n: int, rank: int, world: int):
    """Rank 0: all ranks' records in the rows' order (rank r scored rows r, r + world, ..., n records each),
    the slowest rank's generation time, all grader timeouts. The other ranks: None."""
    import torch.distributed as dist
    parts = [None] * world if rank == 0 else None
    dist.gather_object(([records[j:j + n] for j in range(0, len(records), n)], gen_s, timeouts), parts, dst=0)
    if rank != 0:
        return None
    groups = [None] * sum(len(p[0]) for p in parts)
    for r, p in enumerate(parts):
        groups[r::world] = p[0]
    return [x for g in groups for x in g], max(p[1] for p in parts), sum(p[2] for p in parts)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", nargs="?", help="HF model dir, checkpoint step dir, run dir, or hub name")
    p.add_argument("--template", default=None, choices=list(TEMPLATES),
                   help="prompt template (default: the checkpoint's, else qwen_math)")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="comma-separated benchmark names")
    p.add_argument("--data-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                   "math", "eval"), help="dir of <benchmark>.jsonl (data/prepare.py writes data/math/eval)")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("-n", "--n", type=int, default=1, help="samples per problem; torchrun takes --n: use -n")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the paper's protocol)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=3000)
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"])
    p.add_argument("--tp", type=int, default=1, help="vLLM tensor parallel size (GPUs); not under torchrun")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="vLLM's share of each GPU (alone on it; train.py's colocated engine takes 0.35)")
    p.add_argument("--eager", action="store_true",
                   help="vLLM without compile/CUDA graphs: faster start, slower decode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results json (default out/eval_MODEL.json), samples beside")
    p.add_argument("--regrade", default=None, help="re-score a saved .samples.jsonl without generating")
    p.add_argument("--workers", type=int, default=2, help="grader worker processes")
    p.add_argument("--pass-rates", action="store_true", help="also write each problem's solve rate as "
                   "training scores it (0 if truncated); give training's --temperature and -n")
    args = p.parse_args(argv)
    if args.path is None and args.regrade is None:
        p.error("give a model PATH or --regrade FILE.jsonl")
    if args.n < 1 or (args.limit is not None and args.limit < 1):
        fail("--n and --limit must be >= 1")
    if args.tp > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fail(f"--tp {args.tp} under torchrun: each rank runs a whole engine on its own GPU; use --tp 1 "
             "there, or one process with --tp")
    return args


def main(argv=None):
    args = parse_args(argv)
    from grader import GraderPool
    if args.regrade:
        records = read_jsonl(args.regrade, ("problem", "gold", "response", "length", "truncated"))
        if not records:
            fail(f"{args.regrade}: no samples to regrade (the file is empty)")
        out = args.out or os.path.splitext(args.regrade)[0].removesuffix(".samples") + ".regraded.json"
        with GraderPool(workers=args.workers) as pool:
            regrade(pool, records, args.template)
        results = tabulate(records)
        print(format_table(results))
        return write_outputs(out, results, {"regrade": args.regrade}, records)

    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    for b in names:  # the five, or any NAME.jsonl in --data-dir (e.g. the demo's heldout)
        if b not in BENCHMARKS and not os.path.isfile(os.path.join(args.data_dir, f"{b}.jsonl")):
            fail(f"unknown benchmark {b!r}: choose from {', '.join(BENCHMARKS)} or NAME.jsonl in --data-dir")
    # Every data file is read before the (slow) engine starts, so a bad file fails in a second.
    data = {b: read_jsonl(os.path.join(args.data_dir, f"{b}.jsonl"), ("problem", "answer"))[:args.limit]
            for b in names}
    model_path, tname = resolve_model(args.path, args.template)
    out = args.out or os.path.join("out", f"eval_{os.path.basename(os.path.normpath(model_path))}.json")
    settings = {k: v for k, v in vars(args).items() if k not in ("regrade", "out")}
    settings.update(model=model_path, template=tname, benchmarks=names)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if rank == 0:
        print(f"eval.py: {model_path} | template {tname} | n {args.n} | temperature {args.temperature} | "
              f"max_new_tokens {args.max_new_tokens} | {', '.join(f'{b} {len(r)}' for b, r in data.items())}"
              + (f" | {world} ranks" if world > 1 else ""), flush=True)

    # All benchmarks in one engine call: a 30-problem AIME alone would leave the GPU mostly idle.
    rows = [{**r, "benchmark": b} for b, rs in data.items() for r in rs]
    mine = range(rank, len(rows), world)  # torchrun: each rank a whole engine on rows rank, rank + world, ...
    if world > 1:
        from model import setup_distributed
        setup_distributed(threads=0, timeout_min=60)  # CPU: gloo, the cores shared out among the node's ranks
    with GraderPool(workers=args.workers) as pool:  # workers start before the engine's threads (platform.md)
        tokenizer, engine = load_model(args, model_path, tname, rows, colocated=world > 1)
        total, records = evaluate(engine, pool, [rows[i] for i in mine], tname, n=args.n, ids=mine,
                                  temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                  max_new_tokens=args.max_new_tokens, tokenizer=tokenizer, progress=rank == 0)
        shard = records, total["generate_s"], pool.timeouts
    if world > 1:
        shard = gather_shards(*shard, n=args.n, rank=rank, world=world)
        if rank != 0:  # rank 0 alone writes the table and the samples
            return
    records, gen_s, settings["grader_timeouts"] = shard
    tokens_per_s = sum(r["length"] for r in records) / max(gen_s, 1e-9)
    print(f"generated {len(records)} responses in {gen_s:.1f}s ({tokens_per_s:.0f} tokens/s)", flush=True)
    settings.update(generate_s=gen_s, tokens_per_s=tokens_per_s, ranks=world)
    results = tabulate(records)
    print(format_table(results))
    write_outputs(out, results, settings, records, pass_rates(records, args.n) if args.pass_rates else None)


if __name__ == "__main__":
    main()
