"""Write the paper's question sets and evaluation suite as jsonl, validated row by row.

    python data/prepare.py --src ../shared/data     # offline: a directory laid out like shared/data
    python data/prepare.py                          # online: the pinned sources below (needs `pip install datasets`)

Writes to --out (default data/math):
    math12k.jsonl      MATH train+test minus the 500 MATH500 problems (~12,000 rows)   {problem, answer, level, type}
    math_l3to5.jsonl   its Level 3-5 subset, the paper's minimal recipe (8,886 rows)
    gsm8k.jsonl        GSM8K train                                                      {problem, answer}
    eval/{aime24,amc23,math500,minerva,olympiadbench}.jsonl                             {problem, answer}
`answer` is a string, or a list of acceptable strings (some Minerva rows). train.py and eval.py read only
these files. A malformed row stops the script with one line naming the file and line.

Any other question set, as one {problem, answer} file (default data/math/<name>.jsonl; train.py --questions <name>):
    python data/prepare.py --file my.jsonl|my.parquet --problem-key question --answer-key final_answer
    python data/prepare.py --hub ORG/NAME [--split train | --hub-file PATH] [--revision REV] ...   (not run here)
Every row needs both keys, a string or a number each; golds the grader does not match against themselves are dropped
and counted. Parquet needs pyarrow; --hub downloads with huggingface_hub (installed with transformers).

Keep the problems a model solves sometimes but not always (a group of equal rewards trains nothing); eval.py
scores them as training does, so give it training's --template, --max-new-tokens, temperature and -n:
    python eval.py BASE --data-dir data/math --benchmarks math_l3to5 -n 8 --temperature 1.0 --pass-rates
    python data/prepare.py --file data/math/math_l3to5.jsonl --pass-rates out/eval_BASE.pass_rates.jsonl \
        --min-pass-rate 0.1 --max-pass-rate 0.9         # -> data/math/math_l3to5_pass0.1-0.9.jsonl
A problem is matched by its exact text to the file's rows (rows of one problem pool their samples); its rate
correct / n must lie in [min, max]; a problem with no row is dropped. Or --min/--max-pass-percentile P Q:
the band is the P-th to Q-th percentile of the set's found rates (linear interpolation, numpy's default).

Online sources (not run here: these machines have no hub access):
  MATH 12k and the evaluation suite: the Dr. GRPO authors' own files, github.com/sail-sg/understand-r1-zero
  at commit SOURCE_COMMIT (datasets/train/math_12k, datasets/evaluation_suite), read with datasets.load_from_disk.
  GSM8K: the HF dataset openai/gsm8k (config "main", split "train"; the answer follows "####").
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

MATH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "math")
SOURCE_REPO = "https://github.com/sail-sg/understand-r1-zero.git"
SOURCE_COMMIT = "d0d051a7e8d50fff0dec4152c22b6662301eab15"
GSM8K_HUB = ("openai/gsm8k", "main", "train")
# Known sizes: the evaluation suite exactly, MATH 12k and GSM8K within a tolerance (sources differ by a few rows).
EVAL_SIZES = {"aime24": 30, "amc23": 83, "math500": 500, "minerva": 272, "olympiadbench": 675}
TRAIN_SIZES = {"math12k": (11_900, 12_100), "gsm8k": (7_400, 8_800)}
# Subset names inside the authors' evaluation_suite DatasetDict.
ONLINE_EVAL_NAMES = {"aime24": "aime", "amc23": "amc", "math500": "math", "minerva": "minerva",
                     "olympiadbench": "olympiad_bench"}


class DataError(Exception):
    pass


def number_text(x):
    """A number read from JSON or parquet as the string a gold is written as (amc23 stores 142.0: "142")."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return x
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def check_row(row, where: str, extra=()):
    """A usable row has a non-empty problem string and an answer that is a string or a list of strings.
    An empty answer string passes here; the caller drops such rows (MATH has two, whose solution box is empty)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is not a JSON object")
    for key in ("problem", "answer", *extra):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(row["problem"], str) or not row["problem"].strip():
        raise DataError(f"{where}: 'problem' must be a non-empty string")
    ans = row["answer"] = number_text(row["answer"])
    ok = isinstance(ans, str) or (
        isinstance(ans, list) and ans and all(isinstance(a, str) and a.strip() for a in ans))
    if not ok:
        raise DataError(f"{where}: 'answer' must be a string or a non-empty list of non-empty strings")
    return row


def jsonl_lines(path: str, name: str = None):
    """(line number, parsed JSON) per non-blank line; a line that is not UTF-8 or not JSON raises DataError naming
    name:line (name: how messages call the file, its path unless it is a hub download in a cache)."""
    name = name or path
    if not os.path.isfile(path):
        raise DataError(f"{name}: file not found")
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported with its number, like bad JSON
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{name}:{i}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") \
                    from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{name}:{i}: invalid JSON ({e.msg})") from None
            yield i, row


def read_jsonl(path: str, required=("problem", "answer")):
    """Rows of a jsonl file, each a JSON object with the required fields (a question set's rows are also
    type-checked); the first bad row raises DataError naming file:line."""
    rows = []
    for i, row in jsonl_lines(path):
        if {"problem", "answer"} <= set(required):
            row = check_row(row, f"{path}:{i}", [k for k in required if k not in ("problem", "answer")])
            row["_where"] = f"{path}:{i}"
        elif not isinstance(row, dict) or any(k not in row for k in required):
            raise DataError(f"{path}:{i}: needs the fields {', '.join(required)}")
        rows.append(row)
    return rows


def drop_empty_answers(name: str, rows):
    """Rows whose gold is empty can never be rewarded: drop them, and say which."""
    keep = []
    for r in rows:
        if isinstance(r["answer"], str) and not r["answer"].strip():
            print(f"{name}: dropped {r.get('_where', 'a row')} (empty answer)")
        else:
            keep.append(r)
    return keep


def write_jsonl(path: str, rows, keys):
    """Write to a temp file and rename, so an interrupted run never leaves a half-written set."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in keys if k in r}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def load_local(src: str):
    math12k = read_jsonl(os.path.join(src, "train", "math12k.jsonl"), ("problem", "answer", "level"))
    gsm8k = read_jsonl(os.path.join(src, "train", "gsm8k.jsonl"))
    evals = {b: read_jsonl(os.path.join(src, "eval", f"{b}.jsonl")) for b in EVAL_SIZES}
    return math12k, gsm8k, evals


