"""Speed and memory figures, one subcommand per concern (like nanoGPT's bench.py).

    python bench.py grader     # accuracy vs Math-Verify, responses/s, latency percentiles
    python bench.py step       # one update step: chunked log-probs vs naive full log_softmax
    python bench.py rollout    # tokens/s of our vLLM engine vs raw vLLM vs the transformers fallback
    python bench.py pack       # one update step, padded vs packed: real/computed tokens, time ratio
    python bench.py skip       # the update with a share of zero-advantage responses: skipped vs computed
    python bench.py train      # seconds per RL step on a fixed CPU workload, and its split
    python bench.py gpu        # one GPU, Qwen2.5-1.5B's shape: update tok/s, MFU, peak memory, generate, save
    python bench.py memory     # policy set-up's host memory, 2 ranks: a model per rank vs meta + broadcast

Timings on shared 2-core machines are noisy: every figure is a median over >= 5 runs, variants interleaved.
Each run first prints the host's CPU and its fp32 matmul speed on one core at that moment: on this shared
machine it moved between about 45 and 92 GFLOPS within an hour, and `bench.py train` of one commit by 1.6x
with it.

Each command lives in benchmarks/<name>.py; what several share is in benchmarks/common.py.
"""
import sys

from benchmarks import gpu, grader, memory, pack, rollout, skip, step, train
from benchmarks.common import host

COMMANDS = {"grader": grader.bench_grader, "step": step.bench_step, "pack": pack.bench_pack,
            "memory": memory.bench_memory, "rollout": rollout.bench_rollout, "train": train.bench_train,
            "gpu": gpu.bench_gpu, "skip": skip.bench_skip}  # name -> function(argv); each in benchmarks/<name>.py

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python bench.py {{{'|'.join(COMMANDS)}}} [options]")
    if "--worker" not in sys.argv:  # the parent prints it once
        print(host())
    COMMANDS[sys.argv[1]](sys.argv[2:])
