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

Online sources (not run here: these machines have no hub access):
  MATH 12k and the evaluation suite: the Dr. GRPO authors' own files, github.com/sail-sg/understand-r1-zero
  at commit SOURCE_COMMIT (datasets/train/math_12k, datasets/evaluation_suite), read with datasets.load_from_disk.
  GSM8K: the HF dataset openai/gsm8k (config "main", split "train"; the answer follows "####").
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

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
    ans = row["answer"]
    if isinstance(ans, (int, float)) and not isinstance(ans, bool):
        ans = row["answer"] = str(int(ans)) if float(ans).is_integer() else str(ans)   # amc23 stores 142.0
    ok = isinstance(ans, str) or (
        isinstance(ans, list) and ans and all(isinstance(a, str) and a.strip() for a in ans))
    if not ok:
        raise DataError(f"{where}: 'answer' must be a string or a non-empty list of non-empty strings")
    return row


def read_jsonl(path: str, required=("problem", "answer")):
    """Rows of a jsonl file, each a JSON object with the required fields (a question set's rows are also
    type-checked); the first bad row raises DataError naming file:line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported with its number, like bad JSON
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{i}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") \
                    from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
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
    os.makedirs(os.path.dirname(path), exist_ok=True)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", help="local directory laid out like shared/data (offline); omit to download")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "math"),
                   help="output directory")
    args = p.parse_args(argv)
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