def load_online():  # not run here (no network to the hub or GitHub on these machines)
    try:
        import datasets
    except ImportError:
        raise DataError("online mode needs the `datasets` package (pip install datasets), or pass --src DIR")
    tmp = tempfile.mkdtemp()
    subprocess.run(["git", "clone", "--filter=blob:none", SOURCE_REPO, tmp], check=True)
    subprocess.run(["git", "-C", tmp, "checkout", SOURCE_COMMIT], check=True)
    train = datasets.load_from_disk(os.path.join(tmp, "datasets", "train", "math_12k"))
    train = train["train"] if isinstance(train, datasets.DatasetDict) else train
    suite = datasets.load_from_disk(os.path.join(tmp, "datasets", "evaluation_suite"))
    math12k = [check_row(dict(r), f"math_12k row {i}", extra=("level",)) for i, r in enumerate(train)]
    evals = {b: [check_row({"problem": r["problem"], "answer": r["answer"]}, f"{name} row {i}")
                 for i, r in enumerate(suite[name])] for b, name in ONLINE_EVAL_NAMES.items()}
    gsm = datasets.load_dataset(GSM8K_HUB[0], GSM8K_HUB[1], split=GSM8K_HUB[2])
    gsm8k = [check_row({"problem": r["question"], "answer": r["answer"].split("####")[-1].strip()},
                       f"gsm8k row {i}") for i, r in enumerate(gsm)]
    return math12k, gsm8k, evals


# ---- any other question set: --file or --hub -----------------------------------------------------------------
def one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]  # library errors can span lines; ours are one line


def source_rows(path: str, name: str):
    """(where, row) for each row of a .jsonl or .parquet file; where is name:line, or name: row N for parquet."""
    if not path.endswith(".parquet"):
        yield from ((f"{name}:{i}", row) for i, row in jsonl_lines(path, name))
        return
    try:  # optional: most sets are jsonl, and pyarrow is a large wheel
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # missing, damaged or not parquet: pyarrow raises OSError, ArrowInvalid, ...
        raise DataError(f"{name}: cannot read it as parquet ({one_line(e)})") from None
    yield from ((f"{name}: row {i}", row) for i, row in enumerate(rows, 1))


