"""Accidents users make: each stops with one line of ours naming the flag or the file and line, printed once,
with nothing written; a rank whose torchrun dies goes with it (grader workers too); two runs cannot share an
--out-dir. Real processes throughout: plain python, real torchrun, real vLLM-CPU engines."""
import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO
from test_train import demo_data, env, logged_iteration, run_args  # noqa: F401 (demo_data: fixture)

TRAIN = os.path.join(REPO, "train.py")


def ours(p) -> list:
    """Our one-line errors in a finished process's output."""
    return [line for line in (p.stdout + p.stderr).splitlines() if line.startswith(("train.py: ", "eval.py: "))]


def assert_one_line(p, expected: str, torchrun: bool = False):
    assert p.returncode != 0
    lines = ours(p)
    assert len(lines) == 1 and expected in lines[0], (lines, p.stderr[-2000:])
    # no traceback of ours (torchrun adds its own failure block, which names no line of train.py)
    assert 'train.py", line' not in p.stderr and 'eval.py", line' not in p.stderr, p.stderr[-3000:]
    if not torchrun:
        assert "Traceback" not in p.stderr, p.stderr[-3000:]


def plain(args, timeout=300):
    return subprocess.run([sys.executable, TRAIN, "--recipe", "cpu_demo", *args], env=env(), capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def torchrun(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           TRAIN, "--recipe", "cpu_demo", *args], env=env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_model_path_typo(tmp_path):
    out = tmp_path / "out"
    p = plain(["--model", "/nonexistent/model", "--out-dir", str(out)])
    assert_one_line(p, "--model /nonexistent/model: no such directory")
    assert not out.exists()


def test_data_errors_one_line_nothing_written(tmp_path, demo_model_dir, demo_data):  # noqa: F811
    heldout = os.path.join(demo_data, "heldout.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"problem": "1 + 1?", "answer": "2"}\n{"problem": "caf\xe9", "answer": "1"}\n')
    for questions, expected in ((empty, f"{empty} has no questions"), (bad, f"{bad}:2: not UTF-8")):
        out = tmp_path / ("out_" + questions.stem)
        p = plain(["--model", demo_model_dir, "--questions", str(questions), "--eval-file", heldout,
                   "--out-dir", str(out)])
        assert_one_line(p, expected)
        assert not out.exists()
    # data/prepare.py --src: the same file:line
    src = tmp_path / "src"
    for sub in ("train", "eval"):
        (src / sub).mkdir(parents=True)
    (src / "train" / "math12k.jsonl").write_bytes(bad.read_bytes().replace(b'"}', b'", "level": 3}'))
    p = subprocess.run([sys.executable, os.path.join(REPO, "data", "prepare.py"), "--src", str(src), "--out",
                        str(tmp_path / "prepared")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode != 0 and "math12k.jsonl:2: not UTF-8" in p.stdout + p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not (tmp_path / "prepared").exists()


def test_regrade_of_an_empty_samples_file(tmp_path):
    empty = tmp_path / "x.samples.jsonl"
    empty.write_text("")
    p = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), "--regrade", str(empty)], env=env(),
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert_one_line(p, "no samples to regrade")
    assert sorted(os.listdir(tmp_path)) == ["x.samples.jsonl"]


def test_errors_printed_once_under_torchrun(tmp_path, demo_model_dir, demo_data):  # noqa: F811
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    p = torchrun(["--model", demo_model_dir, "--questions", str(empty), "--out-dir", str(tmp_path / "out")])
    assert_one_line(p, "has no questions", torchrun=True)
    p = torchrun(["--lr", "0", "--out-dir", str(tmp_path / "out")])
    assert_one_line(p, "--lr must be > 0", torchrun=True)
    assert not (tmp_path / "out").exists()


def descendants(pid: int) -> list:
    children = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def test_one_run_per_out_dir_and_no_orphans(tmp_path, demo_model_dir, demo_data):  # noqa: F811
    out = str(tmp_path / "run")
    args = run_args(demo_model_dir, demo_data, out, ["--iterations", "1000", "--save-every", "2", "--keep", "10"])
    first = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    procs = []
    try:
        t0 = time.time()
        while logged_iteration(out) < 1 and time.time() - t0 < 300:
            time.sleep(0.2)
        assert logged_iteration(out) >= 1, "the first run did not start training"
        # 1. a second run into the same directory stops at once, naming the live one (host:pid)
        before = sorted(os.listdir(out))
        second = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
        assert_one_line(second, f"--out-dir {out} is in use by the live run", torchrun=True)
        holder = ours(second)[0].split("live run ")[1].split(";")[0]
        assert holder.split(":")[1].isdigit() and alive(int(holder.split(":")[1]))
        # the live run lost nothing (its files may only have grown)
        assert set(before) <= set(os.listdir(out))
        # 2. killing torchrun's process group (a scheduler, a closed terminal) takes the ranks and workers down
        procs = descendants(first.pid)
        assert len(procs) >= 2  # the two ranks, and their grader workers
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        t0 = time.time()
        while any(alive(p) for p in procs) and time.time() - t0 < 15:
            time.sleep(0.2)
        assert not [p for p in procs if alive(p)], "processes left running after torchrun died"
        # nothing that looks complete was written after they died: every step_N has its trainer state
        steps = [d for d in os.listdir(out) if d.startswith("step_")]
        assert all(os.path.isfile(os.path.join(out, d, "train_config.json")) for d in steps)
        snapshot = sorted(os.listdir(out))
        time.sleep(2)
        assert sorted(os.listdir(out)) == snapshot
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        for p in procs:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


def test_gpus_that_torch_cannot_use_are_an_error(tmp_path, demo_model_dir):
    """A CUDA machine whose torch is the CPU build (here: CPU torch, and a FAKE nvidia-smi on PATH that lists one
    GPU, as a driver would) stops with one line instead of training on the CPU; CUDA_VISIBLE_DEVICES= opts out."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    e = {**env(), "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    e.pop("CUDA_VISIBLE_DEVICES", None)
    # a model that exists: it is located (a hub one downloaded) before the process group and its GPU check
    p = subprocess.run([sys.executable, TRAIN, "--recipe", "cpu_demo", "--model", demo_model_dir, "--out-dir",
                        str(out)], env=e, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert_one_line(p, "nvidia-smi sees 1 GPU(s) but torch")
    assert not out.exists()
    p = subprocess.run([sys.executable, TRAIN, "--recipe", "cpu_demo", "--model", "/nonexistent/model",
                        "--out-dir", str(out)], env={**e, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                       text=True, timeout=300, cwd=REPO)
    assert_one_line(p, "--model /nonexistent/model: no such directory")  # past the GPU check


def test_late_errors_one_line_nothing_written(tmp_path, demo_model_dir, demo_data):  # noqa: F811
    """Errors found once the ranks are up (the model's context, argparse, the out dir) are one line of ours,
    printed once, and nothing is written."""
    q, h = os.path.join(demo_data, "train.jsonl"), os.path.join(demo_data, "heldout.jsonl")
    base = ["--model", demo_model_dir, "--questions", q, "--eval-file", h]
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    out = tmp_path / "out"
    for args, expected in (
            (["--max-new-tokens", "4000"], "--max-new-tokens 4000: the longest prompt ("),
            (["--eval-max-new-tokens", "2040"], "past the model's context of 2048 tokens"),
            (["--iters", "6"], "unrecognized arguments: --iters 6 (did you mean --iterations?)"),
            (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
            (["--resume"], "argument --resume: expected one argument")):
        p = torchrun(base + args + ["--out-dir", str(out)])
        assert_one_line(p, expected, torchrun=True)
        assert not out.exists()
    p = torchrun(base + ["--out-dir", str(a_file)])
    assert_one_line(p, f"--out-dir {a_file} is a file, not a directory", torchrun=True)
    assert a_file.read_text() == "keep me"
    # a relative path whose first component exists here is a local path, never a hub name (no network wait)
    t0 = time.time()
    p = plain(["--model", "data/no-such-model", "--out-dir", str(out)])
    assert_one_line(p, "--model data/no-such-model: no such directory")
    assert time.time() - t0 < 60 and not out.exists()


def test_nothing_learned_is_said_and_ctrl_c_is_one_line(tmp_path, demo_model_dir, demo_data):  # noqa: F811
    """Golds no answer can match: after 5 iterations of equal rewards everywhere, one note (the run goes on);
    a problem longer than --max-prompt-tokens is counted at start; Ctrl-C (SIGINT to torchrun, which passes
    it to every rank and grader worker) ends with one line naming the last complete checkpoint."""
    rows = [json.loads(line) for line in open(os.path.join(demo_data, "train.jsonl"))][:40]
    questions = tmp_path / "unmatchable.jsonl"
    with open(questions, "w") as f:
        for r in rows + [{"problem": "word " * 300, "answer": "1"}]:
            f.write(json.dumps({"problem": r["problem"], "answer": "???"}) + "\n")
    out, log = tmp_path / "out", tmp_path / "log.txt"
    args = run_args(demo_model_dir, demo_data, str(out), ["--questions", str(questions), "--iterations", "1000",
                                                        "--save-every", "2", "--dynamic-sampling", "false",
                                                        "--beta", "0", "--ref-sync-every", "0",
                                                        "--ref-mixup-alpha", "1"])
    with open(log, "w") as f:
        p = subprocess.Popen(args, env=env(), stdout=f, stderr=subprocess.STDOUT)
        t0 = time.time()
        while "nothing is learned" not in log.read_text() and time.time() - t0 < 300 and p.poll() is None:
            time.sleep(0.5)
        while logged_iteration(str(out)) < 7 and time.time() - t0 < 300:  # it goes on after the note
            time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=120)
    text = log.read_text()
    lines = [line.split("| ")[-1] for line in text.splitlines()]
    assert sum("train.py: note: in each of the first 5 iterations" in line for line in lines) == 1, text[-3000:]
    assert sum(f"{questions}: 1 of 41 problems skipped" in line for line in lines) == 1
    last = sorted(d for d in os.listdir(out) if d.startswith("step_"))[-1]
    ours_ = [line for line in lines if line.startswith("train.py: ") and "note:" not in line]
    assert ours_ == [f"train.py: interrupted; the last complete checkpoint is {out / last}"], text[-3000:]
    # no traceback from our code or a grader worker (torchrun prints its own SignalException traceback)
    assert not [w for w in ('train.py", line', 'grader.py", line', "ForkServerProcess", "KeyboardInterrupt",
                            "EOFError") if w in text], text[-3000:]
    # every reward 0, beta 0: no response can move the gradient, so the update ran no forward pass at all,
    # yet AdamW stepped (the schedule advanced) and the sync check says "not measured", not "perfect"
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")][1:]
    assert recs and all(r["micro_steps"] == 0 and r["trained_tokens"] == 0 and r["grad_norm"] == 0 for r in recs)
    assert all(r["logprob_mismatch"] != r["logprob_mismatch"] for r in recs)  # nan


OOM_SCRIPT = """
import os, sys
import torch
sys.path.insert(0, sys.argv[1])
import eval as E, loss, rollout, train
from templates import get_template


def oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (a stand-in)")


def ending(phase, fn, *args):
    try:
        fn(*args)
    except SystemExit as e:
        print(phase, "->", e.code, flush=True)


if __name__ == "__main__":
    os.environ["MASTER_PORT"] = "29534"
    d, data = sys.argv[2], sys.argv[3]
    cfg = train.parse_config(["--recipe", "cpu_demo", "--model", d, "--questions", data + "/train.jsonl",
                              "--eval-file", data + "/heldout.jsonl", "--rollout-batch", "4", "--group-size", "4",
                              "--train-batch", "16", "--max-new-tokens", "16"])
    rank, world, device = train.start_process(cfg, os.getppid())
    tok, gen, questions, heldout, context = train.load_inputs(cfg, d, rank, device)
    run = train.Run(cfg, rank, world, device, tok, d)
    make = rollout.make_engine
    rollout.make_engine = lambda *a, **k: (_ for _ in ()).throw(ValueError(
        "No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when initializing"))
    ending("start-up", train.build, run, 1, context)
    rollout.make_engine = make
    train.build(run, 1, context)
    rows, seeds = train.prompts(questions, 0, cfg, rank, world)
    generate = train.generate_and_grade
    train.generate_and_grade = oom
    ending("rollout", train.rollout, run, questions, rows, seeds, 0, get_template(cfg.template))
    train.generate_and_grade = generate
    batch = train.rollout(run, questions, rows, seeds, 0, get_template(cfg.template))
    seqs, plans, _ = train.plan_update(run, batch, 0)
    logprobs, loss.token_logprobs = loss.token_logprobs, oom
    ending("update", train.optimize, run, seqs, plans, {}, {})
    loss.token_logprobs = logprobs
    run.engine.wake_up = oom
    ending("sync", train.sync_engine, run)
    E.evaluate = oom
    ending("eval", train.evaluate_heldout, run, heldout)
"""


def test_out_of_memory_is_one_line_naming_the_flags(tmp_path, demo_model_dir, demo_data):  # noqa: F811
    """torch.OutOfMemoryError in each phase (raised by stand-ins for the GPU's allocator), and vLLM's start-up
    ValueError when no memory is left for its KV cache: one line naming the phase, the size, the flags."""
    script = tmp_path / "oom.py"
    script.write_text(OOM_SCRIPT)
    p = subprocess.run([sys.executable, str(script), REPO, demo_model_dir, demo_data], env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = dict(line.split(" -> ", 1) for line in p.stdout.splitlines() if " -> " in line)
    assert got["start-up"].startswith("train.py: vLLM could not start: No available memory for the cache blocks")
    assert "raise --gpu-memory-utilization if the GPU is free" in got["start-up"]
    assert got["rollout"] == ("train.py: out of GPU memory in the rollout (4 prompts x 4 of up to 16 tokens); "
                              "lower it with --gpu-memory-utilization or --max-new-tokens")
    assert got["update"].startswith("train.py: out of GPU memory in the update (a packed row of ")
    assert got["update"].endswith("tokens); lower it with --max-tokens-per-micro-batch, or "
                                  "--grad-checkpointing true")
    assert got["sync"] == ("train.py: out of GPU memory in the engine's wake-up (vLLM's share 0.35 of the GPU); "
                           "lower it with --gpu-memory-utilization (or --sleep-level 2)")
    assert got["eval"] == ("train.py: out of GPU memory in the evaluation (16 problems x 8 of up to 64 tokens); "
                           "lower it with --gpu-memory-utilization or --eval-max-new-tokens")
