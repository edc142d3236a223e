"""data/prepare.py --file / --hub: any question set, custom keys, every row validated, golds the grader cannot
match against themselves dropped and counted, --pass-rates keeping problems by solve rate (by hand, and on
eval.py's file from the demo model). Real runs of the script in a subprocess; the hub itself is not reachable
here, so the hub path is tested up to the network (its file picking, and its one-line error when offline)."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from data.prepare import DataError, percentile, split_files
from grader import grade

PREPARE = os.path.join(REPO, "data", "prepare.py")


def run(args, env=None, pre=""):
    """The script as a user runs it; `pre` is Python run first in the same process (to hide a module)."""
    cmd = [sys.executable, PREPARE, *args] if not pre else \
        [sys.executable, "-c", f"{pre}; import runpy, sys; sys.argv = {[PREPARE, *args]!r}; "
                               f"runpy.run_path({PREPARE!r}, run_name='__main__')"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, **(env or {})})


def one_line_error(p, expected):
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [f"prepare.py: {expected}"], p.stderr


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read(path):
    return [json.loads(line) for line in open(path)]


def test_jsonl_with_custom_keys_is_converted(tmp_path):
    src = write_lines(tmp_path / "mine.jsonl", [
        {"question": "1 + 1?", "final_answer": "2", "extra": [1]},
        "",  # a blank line is skipped, not an error
        {"question": "AMC-style float gold", "final_answer": 142.0},
        {"question": 7, "final_answer": 0.5},
        {"question": "a fraction", "final_answer": "\\frac{1}{2}"}])
    out = tmp_path / "sets" / "mine.jsonl"
    p = run(["--file", str(src), "--problem-key", "question", "--answer-key", "final_answer", "--out", str(out)])
    assert p.returncode == 0, p.stderr
    assert read(out) == [{"problem": "1 + 1?", "answer": "2"}, {"problem": "AMC-style float gold", "answer": "142"},
                         {"problem": "7", "answer": "0.5"}, {"problem": "a fraction", "answer": "\\frac{1}{2}"}]
    assert p.stdout.strip().splitlines() == [f"mine 4  -> {out}"]  # nothing dropped, so nothing said about it
    assert not os.path.exists(str(out) + ".tmp")


@pytest.mark.parametrize("line, expected", [
    ({"question": "q"}, "no key 'final_answer' (--answer-key); the row has 'question'"),
    ({"question": "q", "final_answer": ["1", "2"]}, "'final_answer' must be a string or a number, not list"),
    ({"question": "q", "final_answer": None}, "'final_answer' must be a string or a number, not NoneType"),
    ({"question": "q", "final_answer": True}, "'final_answer' must be a string or a number, not bool"),
    ({"question": "  ", "final_answer": "1"}, "'question' is empty"),
    ('["q", "1"]', "row is not a JSON object"),
    ('{"question": "q", "final_answer": ', "invalid JSON (Expecting value)"),
], ids=["missing-key", "list", "null", "bool", "empty-problem", "not-object", "bad-json"])
def test_bad_row_names_file_and_line_and_writes_nothing(tmp_path, line, expected):
    src = write_lines(tmp_path / "set.jsonl", [{"question": "1 + 1?", "final_answer": 2}, "", line,
                                               {"question": "2 + 2?", "final_answer": 4}])
    out = tmp_path / "out.jsonl"
    out.write_text("the previous set\n")  # an earlier good run's output survives a failed run
    p = run(["--file", str(src), "--problem-key", "question", "--answer-key", "final_answer", "--out", str(out)])
    one_line_error(p, f"{src}:3: {expected}")
    assert out.read_text() == "the previous set\n" and not os.path.exists(str(out) + ".tmp")
    p = run(["--file", str(src), "--problem-key", "question", "--answer-key", "final_answer",
             "--out", str(tmp_path / "new.jsonl")])
    assert p.returncode != 0 and not (tmp_path / "new.jsonl").exists()


def test_wrong_key_and_missing_file_in_one_line(tmp_path):
    src = write_lines(tmp_path / "set.jsonl", [{"question": "1 + 1?", "answer": "2"}])
    one_line_error(run(["--file", str(src), "--out", str(tmp_path / "o.jsonl")]),
                   f"{src}:1: no key 'problem' (--problem-key); the row has 'question', 'answer'")
    one_line_error(run(["--file", str(tmp_path / "nope.jsonl")]), f"{tmp_path / 'nope.jsonl'}: file not found")
    assert not (tmp_path / "o.jsonl").exists()


def test_golds_the_grader_cannot_match_are_dropped_and_counted(tmp_path):
    unmatched = ["\\boxed{3}", "{", "\\sqrt{", ""]  # a box in the gold, unbalanced braces, an empty gold
    matched = ["42", "\\frac{1}{2}", "Tuesday", "(1, 2)"]
    assert not any(grade("\\boxed{" + g + "}", g) for g in unmatched)  # the premise, checked on the grader itself
    assert all(grade("\\boxed{" + g + "}", g) for g in matched)
    rows = [{"problem": f"q{i}", "answer": g} for i, g in enumerate(matched[:1] + unmatched + matched[1:])]
    src, out = write_lines(tmp_path / "golds.jsonl", rows), tmp_path / "golds_out.jsonl"
    p = run(["--file", str(src), "--out", str(out)])
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == ("golds: dropped 4 of 8 rows whose gold the grader cannot recognise as "
                                        f"itself (first: {src}:2 '\\\\boxed{{3}}')")
    assert [r["answer"] for r in read(out)] == matched
    # a set where no gold survives is an error, and writes nothing
    src = write_lines(tmp_path / "none.jsonl", [{"problem": "q", "answer": g} for g in unmatched])
    p = run(["--file", str(src), "--out", str(tmp_path / "none_out.jsonl")])
    assert "dropped 4 of 4" in p.stdout and p.stderr.strip() == "prepare.py: none: no usable rows"
    assert not (tmp_path / "none_out.jsonl").exists()


def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    src, out = tmp_path / "set.parquet", tmp_path / "out.jsonl"
    src.write_bytes(b"PAR1")  # never opened: the message comes first
    p = run(["--file", str(src), "--out", str(out)], pre="import sys; sys.modules['pyarrow'] = None")
    one_line_error(p, "reading parquet needs pyarrow: pip install pyarrow")
    assert not out.exists()


def test_hub_split_files_follow_the_hub_layouts():
    gsm8k = ["README.md", "main/test-00000-of-00001.parquet", "main/train-00000-of-00001.parquet",
             "socratic/test-00000-of-00001.parquet", "socratic/train-00000-of-00001.parquet"]
    assert split_files("openai/gsm8k", "test", gsm8k[:3]) == ["main/test-00000-of-00001.parquet"]
    with pytest.raises(DataError, match="several sets of 'train' files.*pass --hub-file"):
        split_files("openai/gsm8k", "train", gsm8k)  # two configs: the user has to choose
    shards = ["data/train-00001-of-00002.parquet", "data/train-00000-of-00002.parquet", "data/training_notes.parquet",
              "data/test-00000-of-00001.parquet"]
    assert split_files("r", "train", shards) == shards[1::-1]  # both shards, in order; not "training_notes"
    assert split_files("r", "train", ["train.jsonl", "test.jsonl", "train.csv"]) == ["train.jsonl"]
    assert split_files("r", "test", ["default/train/0000.parquet", "default/test/0000.parquet",
                                     "default/test/0001.parquet"]) == ["default/test/0000.parquet",
                                                                       "default/test/0001.parquet"]
    with pytest.raises(DataError, match="several"):
        split_files("r", "train", ["train.jsonl", "train.parquet"])
    with pytest.raises(DataError, match="no 'validation' files among train.jsonl; pass --hub-file"):
        split_files("r", "validation", ["train.jsonl", "README.md"])
    with pytest.raises(DataError, match="among no .jsonl/.parquet files"):
        split_files("r", "train", ["train.csv"])


def test_hub_offline_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out.jsonl"
    p = run(["--hub", "openai/gsm8k", "--hub-file", "main/train-00000-of-00001.parquet", "--out", str(out)],
            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith("prepare.py: openai/gsm8k: OfflineModeIsEnabled: ") and not out.exists()
    p = run(["--hub", "openai/gsm8k", "--file", "x.jsonl"])  # one source at a time
    assert p.returncode == 2 and "not allowed with argument" in p.stderr


# ---- --pass-rates: keep problems by solve rate ---------------------------------------------------------
def pass_rate_files(tmp_path):
    """A question set q0..q7 and an eval.py-style pass-rates file covering q0..q5 (q5 in two rows: pooled)."""
    qs = write_lines(tmp_path / "qs.jsonl", [{"problem": f"q{i}", "answer": str(i)} for i in range(8)])
    rates = [("q0", 8, 0), ("q1", 8, 8), ("q2", 8, 1), ("q3", 8, 4), ("q4", 8, 7),
             ("q5", 4, 4), ("q5", 4, 0),
             ("q6 ", 8, 4),  # not q6: matching is on the exact text
             ("elsewhere", 8, 4)]  # a problem of another set: ignored
    pr = write_lines(tmp_path / "pr.jsonl", [dict(benchmark="b", problem=q, gold="0", n=n, correct=c)
                                             for q, n, c in rates])
    return qs, pr


def test_pass_rates_keep_the_band_and_count_the_rest(tmp_path):
    qs, pr = pass_rate_files(tmp_path)
    out = tmp_path / "kept.jsonl"
    p = run(["--file", str(qs), "--pass-rates", str(pr), "--min-pass-rate", "0.125",
             "--max-pass-rate", "0.875", "--out", str(out)])
    assert p.returncode == 0, p.stderr
    # bounds inclusive (1/8 and 7/8 kept), q5 pooled to 4/8 (its rows alone: 1 and 0), q6 and q7 not found
    assert p.stdout.splitlines() == [
        f"qs: pass rate in [0.125, 0.875]: kept 4 of 8, dropped 1 below, 1 above, 2 not in {pr}",
        f"qs_pass0.125-0.875 4  -> {out}"]  # the default --out would be data/math/qs_pass0.125-0.875.jsonl
    assert read(out) == [{"problem": f"q{i}", "answer": str(i)} for i in (2, 3, 4, 5)]
    # one bound alone: the other is 0 or 1
    p = run(["--file", str(qs), "--pass-rates", str(pr), "--min-pass-rate", "0.5", "--out", str(out)])
    assert p.stdout.splitlines()[0].startswith("qs: pass rate in [0.5, 1]: kept 4 of 8, dropped 2 below, "
                                               "0 above")
    assert [r["problem"] for r in read(out)] == ["q1", "q3", "q4", "q5"]
    # percentiles of the 6 found rates (0, 1/8, 1/2, 1/2, 7/8, 1): 25th 0.21875, 75th 0.78125
    p = run(["--file", str(qs), "--pass-rates", str(pr), "--min-pass-percentile", "25",
             "--max-pass-percentile", "75", "--out", str(out)])
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        f"qs: pass rate in [0.2188, 0.7812] (percentiles 25-75 of 6 found): kept 2 of 8, dropped 2 below, "
        f"2 above, 2 not in {pr}", f"qs_pct25-75 2  -> {out}"]
    assert [r["problem"] for r in read(out)] == ["q3", "q5"]


def test_percentile_is_numpys_default():
    np = pytest.importorskip("numpy")
    xs = [0.5, 0.0, 0.125, 1.0, 0.5, 0.875, 0.25]
    for q in (0, 10, 25, 50, 62.5, 90, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), abs=1e-12)
    assert percentile([0.3], 40) == 0.3


@pytest.mark.parametrize("line, expected", [
    ('{"problem": "q1", "n": 8, "correct": ', "invalid JSON (Expecting value)"),
    ('["q1", 8, 1]', "row is not a JSON object"),
    ({"n": 8, "correct": 1}, "missing field 'problem'"),
    ({"problem": "q1", "correct": 1}, "missing field 'n'"),
    ({"problem": "q1", "n": 8}, "missing field 'correct'"),
    ({"problem": "q1", "n": 0, "correct": 0}, "needs n >= 1 and 0 <= correct <= n, not n 0, correct 0"),
    ({"problem": "q1", "n": 8, "correct": 9}, "needs n >= 1 and 0 <= correct <= n, not n 8, correct 9"),
    ({"problem": "q1", "n": 8, "correct": -1}, "needs n >= 1 and 0 <= correct <= n, not n 8, correct -1"),
    ({"problem": "q1", "n": "8", "correct": 1}, "'problem' must be a string, 'n' and 'correct' integers"),
    ({"problem": "q1", "n": 8, "correct": True}, "'problem' must be a string, 'n' and 'correct' integers"),
], ids=["bad-json", "not-object", "no-problem", "no-n", "no-correct", "n-0", "correct-above-n",
        "correct-negative", "n-string", "correct-bool"])
def test_bad_pass_rate_row_names_file_and_line_and_writes_nothing(tmp_path, line, expected):
    qs, _ = pass_rate_files(tmp_path)
    pr = write_lines(tmp_path / "bad.jsonl", [{"problem": "q0", "n": 8, "correct": 1}, "", line])
    out = tmp_path / "out.jsonl"
    out.write_text("the previous set\n")
    p = run(["--file", str(qs), "--pass-rates", str(pr), "--max-pass-rate", "0.9", "--out", str(out)])
    one_line_error(p, f"{pr}:3: {expected}")
    assert out.read_text() == "the previous set\n" and not os.path.exists(str(out) + ".tmp")


@pytest.mark.parametrize("flags, expected", [
    (["--min-pass-rate", "0.1"], "--min-pass-rate needs --pass-rates FILE (eval.py --pass-rates writes one)"),
    (["--max-pass-percentile", "90"], "--max-pass-percentile needs --pass-rates FILE (eval.py --pass-rates "
                                      "writes one)"),
    (["--pass-rates", "PR"], "--pass-rates needs a band: --min-pass-rate/--max-pass-rate (or -percentile)"),
    (["--pass-rates", "PR", "--min-pass-rate", "0.8", "--max-pass-rate", "0.2"],
     "--min-pass-rate 0.8 is above --max-pass-rate 0.2"),
    (["--pass-rates", "PR", "--min-pass-percentile", "60", "--max-pass-percentile", "40"],
     "--min-pass-percentile 60 is above --max-pass-percentile 40"),
    (["--pass-rates", "PR", "--max-pass-rate", "1.5"], "--max-pass-rate 1.5 is outside [0, 1]"),
    (["--pass-rates", "PR", "--min-pass-rate", "nan"], "--min-pass-rate nan is outside [0, 1]"),
    (["--pass-rates", "PR", "--min-pass-percentile", "-5"], "--min-pass-percentile -5 is outside [0, 100]"),
    (["--pass-rates", "PR", "--min-pass-rate", "0.1", "--max-pass-percentile", "90"],
     "--min-pass-rate and --max-pass-percentile: give a band in rates or in percentiles, not both"),
    (["--pass-rates", "EMPTY", "--min-pass-rate", "0.1"], "{EMPTY}: no pass-rate rows"),
    (["--pass-rates", "MISSING", "--min-pass-rate", "0.1"], "{MISSING}: file not found"),
], ids=["rate-without-file", "percentile-without-file", "file-without-band", "rates-crossed",
        "percentiles-crossed", "rate-above-1", "rate-nan", "percentile-negative", "both-kinds", "empty-file",
        "missing-file"])
def test_pass_rate_flag_errors_in_one_line(tmp_path, flags, expected):
    qs, pr = pass_rate_files(tmp_path)
    names = {"PR": str(pr), "EMPTY": str(write_lines(tmp_path / "empty.jsonl", [""])),
             "MISSING": str(tmp_path / "missing.jsonl")}
    out = tmp_path / "out.jsonl"
    p = run(["--file", str(qs), *[names.get(f, f) for f in flags], "--out", str(out)])
    one_line_error(p, expected.format(**names))
    assert not out.exists()
    # --src writes the whole suite: a band on it is refused before anything is read
    one_line_error(run(["--src", str(tmp_path), "--pass-rates", str(pr), "--max-pass-rate", "0.9"]),
                   "--pass-rates filters one question set: give it with --file or --hub")


def test_pass_rates_from_eval_on_the_demo_model(tmp_path, demo_model_dir):
    """eval.py --pass-rates on 8 demo problems (4 samples each at temperature 1), then prepare.py keeps those
    solved 1 to 3 times of 4; the set also holds 2 held-out problems eval.py never saw."""
    task = os.path.dirname(demo_model_dir)
    with open(os.path.join(task, "train.jsonl")) as f, open(os.path.join(task, "heldout.jsonl")) as g:
        train, heldout = f.readlines()[:8], g.readlines()[:2]
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "demo8.jsonl").write_text("".join(train))
    qs = tmp_path / "qs.jsonl"
    qs.write_text("".join(train + heldout))
    ev = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), demo_model_dir, "--data-dir",
                         str(tmp_path / "bench"), "--benchmarks", "demo8", "-n", "4", "--temperature", "1.0",
                         "--max-new-tokens", "24", "--engine", "hf", "--workers", "1", "--pass-rates",
                         "--out", str(tmp_path / "ev.json")], capture_output=True, text=True, timeout=300,
                        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert ev.returncode == 0, ev.stderr[-3000:]
    pr = tmp_path / "ev.pass_rates.jsonl"
    rates = {r["problem"]: r["correct"] / r["n"] for r in read(pr)}
    assert list(rates) == [json.loads(line)["problem"] for line in train]
    assert {r["n"] for r in read(pr)} == {4}
    out = tmp_path / "kept.jsonl"
    p = run(["--file", str(qs), "--pass-rates", str(pr), "--min-pass-rate", "0.25", "--max-pass-rate",
             "0.75", "--out", str(out)])
    assert p.returncode == 0, p.stderr
    line = p.stdout.splitlines()[0]
    kept, total, low, high, missing = map(int, re.fullmatch(
        r"qs: pass rate in \[0.25, 0.75\]: kept (\d+) of (\d+), dropped (\d+) below, (\d+) above, "
        r"(\d+) not in " + re.escape(str(pr)), line).groups())
    assert (total, missing) == (10, 2) and kept + low + high + missing == total
    assert low == sum(x < 0.25 for x in rates.values()) and high == sum(x > 0.75 for x in rates.values())
    assert [r["problem"] for r in read(out)] == [q for q, x in rates.items() if 0.25 <= x <= 0.75]
    assert kept > 0 and low + high > 0  # the demo model solves some problems sometimes: a real cut
