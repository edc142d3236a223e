"""`bench.py train`: seconds per RL step of train.py on a fixed CPU workload, its split, and TRL's on the
same workload."""
import json
import sys

from benchmarks.common import BENCH_PYTHON, REPO, torchrun

# max new tokens; the random model stops at random lengths
TRAIN_WORKLOADS = {"short": 128, "longtail": 512}
TRL_INSTALL = ("create its venv: python -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 "
               "transformers==5.19.0 trl==1.16.0 math-verify==0.9.0")


def bench_train(argv):
    """Response tokens/s of train.py itself (2 ranks, FSDP2 over gloo, vLLM-CPU, packed updates) on fixed CPU
    workloads: 16 prompts x 8 responses per RL step on a ~0.4M-parameter random Qwen2, at most 128 new tokens
    ("short") or 512 ("longtail": the random model's EOS falls at random lengths, a long-tailed spread), and
    the per-phase split from the run's metrics.jsonl. Then TRL's GRPOTrainer on the same model, prompts, G,
    budget and loss (Dr. GRPO, beta 0; one process, HF generate), when .venv-bench has trl: the ratio of
    response tokens/s (the two samplers' lengths differ, so seconds per step would not compare like with
    like)."""
    import argparse
    import math
    import os
    import statistics
    import subprocess
    import tempfile
    p = argparse.ArgumentParser(prog="bench.py train")
    p.add_argument("--iterations", type=int, default=7, help="the first one is warm-up, not counted")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--workloads", nargs="+", choices=list(TRAIN_WORKLOADS),
                   default=list(TRAIN_WORKLOADS))
    p.add_argument("--max-tokens", type=int, default=8192,
                   help="tokens per packed row (the cpu_demo recipe's)")
    p.add_argument("--trl-steps", type=int, default=4,
                   help="TRL steps (the first is warm-up); 0 = skip TRL")
    p.add_argument("--log", action="store_true", help="show train.py's own output")
    args = p.parse_args(argv)
    sys.path.insert(0, REPO)
    from data.demo import question, random_model, solution, split_problems
    tmp = tempfile.mkdtemp()
    # the issue's ~0.4M parameters
    model = random_model(os.path.join(tmp, "model"), seed=0, hidden=64, layers=6)
    from safetensors import safe_open
    with safe_open(os.path.join(model, "model.safetensors"), "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    questions = os.path.join(tmp, "q.jsonl")
    with open(questions, "w") as f:
        for prob in split_problems(0)[0][:512]:
            f.write(json.dumps({"problem": question(prob), "answer": str(solution(prob))}) + "\n")
    sink = None if args.log else subprocess.DEVNULL
    trl = args.trl_steps > 0 and os.path.exists(BENCH_PYTHON) and subprocess.run(
        [BENCH_PYTHON, "-c", "import trl"], capture_output=True).returncode == 0
    if args.trl_steps > 0 and not trl:
        print(f"TRL column skipped: {TRL_INSTALL}")
    for name in args.workloads:
        max_new = TRAIN_WORKLOADS[name]
        out = os.path.join(tmp, "run-" + name)
        cmd = torchrun(args.nproc, os.path.join(REPO, "train.py"), "--recipe", "cpu_demo", "--model", model,
                       "--questions", questions, "--eval-file", questions, "--eval-limit", "2",
                       "--eval-n", "2", "--eval-every", "1000", "--save-every", "1000",
                       "--rollout-batch", "16", "--group-size", "8", "--train-batch", "128",
                       "--max-tokens-per-micro-batch", str(args.max_tokens), "--max-new-tokens", str(max_new),
                       "--iterations", str(args.iterations), "--out-dir", out)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=sink,
                       stderr=sink)
        recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        # drop iteration 1: warm-up (compilation, first batch)
        recs = [r for r in recs if "t_generate" in r][1:]
        med = {k: statistics.median(r[k] for r in recs)
               for k in ("t_generate", "t_grade", "t_train", "t_sync")}
        total = statistics.median(r["t_generate"] + r["t_grade"] + r["t_train"] + r["t_sync"] for r in recs)
        mean_len = statistics.median(r["len_mean"] for r in recs)
        ours = sum(128 * r["len_mean"] for r in recs) / sum(
            r["t_generate"] + r["t_grade"] + r["t_train"] + r["t_sync"] for r in recs)
        eff = statistics.median(r["update_token_efficiency"] for r in recs)
        print(f"train.py [{name}], {args.nproc} ranks, {n_params / 1e6:.2f}M-parameter model, 128 responses "
              f"x <= {max_new} new tokens (mean {mean_len:.0f}), median of {len(recs)} iterations:")
        print(f"  {total:.2f} s per RL step = generate {med['t_generate']:.2f} + grade {med['t_grade']:.2f} "
              f"+ train {med['t_train']:.2f} + sync {med['t_sync']:.2f}; {ours:,.0f} response tokens/s; "
              f"update token efficiency {eff:.2f}")
        if trl:
            res = subprocess.run([BENCH_PYTHON, os.path.join(REPO, "bench_trl.py"), "--model", model,
                                  "--questions", questions, "--group-size", "8", "--prompts-per-step", "16",
                                  "--max-new-tokens", str(max_new), "--steps", str(args.trl_steps),
                                  "--threads", str(args.nproc)],

                                 capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if res.returncode:
                sys.exit(f"bench.py train: the TRL run failed:\n{res.stderr[-3000:]}")
            t = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"  TRL {t['trl_version']} GRPOTrainer (Dr. GRPO loss, 1 process, {args.nproc} threads, HF "
                  f"generate): {t['sec_per_step']:.2f} s per step, mean length "
                  f"{t['completion_tokens_per_step'] / t['completions_per_step']:.0f}, "
                  f"{t['tokens_per_s']:,.0f} response tokens/s")
            print(f"  ours / TRL response tokens/s: {ours / t['tokens_per_s']:.2f}x"
                  + ("   (target >= 2.5x)" if name == "longtail" else ""))
