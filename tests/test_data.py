"""data/prepare.py on the real files: row counts, validation, and one clear error line for a bad row."""
import json
import os
import shutil
import subprocess
import sys

from conftest import REPO


def run(src, out):
    return subprocess.run([sys.executable, os.path.join(REPO, "data", "prepare.py"), "--src", src, "--out", out],
                          capture_output=True, text=True, timeout=300)


def test_prepare_offline_writes_the_paper_sets(shared_data, tmp_path):
    p = run(shared_data, str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    summary = [line for line in p.stdout.splitlines() if "->" in line][0]
    counts = dict(zip(*[iter(summary.split("->")[0].split())] * 2))
    assert {k: int(v) for k, v in counts.items()} == {
        "math12k": 11996, "math_l3to5": 8884, "gsm8k": 8792, "aime24": 30, "amc23": 83, "math500": 500,
        "minerva": 272, "olympiadbench": 675}
    assert "math12k.jsonl:9840 (empty answer)" in p.stdout  # the two empty golds are dropped, and said so
    rows = [json.loads(line) for line in open(tmp_path / "out" / "math_l3to5.jsonl")]
    assert {r["level"] for r in rows} == {"Level 3", "Level 4", "Level 5"}
    amc = [json.loads(line) for line in open(tmp_path / "out" / "eval" / "amc23.jsonl")]
    assert all(isinstance(r["answer"], str) and not r["answer"].endswith(".0") for r in amc)
    minerva = [json.loads(line) for line in open(tmp_path / "out" / "eval" / "minerva.jsonl")]
    assert sum(isinstance(r["answer"], list) for r in minerva) == 75


def test_bad_row_stops_with_file_and_line_and_writes_nothing(shared_data, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(shared_data, src)
    path = src / "eval" / "aime24.jsonl"
    lines = open(path).read().splitlines()
    lines[6] = json.dumps({"problem": "no answer here"})
    os.chmod(path, 0o644)
    open(path, "w").write("\n".join(lines) + "\n")
    out = tmp_path / "out"
    p = run(str(src), str(out))
    assert p.returncode != 0 and f"{path}:7" in p.stderr and "answer" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not out.exists()
    lines[6] = "{not json"
    open(path, "w").write("\n".join(lines) + "\n")
    p = run(str(src), str(out))
    assert f"{path}:7: invalid JSON" in p.stderr
