"""The run's settings: one flat Config whose field comments are `train.py --help`, the recipes, and the checks
that stop a bad setting with one line naming the flag, before any work starts (`fail`; `out_of_memory` ends a
phase that ran out of GPU memory the same way, naming the flags that lower it).

    python train.py --help                   # every flag, what it does, its default
    python train.py --recipe cpu_demo --help # the same, with that recipe's defaults
"""
import argparse
import contextlib
import dataclasses
import difflib
import inspect
import os
import re
import sys
import time
from dataclasses import dataclass, fields


@dataclass
class Config:
    # what to train
    algo: str = "drgrpo"                 # drgrpo (unbiased), grpo, or dapo (token-level; loss.py)
    model: str = "Qwen/Qwen2.5-Math-7B"  # HF hub name or local HF directory of the base model
    template: str = "qwen_math"          # prompt template (templates.py): qwen_math | r1 | no
    questions: str = "math_l3to5"        # question set: math12k | math_l3to5 | gsm8k | path/to/file.jsonl
    data_dir: str = "data/math"          # where data/prepare.py wrote the question sets
    # sampling (per policy iteration: rollout_batch prompts x group_size responses)
    rollout_batch: int = 128             # prompts per policy iteration, across all ranks
    group_size: int = 8                  # responses per prompt (G)
    temperature: float = 1.0             # sampling temperature (the trainer divides logits by it too)
    top_p: float = 1.0                   # nucleus sampling
    max_new_tokens: int = 3000           # generation budget; also Dr. GRPO's constant loss normaliser
    max_prompt_tokens: int = 1024        # longer prompts are skipped when the question set is loaded
    # update schedule
    train_batch: int = 128               # responses per optimizer step, all ranks (128 -> 8 steps/iteration)
    # 7B on an 80 GB GPU with checkpointing: each token keeps its 28 layer inputs (28 x 3,584 x 2 B = 0.2 MB)
    # plus one layer's recompute in backward (~0.45 MB: qkv, attention out, 2 x 18,944 MLP in bf16, fp32
    # norms), plus the head's chunks: 16k tokens ~ 13.5 GB beside the sharded weights, grads, AdamW (15 GB).
    max_tokens_per_micro_batch: int = 16384  # tokens (prompt + response) per packed row, one row per
                                         # forward/backward on a rank: memory only, not the trajectory
    ppo_epochs: int = 1                  # passes over each iteration's responses
    iterations: int = 200                # policy iterations to run
    passes: int = 20                     # stop earlier if the prompts have been gone through this many times
    # objective (loss.py)
    eps_low: float = 0.2                 # PPO clip, lower side
    eps_high: float = 0.2                # PPO clip, upper side (DAPO's clip-higher: 0.28)
    beta: float = 0.0                    # k3 KL weight to the initial model; 0 = no reference model at all
    overlong_filter: bool = False        # mask truncated responses out of the loss (DAPO)
    overlong_penalty: int = 0            # DAPO's soft overlong penalty over the budget's last N tokens;
                                         # 0 = off
    tis_cap: float = 0.0                 # truncated importance sampling against the sampler's log-probs, cap
                                         # C; 0 = off
    is_mode: str = "tis"                 # sampler/trainer mismatch, by w = p_old / p_sampler per token: tis
                                         # (weights min(w, --tis-cap), none if the cap is 0) | token-mask (a
                                         # token whose w is outside [--is-low, --is-high] leaves the loss) |
                                         # sequence-mask (a response whose geometric-mean w is outside it
                                         # leaves the loss whole); a mask with --tis-cap > 0 also weighs the
                                         # kept tokens by min(w, cap). Masked tokens still count in N
    is_low: float = 0.5                  # the masks' band, lower end
    is_high: float = 2.0                 # the masks' band, upper end
    ratio_level: str = "token"           # token, or sequence: one ratio per response (GSPO; eps 3e-4 / 4e-4)
    format_reward: float = 0.0           # + W for a response in the template's format (Open-R1: 0.2; paper 0)
    dynamic_sampling: bool = False       # DAPO: drop groups whose rewards are all equal, sample more prompts
    max_sampling_rounds: int = 3         # dynamic sampling: at most this many extra rounds per iteration
    ref_sync_every: int = 0              # beta > 0: move the reference toward the policy every K optimizer
                                         # steps; 0 = never
    ref_mixup_alpha: float = 1.0         # ... reference <- A * policy + (1 - A) * reference (1 = copy)
    # optimizer
    lr: float = 1e-6                     # AdamW learning rate
    lr_schedule: str = "constant"        # constant | cosine (to 10% at the last iteration)
    warmup_steps: int = 0                # linear warm-up, in optimizer steps
    weight_decay: float = 0.0            # AdamW weight decay (torch's default 0.01 is not the paper's)
    adam_beta1: float = 0.9              # AdamW beta1
    adam_beta2: float = 0.95             # AdamW beta2
    grad_clip: float = 1.0               # max global grad norm, after gradients are synchronised
    # evaluation, logging, checkpoints
    eval_file: str = "data/math/eval/math500.jsonl"  # held-out problems scored with the template's reward
    eval_every: int = 16                 # iterations between evaluations (also at the start and the end)
    eval_limit: int = 0                  # evaluate on the first N problems; 0 = all
    eval_n: int = 1                      # samples per problem (1 at temperature 0: the paper's protocol)
    eval_temperature: float = 0.0        # 0 = greedy
    eval_max_new_tokens: int = 3000      # evaluation generation budget
    out_dir: str = "ckpt"                # checkpoints (step_N/), metrics.jsonl and samples.jsonl go here
    save_every: int = 16                 # iterations between checkpoints (also at the end)
    keep: int = 3                        # checkpoints kept
    resume: bool = True                  # continue from the latest checkpoint in out_dir if there is one
    log_samples_every: int = 8           # iterations between writes of sample responses to samples.jsonl
    wandb: str = ""                      # wandb project name; empty = off (used only if wandb is installed)
    seed: int = 42                       # one seed for data order, sampling and init, shared by all ranks
    # system
    engine: str = "auto"                 # rollout engine: vllm | hf (transformers generate) | auto
    sampler_dtype: str = "auto"          # the engine's dtype: auto (bfloat16 on GPU, the trainer's float32 on
                                         # CPU) | bfloat16 | float32; bfloat16 on CPU: a real mismatch to try
                                         # --is-mode on
    gpu_memory_utilization: float = 0.35  # vLLM's share of each GPU (it sleeps during the update)
    eager: bool = False                  # vLLM without torch.compile and CUDA graphs: starts faster (a 135M
                                         # model on CPU: 22 s, not 102 s), generates slower
    grad_checkpointing: bool = True      # recompute activations in backward (long responses)
    grader_workers: int = 4              # grader processes per rank
    grader_timeout: float = 1.0          # seconds per response before its grader worker is killed
    threads: int = 0                     # torch threads per rank; 0 = cores / local ranks
    sleep_level: int = 2                 # vLLM during the update: 2 drops its weights (the sync rewrites
                                         # them), 1 keeps a copy in pinned host RAM (~15 GB per rank for 7B)
    dist_timeout_min: int = 60           # collective timeout in minutes (a 7B checkpoint on a network disk)
    recipe: str = "paper_7b"             # defaults to start from (below)


