"""data/prepare.py --file / --hub: any question set, custom keys, every row validated, golds the grader cannot match
against themselves dropped and counted. Real runs of the script in a subprocess; the hub itself is not reachable
here, so the hub path is tested up to the network (its file picking, and its one-line error when offline)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from data.prepare import DataError, split_files
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