def pick(row, where: str, problem_key: str, answer_key: str):
    """{problem, answer} of a source row: both keys there, each a string or a number (made a string), the problem
    not empty. An empty gold is no error here: drop_unmatched drops it, counted, as it drops MATH's two."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is not a JSON object")
    out = {"_where": where}
    for key, field in ((problem_key, "problem"), (answer_key, "answer")):
        if key not in row:  # most often a wrong --*-key: say what the row has
            raise DataError(f"{where}: no key {key!r} (--{field}-key); the row has {', '.join(map(repr, row))}")
        out[field] = number_text(row[key])
        if not isinstance(out[field], str):
            raise DataError(f"{where}: {key!r} must be a string or a number, not {type(out[field]).__name__}")
    if not out["problem"].strip():
        raise DataError(f"{where}: {problem_key!r} is empty")
    return out


def drop_unmatched(name: str, rows):
    """Keep the rows whose gold, boxed, the grader scores 1 against itself: any other gold can never be rewarded, and
    unparseable golds are where the Open-R1 logbook found a reward bug (they silently scored 1). A GraderPool as in
    training, so its time limit and its 0 for a grader error hold here too."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a script sees data/, not ..
    from grader import GraderPool
    with GraderPool(workers=2) as pool:
        ok = pool.grades(["\\boxed{" + r["answer"] + "}" for r in rows], [r["answer"] for r in rows])
    if not all(ok):
        first = rows[ok.index(False)]
        print(f"{name}: dropped {ok.count(False)} of {len(rows)} rows whose gold the grader cannot recognise as "
              f"itself (first: {first['_where']} {first['answer'][:60]!r})")
    return [r for r, good in zip(rows, ok) if good]


def read_pass_rates(path: str):
    """problem -> solve rate from eval.py --pass-rates rows {problem, n, correct, ...}; rows of one problem
    (two runs' files concatenated, or one problem in two benchmarks) pool their samples."""
    pooled = {}
    for i, row in jsonl_lines(path):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: row is not a JSON object")
        for key in ("problem", "n", "correct"):
            if key not in row:
                raise DataError(f"{path}:{i}: missing field {key!r}")
        n, c = row["n"], row["correct"]
        if not isinstance(row["problem"], str) or type(n) is not int or type(c) is not int:
            raise DataError(f"{path}:{i}: 'problem' must be a string, 'n' and 'correct' integers")
        if n < 1 or not 0 <= c <= n:
            raise DataError(f"{path}:{i}: needs n >= 1 and 0 <= correct <= n, not n {n}, correct {c}")
        c0, n0 = pooled.get(row["problem"], (0, 0))
        pooled[row["problem"]] = (c0 + c, n0 + n)
    if not pooled:
        raise DataError(f"{path}: no pass-rate rows")
    return {p: c / n for p, (c, n) in pooled.items()}


def percentile(xs, q: float) -> float:
    """The q-th percentile of xs, linear between the two nearest ranks (numpy's default)."""
    xs = sorted(xs)
    k = q / 100 * (len(xs) - 1)
    i = int(k)
    return xs[i] + (xs[min(i + 1, len(xs) - 1)] - xs[i]) * (k - i)


def keep_by_pass_rate(name: str, rows, path: str, lo: float, hi: float, pct: bool):
    """The rows whose solve rate lies in [lo, hi] (pct: lo, hi are percentiles of the found rows' rates); the
    rest counted in one line: below, above, and not in the file (dropped: its difficulty is unknown)."""
    rates = read_pass_rates(path)
    found = [rates[r["problem"]] for r in rows if r["problem"] in rates]
    note = ""
    if pct and found:
        note = f" (percentiles {lo:g}-{hi:g} of {len(found)} found)"
        lo, hi = percentile(found, lo), percentile(found, hi)
    keep = [r for r in rows if r["problem"] in rates and lo <= rates[r["problem"]] <= hi]
    low, high = sum(x < lo for x in found), sum(x > hi for x in found)
    print(f"{name}: pass rate in [{lo:.4g}, {hi:.4g}]{note}: kept {len(keep)} of {len(rows)}, dropped {low} "
          f"below, {high} above, {len(rows) - len(found)} not in {path}")
    return keep