RECIPES = {
    "paper_7b": {},  # the dataclass defaults above
    "paper_1.5b": dict(model="Qwen/Qwen2.5-Math-1.5B", template="r1", questions="math12k", iterations=1900),
    # The CPU demo: the tiny model of data/demo.py on its synthetic task, 2 processes, minutes not days.
    "cpu_demo": dict(
        model="data/demo/model", questions="data/demo/train.jsonl", eval_file="data/demo/heldout.jsonl",
        rollout_batch=32, group_size=8, max_new_tokens=64, max_prompt_tokens=128, train_batch=128,
        # one row per rank and minibatch: packed attention costs nothing across sequences, so bigger rows
        # only save FSDP's per-micro-step collectives
        max_tokens_per_micro_batch=8192, iterations=100, lr=2e-4, warmup_steps=0, eval_every=20, eval_n=8,
        eval_temperature=1.0, eval_max_new_tokens=64, out_dir="runs/cpu_demo", save_every=20,
        log_samples_every=10, grad_checkpointing=False, grader_workers=1, threads=1),
}
# The length-bias demo (data/demo_length.py, README): wrong answers of two lengths, time for lengths to move.
RECIPES["cpu_length"] = dict(
    RECIPES["cpu_demo"], model="data/demo_length/model", questions="data/demo_length/train.jsonl",
    eval_file="data/demo_length/heldout.jsonl", max_new_tokens=96, eval_max_new_tokens=96, lr=1e-4,
    iterations=80, eval_every=40, save_every=40, out_dir="runs/cpu_length")


