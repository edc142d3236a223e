"""Speed and memory figures, one subcommand per concern (like nanoGPT's bench.py).

    python bench.py grader     # accuracy vs Math-Verify, responses/s, latency percentiles
    python bench.py step       # one update step: chunked log-probs vs naive full log_softmax
    python bench.py rollout    # tokens/s of our vLLM engine vs raw vLLM vs the transformers fallback
    python bench.py train      # seconds per RL step on a fixed CPU workload, and its split

Timings on shared 2-core machines are noisy: every figure is a median over >= 5 runs, variants interleaved.
"""
import sys

# ---- grader ----------------------------------------------------------------------------------------------
# (BENCH-GRADER)

# ---- step ------------------------------------------------------------------------------------------------
# (BENCH-STEP)

# ---- rollout ---------------------------------------------------------------------------------------------
# (BENCH-ROLLOUT)

# ---- train -----------------------------------------------------------------------------------------------
# (BENCH-TRAIN)

COMMANDS = {}  # name -> function(argv); each section above registers itself: COMMANDS["grader"] = bench_grader

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python bench.py {{{'|'.join(COMMANDS) or 'grader|step|rollout|train'}}} [options]")
    COMMANDS[sys.argv[1]](sys.argv[2:])