def pass_band(args):
    """(lo, hi, in percentiles?) from the band flags, None without --pass-rates; a wrong flag: one line naming
    it."""
    rate = {"--min-pass-rate": args.min_pass_rate, "--max-pass-rate": args.max_pass_rate}
    pct = {"--min-pass-percentile": args.min_pass_percentile,
           "--max-pass-percentile": args.max_pass_percentile}
    given = [f for f, x in {**rate, **pct}.items() if x is not None]
    if not args.pass_rates:
        if given:
            sys.exit(f"prepare.py: {given[0]} needs --pass-rates FILE (eval.py --pass-rates writes one)")
        return None
    if not given:
        sys.exit("prepare.py: --pass-rates needs a band: --min-pass-rate/--max-pass-rate (or -percentile)")
    if not (args.file or args.hub):
        sys.exit("prepare.py: --pass-rates filters one question set: give it with --file or --hub")
    if given[0] in rate and given[-1] in pct:
        sys.exit(f"prepare.py: {given[0]} and {given[-1]}: give a band in rates or in percentiles, not both")
    band, top = (rate, 1) if given[0] in rate else (pct, 100)
    (lo_flag, lo), (hi_flag, hi) = band.items()
    lo, hi = 0 if lo is None else lo, top if hi is None else hi
    for flag, x in ((lo_flag, lo), (hi_flag, hi)):
        if not 0 <= x <= top:  # NaN too
            sys.exit(f"prepare.py: {flag} {x:g} is outside [0, {top}]")
    if lo > hi:
        sys.exit(f"prepare.py: {lo_flag} {lo:g} is above {hi_flag} {hi:g}")
    return lo, hi, top == 100


def split_files(repo: str, split: str, names):
    """A split's .jsonl/.parquet files, all shards in order, as hub repos lay them out: train.jsonl, data/train-00000-
    of-00002.parquet, default/train/0000.parquet (--revision refs/convert/parquet: the hub's parquet copy). A split in
    several folders (configs: openai/gsm8k has main/, socratic/) or formats is ambiguous: --hub-file picks then."""
    data = [n for n in names if n.endswith((".jsonl", ".parquet"))]
    found = sorted(n for n in data if re.match(re.escape(split) + r"([-._]|$)", os.path.basename(n))
                   or os.path.basename(os.path.dirname(n)) == split)
    if len({(os.path.dirname(n), os.path.splitext(n)[1]) for n in found}) != 1:
        raise DataError(f"{repo}: {'several sets of' if found else 'no'} {split!r} files among "
                        f"{', '.join((found or data)[:6]) or 'no .jsonl/.parquet files'}; pass --hub-file")
    return found


def hub_files(repo: str, split: str, files, revision):  # not run here (no network to the hub on these machines)
    """[(local path, name for messages)] of the split's files (or `files`) of a hub dataset repo, downloaded at one
    commit, which is printed: --revision COMMIT repeats the run exactly."""
    from huggingface_hub import HfApi, hf_hub_download  # installed with transformers
    try:
        info = HfApi().dataset_info(repo, revision=revision)
        files = files or split_files(repo, split, [s.rfilename for s in info.siblings])
        paths = [hf_hub_download(repo, f, repo_type="dataset", revision=info.sha) for f in files]
    except Exception as e:  # offline, no such repo or file, gated, ...: one line, whichever kind
        raise e if isinstance(e, DataError) else DataError(f"{repo}: {type(e).__name__}: {one_line(e)}") from None
    print(f"{repo}@{info.sha}: {', '.join(files)}")
    return [(path, f"{repo}/{f}") for path, f in zip(paths, files)]


