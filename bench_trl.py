"""Time TRL's GRPOTrainer (Dr. GRPO, plain transformers generate, CPU, fp32, one process) on a fixed workload.
The yardstick of `bench.py train`, which runs it inside .venv-bench (TRL is not a dependency of this codebase).

Each optimizer step samples P prompts x G completions (one generate call), scores them with a rule reward, and
takes one AdamW step. Prints per-step lines on stderr and exactly one JSON line on stdout at the end:
  {"steps", "sec_per_step", "completion_tokens_per_step", "tokens_per_s", "trl_version", "transformers_version", ...}

  .venv-bench/bin/python bench_trl.py --model DIR --questions q.jsonl \
      --group-size 8 --prompts-per-step 16 --max-new-tokens 128 --steps 7 --threads 2
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

QWEN_MATH = ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
             "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local HF Qwen2 directory (weights + tokenizer)")
    p.add_argument("--questions", required=True, help='jsonl, rows {"problem": ..., "answer": ...}')
    p.add_argument("--group-size", type=int, default=8, help="G: completions per prompt (num_generations)")
    p.add_argument("--prompts-per-step", type=int, default=16, help="P: prompts per optimizer step")
    p.add_argument("--max-new-tokens", type=int, default=128, help="M: max_completion_length")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps; the first is warm-up, not counted")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="rows per forward/backward (0: all P*G rows at once); P*G must be a multiple of it")
    p.add_argument("--template", choices=("qwen_math", "none"), default="qwen_math",
                   help="qwen_math falls back to the bare problem if the tokenizer lacks <|im_start|>")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error("--steps must be >= 2 (the first is warm-up)")
    if a.group_size < 2:
        p.error("--group-size must be >= 2")
    n = a.group_size * a.prompts_per_step
    a.micro_batch = a.micro_batch or n
    if n % a.micro_batch:
        p.error(f"P*G={n} is not a multiple of --micro-batch {a.micro_batch}")
    return a


def last_boxed(text: str):
    """Contents of the last \\boxed{...} (brace-balanced), or None."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    j, depth = i + len("\\boxed{"), 1
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j:k]
    return None


def main(argv=None):
    args = parse_args(argv)
    # Thread counts must be fixed before torch starts its pools.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    torch.set_num_threads(args.threads)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    has_im = "<|im_start|>" in tok.get_vocab()
    use_template = args.template == "qwen_math" and has_im
    rows = [json.loads(line) for line in open(args.questions) if line.strip()]
    prompts = [QWEN_MATH.format(q=r["problem"]) if use_template else r["problem"] for r in rows]
    ds = Dataset.from_dict({"prompt": prompts, "answer": [str(r["answer"]) for r in rows]})

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    gen_times = []  # seconds inside model.generate, per call (one call per step here)
    _generate = model.generate

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        try:
            return _generate(*a, **kw)
        finally:
            gen_times.append(time.perf_counter() - t)

    model.generate = timed_generate

    n_per_step = args.prompts_per_step * args.group_size
    step_tokens = []  # completion tokens of each generation batch (= each optimizer step), in order

    def boxed_reward(prompts, completions, completion_ids, answer, **kwargs):
        # completion_ids: TRL's token ids of each completion (EOS included when it stopped on one)
        step_tokens.append(sum(len(ids) for ids in completion_ids))
        out = []
        for c, gold in zip(completions, answer):
            box = last_boxed(c)
            out.append(1.0 if box is not None and gold.strip() in box else 0.0)
        return out

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.times, self.logs = None, [], []

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            dt = time.perf_counter() - self.t0
            self.times.append(dt)
            toks = step_tokens[len(self.times) - 1] if len(step_tokens) >= len(self.times) else None
            g = gen_times[len(self.times) - 1] if len(gen_times) >= len(self.times) else float("nan")
            print(f"[trl_grpo_bench] step {state.global_step}: {dt:.2f} s (generate {g:.2f} s), {toks} completion tokens",
                  file=sys.stderr, flush=True)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.logs.append(dict(logs))

    cfg = GRPOConfig(
        output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "trl_grpo_bench_out"),
        # Dr. GRPO: token-sum / (rows * max_completion_length) loss, advantages not divided by the group std
        loss_type="dr_grpo",
        scale_rewards="none",
        beta=0.0,
        num_generations=args.group_size,
        num_iterations=1,
        # one optimizer step = one generate call of P*G completions, split into micro-batches for fwd/bwd
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=n_per_step // args.micro_batch,
        generation_batch_size=n_per_step,
        max_steps=args.steps,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=args.max_new_tokens,
        use_vllm=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
    )
    assert cfg.generation_batch_size == n_per_step and cfg.steps_per_generation == cfg.gradient_accumulation_steps

    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=boxed_reward, args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[timer])
    print(f"[trl_grpo_bench] trl {trl.__version__}, transformers {transformers.__version__}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, template {'qwen_math' if use_template else 'none'}"
          f", P={args.prompts_per_step} G={args.group_size} M={args.max_new_tokens} steps={args.steps} "
          f"micro-batch={args.micro_batch}", file=sys.stderr, flush=True)
    t_all = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the one JSON line
        trainer.train()
    wall = time.perf_counter() - t_all

    if len(timer.times) != args.steps or len(step_tokens) != args.steps:
        sys.exit(f"trl_grpo_bench: expected {args.steps} steps and generation batches, got "
                 f"{len(timer.times)} timed steps and {len(step_tokens)} reward calls")
    times, toks = timer.times[1:], step_tokens[1:]
    logged = [round(l["completions/mean_length"] * n_per_step) for l in timer.logs][1:]
    result = {
        "steps": len(times),
        "sec_per_step": statistics.median(times),
        "completion_tokens_per_step": statistics.median(toks),
        "tokens_per_s": sum(toks) / sum(times),
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "completions_per_step": n_per_step,
        "generate_sec_per_step": statistics.median(gen_times[1:]) if len(gen_times) == args.steps else None,
        "step_seconds": [round(t, 3) for t in times],
        "step_completion_tokens": toks,
        "logged_completion_tokens": logged,  # completions/mean_length x P*G, a cross-check of the counts above
        "wall_s_train": round(wall, 2),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