def field_help() -> dict:
    """Each Config field's trailing comment, with its comment-only continuation lines, read from the source:
    the comments are the documentation, so `--help` cannot drift from them."""
    helps, name = {}, None
    for line in inspect.getsource(Config).splitlines():
        m = re.match(r"    (\w+): \w+ = .*?  # (.*)$", line)
        if m:
            name, helps[m[1]] = m[1], m[2].strip()
        elif name and re.match(r" {20,}# ", line):  # a continuation, aligned under the comment
            helps[name] += " " + line.strip()[2:]
        else:
            name = None
    return helps


def recipe_help() -> str:
    """--recipe's help: each recipe and the defaults it changes."""
    changes = {name: ", ".join(f"{k}={v}" for k, v in r.items()) for name, r in RECIPES.items()}
    return "defaults to start from: " + "; ".join(f"{n}: {c or 'the paper 7B defaults'}"
                                                  for n, c in changes.items())


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line of ours, printed once (fail), with the nearest flag for a misspelt
    one, instead of its usage block per rank."""
    def error(self, message):
        flags = [f for action in self._actions for f in action.option_strings]
        given = re.findall(r"--[\w-]+", message)
        near = difflib.get_close_matches(given[0], flags, n=1) if given and given[0] not in flags else []
        hint = "; python train.py --help lists every flag" if "unrecognized" in message else ""
        fail(message + (f" (did you mean {near[0]}?)" if near else "") + hint)


def parse_config(argv=None) -> Config:
    """CLI flags > recipe > dataclass defaults. Unknown flags and bad values stop with one line."""
    pre = Parser(add_help=False, allow_abbrev=False)
    pre.add_argument("--recipe", default=Config.recipe)
    known, _ = pre.parse_known_args(argv)
    if known.recipe not in RECIPES:
        fail(f"--recipe {known.recipe!r} is not one of {', '.join(RECIPES)}")
    defaults = {f.name: f.default for f in fields(Config)} | RECIPES[known.recipe] | {"recipe": known.recipe}
    p = Parser(usage="train.py [--flag VALUE ...]  (torchrun --nproc_per_node N train.py ...)",
               allow_abbrev=False,  # --iter would silently mean --iterations; --eval, one of six flags
               description="R1-Zero RL with Dr. GRPO / GRPO / DAPO (README.md). Defaults: "
                           "the paper's 7B recipe, or those of --recipe.")
    helps = field_help() | {"recipe": recipe_help()}
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = _parse_bool if f.type is bool else f.type  # int, float or str
        p.add_argument(flag, type=kind, default=defaults[f.name], metavar=f.type.__name__.upper(),
                       help=helps[f.name].replace("%", "%%") + " (default: %(default)s)")
    cfg = Config(**vars(p.parse_args(argv)))
    err = check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    if err:
        fail(err)
    return cfg


def fail(msg: str, prog: str = "train.py"):
    """A config or data error: one line, by rank 0. The other ranks wait for torchrun to stop them (rank 0 may
    get here seconds after them); one still alive 20 s later failed alone, and says why. eval.py's too."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        sys.exit(f"{prog}: {msg}")
    time.sleep(20)  # still alive: rank 0 did not fail with us (e.g. a file missing on this node only)
    sys.exit(f"{prog}: rank {rank}: {msg}")


@contextlib.contextmanager
def out_of_memory(phase: str, size: str, flags: str):
    """Out of GPU memory in a phase: one line naming it, the size that failed, and the flags that lower it."""
    import torch
    try:
        yield
    except torch.OutOfMemoryError:
        fail(f"out of GPU memory in {phase} ({size}); lower it with {flags}")


def _parse_bool(s: str) -> bool:
    if s.lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")
    return s.lower() in ("1", "true", "yes")


# Counts that must be at least 1. grader_workers too: 0 would grade in-process with no time limit, and model
# output must not hang a rank.
AT_LEAST_ONE = ("rollout_batch", "train_batch", "iterations", "passes", "max_tokens_per_micro_batch",
                "max_new_tokens", "max_prompt_tokens", "ppo_epochs", "eval_every", "eval_n",
                "eval_max_new_tokens", "save_every", "keep", "log_samples_every", "grader_workers",
                "dist_timeout_min")