def prepare_one(args, band):
    """--file / --hub: every row validated, (band) kept by solve rate, golds the grader cannot match dropped,
    {problem, answer} written."""
    try:
        if args.file:
            sources, name = [(args.file, args.file)], os.path.basename(args.file).split(".")[0]
        else:
            sources = hub_files(args.hub, args.split, args.hub_file, args.revision)
            name = args.hub.split("/")[-1] + "-" + os.path.basename((args.hub_file or [args.split])[0]).split(".")[0]
        rows = [pick(row, where, args.problem_key, args.answer_key)
                for path, shown in sources for where, row in source_rows(path, shown)]
        if band:
            rows = keep_by_pass_rate(name, rows, args.pass_rates, *band)
            # a name of its own: the default --out never overwrites the unfiltered set
            name += f"_{'pct' if band[2] else 'pass'}{band[0]:g}-{band[1]:g}"
        rows = drop_unmatched(name, rows) if rows else []
        if not rows:
            raise DataError(f"{name}: no usable rows")
    except DataError as e:
        sys.exit(f"prepare.py: {e}")
    out = args.out or os.path.join(MATH_DIR, name + ".jsonl")
    write_jsonl(out, rows, ("problem", "answer"))  # nothing is written before every row has passed
    print(f"{name} {len(rows)}  -> {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--src", help="local directory laid out like shared/data (offline); omit to download")
    src.add_argument("--file", help="any other question set: a local .jsonl or .parquet file")
    src.add_argument("--hub", metavar="ORG/NAME", help="any other question set: a hub dataset repo (network)")
    p.add_argument("--problem-key", default="problem", help="--file/--hub: the field holding the question")
    p.add_argument("--answer-key", default="answer", help="--file/--hub: the field holding the gold answer")
    p.add_argument("--split", default="train", help="--hub: the split whose .jsonl/.parquet files are read")
    p.add_argument("--hub-file", action="append", help="--hub: read this file of the repo instead (repeatable)")
    p.add_argument("--revision", help="--hub: branch, tag or commit (default: main; the commit used is printed)")
    p.add_argument("--out", help="output directory (default data/math); with --file/--hub the output file "
                                 "(default data/math/<name>.jsonl)")
    p.add_argument("--pass-rates", metavar="FILE", help="--file/--hub: keep problems by solve rate, from "
                   "this eval.py --pass-rates file (problems not in it are dropped)")
    p.add_argument("--min-pass-rate", type=float, help="--pass-rates: keep rates >= this (default 0)")
    p.add_argument("--max-pass-rate", type=float, help="--pass-rates: keep rates <= this (default 1)")
    p.add_argument("--min-pass-percentile", type=float, help="--pass-rates: instead, keep rates >= this "
                   "percentile of the set's found rates (default 0)")
    p.add_argument("--max-pass-percentile", type=float, help="--pass-rates: and <= this one (default 100)")
    args = p.parse_args(argv)
    band = pass_band(args)
    if args.file or args.hub:
        return prepare_one(args, band)
    args.out = args.out or MATH_DIR
    try:
        math12k, gsm8k, evals = load_local(args.src) if args.src else load_online()
        math12k, gsm8k = drop_empty_answers("math12k", math12k), drop_empty_answers("gsm8k", gsm8k)
        evals = {b: drop_empty_answers(b, rows) for b, rows in evals.items()}
        l3to5 = [r for r in math12k if r["level"] in ("Level 3", "Level 4", "Level 5")]
        counts = {"math12k": len(math12k), "math_l3to5": len(l3to5), "gsm8k": len(gsm8k),
                  **{b: len(rows) for b, rows in evals.items()}}
        for b, n in EVAL_SIZES.items():
            if counts[b] != n:
                raise DataError(f"{b}: {counts[b]} rows, expected {n}")
        for name, (lo, hi) in TRAIN_SIZES.items():
            if not lo <= counts[name] <= hi:
                raise DataError(f"{name}: {counts[name]} rows, expected {lo}..{hi}")
    except DataError as e:
        sys.exit(f"prepare.py: {e}")
    write_jsonl(os.path.join(args.out, "math12k.jsonl"), math12k, ("problem", "answer", "level", "type"))
    write_jsonl(os.path.join(args.out, "math_l3to5.jsonl"), l3to5, ("problem", "answer", "level", "type"))
    write_jsonl(os.path.join(args.out, "gsm8k.jsonl"), gsm8k, ("problem", "answer"))
    for b, rows in evals.items():
        write_jsonl(os.path.join(args.out, "eval", f"{b}.jsonl"), rows, ("problem", "answer"))
    print("  ".join(f"{k} {v}" for k, v in counts.items()) + f"  -> {args.out}")


if __name__ == "__main__":
    main()