def check_config(cfg: Config, world: int) -> str:
    """The first inconsistency, naming the flag; '' if none. Runs before any work starts."""
    from templates import TEMPLATES
    if cfg.algo not in ("grpo", "drgrpo", "dapo"):
        return f"--algo must be grpo, drgrpo or dapo, got {cfg.algo!r}"
    if cfg.ratio_level not in ("token", "sequence"):
        return f"--ratio-level must be token or sequence, got {cfg.ratio_level!r}"
    if cfg.template not in TEMPLATES or not TEMPLATES[cfg.template].train:
        return f"--template {cfg.template!r} is not a training template (qwen_math, r1, no)"
    for name in AT_LEAST_ONE:
        if getattr(cfg, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    if cfg.rollout_batch % world:
        return (f"--rollout-batch {cfg.rollout_batch} prompts do not split into whole groups over "
                f"{world} ranks")
    responses = cfg.rollout_batch * cfg.group_size
    if cfg.train_batch < world:
        return f"--train-batch {cfg.train_batch} is below the {world} ranks: some would have nothing to train"
    if responses % cfg.train_batch:  # equal minibatches; they are split over ranks by tokens, not by count
        return (f"--train-batch {cfg.train_batch} must divide the {responses} responses of an iteration "
                f"(--rollout-batch x --group-size)")
    if cfg.group_size < 2:
        return "--group-size must be at least 2 (advantages are relative to the group)"
    for name in ("temperature", "grad_clip", "lr"):  # temperature 0 would be greedy: G identical samples
        if getattr(cfg, name) <= 0:
            return f"--{name.replace('_', '-')} must be > 0"
    if not 0 < cfg.top_p <= 1:
        return "--top-p must be in (0, 1]"
    if not (0 <= cfg.eps_low < 1 and cfg.eps_high >= 0):
        return "--eps-low must be in [0, 1) and --eps-high >= 0"
    if min(cfg.warmup_steps, cfg.eval_limit, cfg.beta, cfg.tis_cap, cfg.eval_temperature, cfg.format_reward,
           cfg.max_sampling_rounds, cfg.ref_sync_every) < 0:
        return ("--warmup-steps, --eval-limit, --beta, --tis-cap, --eval-temperature, --format-reward, "
                "--max-sampling-rounds and --ref-sync-every must be >= 0")
    if cfg.beta == 0 and (cfg.ref_sync_every or cfg.ref_mixup_alpha != 1.0):
        return ("--ref-sync-every and --ref-mixup-alpha need --beta > 0 (with beta 0 there is no reference "
                "model)")
    if not 0 < cfg.ref_mixup_alpha <= 1:
        return "--ref-mixup-alpha must be in (0, 1]"
    if cfg.sleep_level not in (1, 2):
        return f"--sleep-level must be 1 or 2, got {cfg.sleep_level}"
    if cfg.lr_schedule not in ("constant", "cosine"):
        return f"--lr-schedule must be constant or cosine, got {cfg.lr_schedule!r}"
    if cfg.engine not in ("auto", "vllm", "hf"):
        return f"--engine must be auto, vllm or hf, got {cfg.engine!r}"
    if cfg.is_mode not in ("tis", "token-mask", "sequence-mask"):
        return f"--is-mode must be tis, token-mask or sequence-mask, got {cfg.is_mode!r}"
    if not 0 < cfg.is_low <= 1 <= cfg.is_high:
        return f"--is-low {cfg.is_low} and --is-high {cfg.is_high} must bracket 1 (0 < low <= 1 <= high)"
    if cfg.sampler_dtype not in ("auto", "bfloat16", "float32"):
        return f"--sampler-dtype must be auto, bfloat16 or float32, got {cfg.sampler_dtype!r}"
    if not 0 <= cfg.overlong_penalty < cfg.max_new_tokens:
        return "--overlong-penalty must be in [0, --max-new-tokens)"
    return ""


# Run management and memory knobs: the trajectory does not depend on them, so a resumed run may change them.
RESUME_MAY_CHANGE = {"iterations", "passes", "max_tokens_per_micro_batch", "grad_checkpointing", "threads",
                     "sleep_level", "dist_timeout_min", "grader_workers", "grader_timeout", "eager",
                     "gpu_memory_utilization", "out_dir", "resume", "save_every", "keep", "log_samples_every",
                     "wandb", "recipe", "eval_file", "eval_every", "eval_limit", "eval_n", "eval_temperature",
                     "eval_max_new_tokens"}


def resume_error(cfg: Config, saved: dict, saved_world: int, world: int) -> str:
    """Why the checkpoint's run cannot go on as this one ('' if it can): a different world size, or a
    setting that changes the trajectory (seed, data, objective, schedule...) would silently make another
    run."""
    if saved_world != world:
        return f"the checkpoint was written by {saved_world} ranks, this run has {world}"
    now = dataclasses.asdict(cfg)
    diff = [f"--{k.replace('_', '-')} {saved[k]} (now {now[k]})" for k in now
            if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    if not diff:
        return ""
    return f"the checkpoint's run had {', '.join(diff)}; resume with the same values or a new --out-dir"
