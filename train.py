"""R1-Zero-style RL of a base model: sample -> grade -> advantage -> update, with GRPO or Dr. GRPO.

    torchrun --nproc_per_node 8 train.py --algo drgrpo             # the paper's Qwen2.5-Math-7B recipe (default)
    torchrun --nproc_per_node 8 train.py --recipe paper_1.5b       # Qwen2.5-Math-1.5B, r1 template, MATH 12k
    torchrun --nproc_per_node 2 train.py --recipe cpu_demo         # the tiny CPU demo (make demo)

Every rank holds an FSDP2 shard of the policy and a whole colocated inference engine (vLLM), which samples for
that rank's share of the prompts, sleeps during the update, and wakes up with the new weights. The loop below
is the whole algorithm; loss.py holds the objectives side by side, packing.py how responses become rows.
"""
import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, fields

# Quiet by default (the user's environment wins): vLLM's CPU build warns about NUMA binding from C++ at start.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# ------------------------------------------------------------------------------------------------------------
# Config: one flat dataclass; argparse is generated from it (dashes on the CLI); recipes override defaults.


@dataclass
class Config:
    # what to train
    algo: str = "drgrpo"                  # "drgrpo" (unbiased), "grpo", or "dapo" (token-level; loss.py)
    model: str = "Qwen/Qwen2.5-Math-7B"   # HF hub name or local HF directory of the base model
    template: str = "qwen_math"           # prompt template (templates.py): qwen_math | r1 | no
    questions: str = "math_l3to5"         # question set: math12k | math_l3to5 | gsm8k | path/to/file.jsonl
    data_dir: str = "data/math"           # where data/prepare.py wrote the question sets
    # sampling (per policy iteration: rollout_batch prompts x group_size responses)
    rollout_batch: int = 128              # prompts per policy iteration, across all ranks
    group_size: int = 8                   # responses per prompt (G)
    temperature: float = 1.0              # sampling temperature (the trainer divides logits by it too)
    top_p: float = 1.0                    # nucleus sampling
    max_new_tokens: int = 3000            # generation budget; also Dr. GRPO's constant loss normaliser
    max_prompt_tokens: int = 1024         # longer prompts are skipped when the question set is loaded
    # update schedule
    train_batch: int = 128                # responses per optimizer step, across all ranks (128 -> 8 steps/iter)
    # Tokens (prompt + response) per packed row, one row per forward/backward on a rank (memory only). 7B on an
    # 80 GB GPU with checkpointing: each token keeps its 28 layer inputs (28 x 3,584 x 2 B = 0.2 MB) plus one
    # layer's recompute in backward (~0.45 MB: qkv, attention out, 2 x 18,944 MLP in bf16, fp32 norms), plus the
    # head's chunks: 16k tokens ~ 13.5 GB beside the sharded weights, grads, AdamW (15 GB) (README: memory table).
    max_tokens_per_micro_batch: int = 16384
    ppo_epochs: int = 1                   # passes over each iteration's responses
    iterations: int = 200                 # policy iterations to run
    passes: int = 20                      # stop earlier if the prompts have been gone through this many times
    # objective (loss.py)
    eps_low: float = 0.2                  # PPO clip, lower side
    eps_high: float = 0.2                 # PPO clip, upper side (DAPO's clip-higher: 0.28)
    beta: float = 0.0                     # k3 KL weight to the initial model; 0 = no reference model at all
    overlong_filter: bool = False         # mask truncated responses out of the loss (DAPO)
    overlong_penalty: int = 0             # DAPO soft overlong penalty over the last N tokens of the budget; 0 = off
    tis_cap: float = 0.0                  # truncated importance sampling vs the sampler's log-probs, cap C; 0 = off
    ratio_level: str = "token"            # "sequence": one ratio per response (GSPO; its eps: 3e-4 / 4e-4)
    format_reward: float = 0.0            # + W for a response in the template's format (Open-R1: 0.2); paper: 0
    dynamic_sampling: bool = False        # DAPO: drop groups whose rewards are all equal and sample more prompts
    max_sampling_rounds: int = 3          # dynamic sampling: at most this many extra rounds per iteration
    ref_sync_every: int = 0               # beta > 0: move the reference toward the policy every K optimizer steps
    ref_mixup_alpha: float = 1.0          # ... reference <- A * policy + (1 - A) * reference (1 = copy)
    # optimizer
    lr: float = 1e-6                      # AdamW learning rate
    lr_schedule: str = "constant"         # constant | cosine (to 10% at the last iteration)
    warmup_steps: int = 0                 # linear warm-up, in optimizer steps
    weight_decay: float = 0.0             # AdamW weight decay (torch's default 0.01 is not the paper's)
    adam_beta1: float = 0.9               # AdamW beta1
    adam_beta2: float = 0.95              # AdamW beta2
    grad_clip: float = 1.0                # max global grad norm, after gradients are synchronised
    # evaluation, logging, checkpoints
    eval_file: str = "data/math/eval/math500.jsonl"  # held-out problems scored with the template's reward
    eval_every: int = 16                  # iterations between evaluations (also at the start and the end)
    eval_limit: int = 0                   # evaluate on the first N problems; 0 = all
    eval_n: int = 1                       # samples per problem (1 + temperature 0 = the paper's greedy protocol)
    eval_temperature: float = 0.0         # 0 = greedy
    eval_max_new_tokens: int = 3000       # evaluation generation budget
    out_dir: str = "ckpt"                 # checkpoints (step_N/), metrics.jsonl and samples.jsonl go here
    save_every: int = 16                  # iterations between checkpoints (also at the end)
    keep: int = 3                         # checkpoints kept
    resume: bool = True                   # continue from the latest checkpoint in out_dir if there is one
    log_samples_every: int = 8            # iterations between writes of sample responses to samples.jsonl
    wandb: str = ""                       # wandb project name; empty = off (used only if wandb is installed)
    seed: int = 42                        # one seed for data order, sampling seeds and init, shared by all ranks
    # system
    engine: str = "auto"                  # rollout engine: vllm | hf (transformers generate) | auto
    gpu_memory_utilization: float = 0.35  # vLLM's share of each GPU (it sleeps during the update)
    grad_checkpointing: bool = True       # recompute activations in backward (long responses)
    grader_workers: int = 4               # grader processes per rank
    grader_timeout: float = 1.0           # seconds per response before its grader worker is killed
    threads: int = 0                      # torch threads per rank; 0 = cores / local ranks
    sleep_level: int = 2                  # vLLM during the update: 2 drops its weights (the sync rewrites them), 1
                                          # keeps a copy in pinned host RAM (~15 GB per rank for 7B)
    dist_timeout_min: int = 60            # collective timeout; a 7B checkpoint (~100 GB) on a network disk: minutes
    recipe: str = "paper_7b"              # defaults to start from: paper_7b | paper_1.5b | cpu_demo


RECIPES = {
    "paper_7b": {},  # the dataclass defaults above
    "paper_1.5b": dict(model="Qwen/Qwen2.5-Math-1.5B", template="r1", questions="math12k", iterations=1900),
    # The CPU demo: the tiny model of data/demo.py on its synthetic task, 2 processes, minutes not days.
    "cpu_demo": dict(
        model="data/demo/model", questions="data/demo/train.jsonl", eval_file="data/demo/heldout.jsonl",
        rollout_batch=32, group_size=8, max_new_tokens=64, max_prompt_tokens=128, train_batch=128,
        # one row per rank and minibatch: packed attention costs nothing across sequences, so bigger rows only
        # save FSDP's per-micro-step collectives
        max_tokens_per_micro_batch=8192, iterations=100, lr=2e-4, warmup_steps=0, eval_every=20, eval_n=8,
        eval_temperature=1.0, eval_max_new_tokens=64, out_dir="runs/cpu_demo", save_every=20, log_samples_every=10,
        grad_checkpointing=False, grader_workers=1, threads=1),
}
# The length-bias demo (data/demo_length.py, README): wrong answers of two lengths, time for lengths to move.
RECIPES["cpu_length"] = dict(
    RECIPES["cpu_demo"], model="data/demo_length/model", questions="data/demo_length/train.jsonl",
    eval_file="data/demo_length/heldout.jsonl", max_new_tokens=96, eval_max_new_tokens=96, lr=1e-4, iterations=80,
    eval_every=40, save_every=40, out_dir="runs/cpu_length")


def parse_config(argv=None) -> Config:
    """CLI flags > recipe > dataclass defaults. Unknown flags and bad values stop with one line."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=Config.recipe)
    known, _ = pre.parse_known_args(argv)
    if known.recipe not in RECIPES:
        fail(f"--recipe {known.recipe!r} is not one of {', '.join(RECIPES)}")
    defaults = {**{f.name: f.default for f in fields(Config)}, **RECIPES[known.recipe], "recipe": known.recipe}
    p = argparse.ArgumentParser(description="R1-Zero RL with GRPO / Dr. GRPO (see Config for every flag)")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = _parse_bool if f.type is bool else f.type  # int, float or str
        p.add_argument(flag, type=kind, default=defaults[f.name], metavar=f.type.__name__.upper())
    cfg = Config(**vars(p.parse_args(argv)))
    err = check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    if err:
        fail(err)
    return cfg


def fail(msg: str):
    """A config or data error: one line, by rank 0. The other ranks wait for torchrun to stop them (rank 0 may
    get here seconds after them); one still alive 20 s later failed alone, and says why."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        sys.exit(f"train.py: {msg}")
    time.sleep(20)  # still alive: rank 0 did not fail with us (e.g. a file missing on this node only)
    sys.exit(f"train.py: rank {rank}: {msg}")


def _parse_bool(s: str) -> bool:
    if s.lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")
    return s.lower() in ("1", "true", "yes")


def check_config(cfg: Config, world: int) -> str:
    """The first inconsistency, naming the flag; '' if none. Runs before any work starts."""
    from templates import TEMPLATES
    if cfg.algo not in ("grpo", "drgrpo", "dapo"):
        return f"--algo must be grpo, drgrpo or dapo, got {cfg.algo!r}"
    if cfg.ratio_level not in ("token", "sequence"):
        return f"--ratio-level must be token or sequence, got {cfg.ratio_level!r}"
    if cfg.template not in TEMPLATES or not TEMPLATES[cfg.template].train:
        return f"--template {cfg.template!r} is not a training template (qwen_math, r1, no)"
    # grader_workers >= 1: workers=0 grades in-process with no time limit, and model output must not hang a rank
    for name in ("rollout_batch", "train_batch", "iterations", "passes", "max_tokens_per_micro_batch",
                 "max_new_tokens", "max_prompt_tokens", "ppo_epochs", "eval_every", "eval_n", "eval_max_new_tokens",
                 "save_every", "keep", "log_samples_every", "grader_workers", "dist_timeout_min"):
        if getattr(cfg, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    if cfg.rollout_batch % world:
        return f"--rollout-batch {cfg.rollout_batch} prompts do not split into whole groups over {world} ranks"
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
        return "--ref-sync-every and --ref-mixup-alpha need --beta > 0 (with beta 0 there is no reference model)"
    if not 0 < cfg.ref_mixup_alpha <= 1:
        return "--ref-mixup-alpha must be in (0, 1]"
    if cfg.sleep_level not in (1, 2):
        return f"--sleep-level must be 1 or 2, got {cfg.sleep_level}"
    if cfg.lr_schedule not in ("constant", "cosine"):
        return f"--lr-schedule must be constant or cosine, got {cfg.lr_schedule!r}"
    if cfg.engine not in ("auto", "vllm", "hf"):
        return f"--engine must be auto, vllm or hf, got {cfg.engine!r}"
    if not 0 <= cfg.overlong_penalty < cfg.max_new_tokens:
        return "--overlong-penalty must be in [0, --max-new-tokens)"
    return ""


# Run management and memory knobs: the trajectory does not depend on them, so a resumed run may change them.
RESUME_MAY_CHANGE = {"iterations", "passes", "max_tokens_per_micro_batch", "grad_checkpointing", "threads",
                     "sleep_level", "dist_timeout_min",
                     "grader_workers", "grader_timeout", "gpu_memory_utilization", "out_dir", "resume", "save_every",
                     "keep", "log_samples_every", "wandb", "recipe", "eval_file", "eval_every", "eval_limit", "eval_n",
                     "eval_temperature", "eval_max_new_tokens"}


def resume_error(cfg: Config, saved: dict, saved_world: int, world: int) -> str:
    """Why the checkpoint's run cannot go on as this one ('' if it can): a different world size, or a
    setting that changes the trajectory (seed, data, objective, schedule...) would silently make another run."""
    if saved_world != world:
        return f"the checkpoint was written by {saved_world} ranks, this run has {world}"
    now = dataclasses.asdict(cfg)
    diff = [f"--{k.replace('_', '-')} {saved[k]} (now {now[k]})" for k in now
            if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    return f"the checkpoint's run had {', '.join(diff)}; resume with the same values or a new --out-dir" if diff else ""


# ------------------------------------------------------------------------------------------------------------
# Data: a jsonl question set, and an order that every rank derives from the one shared seed.


def load_questions(path: str, tokenizer, template: str, max_prompt_tokens: int):
    """Rows {problem, answer} with their rendered prompts; a malformed row stops with file:line."""
    from data.prepare import DataError, read_jsonl
    from templates import render
    try:
        rows = read_jsonl(path)
    except DataError as e:
        fail(str(e))
    if not rows:
        fail(f"{path} has no questions")
    for r in rows:
        r["prompt"] = render(template, r["problem"], tokenizer)
    lengths = [len(ids) for ids in tokenizer([r["prompt"] for r in rows])["input_ids"]]
    rows = [r for r, n in zip(rows, lengths) if n <= max_prompt_tokens]
    if not rows:
        fail(f"{path} has no question whose prompt fits in --max-prompt-tokens {max_prompt_tokens}")
    return rows


def iteration_prompts(n_rows: int, iteration: int, rollout_batch: int, seed: int):
    """Global prompt indices of one iteration: consecutive slices of a permutation per pass over the data,
    reshuffled each pass. A pure function of (iteration, seed), so resume needs only the iteration number."""
    start = iteration * rollout_batch
    out = []
    while len(out) < rollout_batch:
        epoch, offset = divmod(start + len(out), n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out += perm[offset:offset + rollout_batch - len(out)].tolist()
    return out


def extra_prompts(n_rows: int, iteration: int, round_: int, k: int, seed: int) -> list:
    """Dynamic sampling's further prompts: k indices from a permutation keyed by (seed, iteration, round)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + iteration) * 1_009 + round_)
    return torch.randperm(n_rows, generator=g).repeat(math.ceil(k / n_rows))[:k].tolist()


def request_seed(seed: int, iteration: int, position: int, round_: int = 0) -> int:
    """Each request carries its own sampling seed, so a resumed run samples exactly what it would have. Keyed by
    the prompt's position in the iteration, not its index: a prompt that appears twice in one iteration (at the
    end of a pass) must get two different groups, not the same one twice. Dynamic sampling's rounds are apart."""
    return (seed * 1_000_003 + iteration * 7_919 + position + round_ * 1_000_000_007) % (2 ** 31 - 1)


# ------------------------------------------------------------------------------------------------------------
# Distributed helpers: one process group, the same code with one CPU process or 8 GPUs.


def exit_with_parent(parent: int):
    """torchrun starts its ranks in their own sessions: killing torchrun's process group (a scheduler, a closed
    terminal) does not reach them. A daemon thread watches the parent and, once it is gone, kills this rank's
    process group (itself and its grader workers). A checkpoint being written stays .tmp-step_N (removed later)."""
    import signal
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        if os.getpgid(0) == os.getpid():  # a group of our own (torchrun's ranks): workers and all
            os.killpg(0, signal.SIGKILL)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def all_sum(values: dict, device) -> dict:
    """Sum named numbers (floats or 0-d tensors) over ranks: metrics are sent as sums and counts, then divided."""
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def print0(*args, rank: int = 0):
    if rank == 0:
        print(*args, flush=True)


def make_scheduler(opt, cfg: Config, total_steps: int):
    def factor(step):
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "cosine":
            return warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps)))))
        return warm
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def shape_rewards(correct, formatted, truncated, lengths, max_new_tokens: int, overlong_penalty: int,
                  format_reward: float):
    """Training reward from the grader's 0/1, plus format_reward for the template's format: a truncated response
    gets 0 (it never finished its answer), and with DAPO's soft overlong penalty the reward falls linearly to -1
    over the last `overlong_penalty` tokens."""
    rewards = torch.where(truncated, 0.0, correct + format_reward * formatted)  # (B,)
    if overlong_penalty:
        rewards = rewards - (lengths - (max_new_tokens - overlong_penalty)).clamp(min=0) / overlong_penalty
    return rewards


def gather_all(obj, world: int) -> list:
    """Every rank's obj, in rank order (any picklable value; a list of one on a single process)."""
    if world == 1:
        return [obj]
    parts = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def generate_and_grade(engine, pool, rows, seeds, cfg: Config, template, round_: int) -> dict:
    """Steps 2-3 for one round of prompts: G responses per row (seeded per request), graded, group-major."""
    from eval import is_reflective
    groups = engine.generate([r["prompt"] for r in rows], n=cfg.group_size, temperature=cfg.temperature,
                             top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, stop=template.stop, seeds=seeds)
    comps = [c for g in groups for c in g]                                       # B = len(rows) * G
    t = time.time()
    graded = pool.rewards([c.text for c in comps], [r["answer"] for r in rows for _ in range(cfg.group_size)],
                          cfg.template)
    correct = torch.tensor([r for r, _ in graded])                               # (B,)
    formatted = torch.tensor([float(f) for _, f in graded])                      # (B,)
    truncated = torch.tensor([c.truncated for c in comps], dtype=torch.bool)     # (B,)
    lengths = torch.tensor([len(c.token_ids) for c in comps], dtype=torch.float)  # (B,)
    rewards = shape_rewards(correct, formatted, truncated, lengths, cfg.max_new_tokens, cfg.overlong_penalty,
                            cfg.format_reward)                                   # (B,)
    r = rewards.view(-1, cfg.group_size)                                         # (B/G, G)
    return {"rows": list(rows), "comps": comps, "correct": correct, "formatted": formatted, "truncated": truncated,
            "lengths": lengths, "rewards": rewards,
            "informative": (r.amax(1) > r.amin(1)).repeat_interleave(cfg.group_size),  # (B,) the group differs
            "round": torch.full((len(comps),), round_), "t_grade": [time.time() - t],
            "reflective": torch.tensor([is_reflective(c.text) for c in comps], dtype=torch.float)}  # (B,)


def loss_normaliser(algo: str, seqs: list, idx: list) -> int:
    """N of one optimizer minibatch (global): its responses, or for DAPO its response tokens in the loss (>= 1)."""
    if algo == "dapo":
        return max(1, sum(len(seqs[i]["ids"]) - seqs[i]["prompt"] for i in idx if seqs[i]["keep"]))
    return max(1, len(idx))


def evaluate_heldout(engine, pool, rows, cfg: Config, tokenizer, rank: int, world: int, device):
    """Mean template reward on the held-out set, each rank scoring its share (eval.py's protocol), and with
    --eval-n > 1 pass@k (unbiased estimator) for k = 1, 2, 4, ... up to eval_n."""
    from eval import evaluate, pass_at_k, pass_ks
    _, records = evaluate(engine, pool, rows[rank::world], cfg.template, n=cfg.eval_n,
                          temperature=cfg.eval_temperature, top_p=1.0,
                          max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed, tokenizer=tokenizer)
    groups = [records[j:j + cfg.eval_n] for j in range(0, len(records), cfg.eval_n)]  # problem-major
    ks = pass_ks(cfg.eval_n) if cfg.eval_n > 1 else []
    passed = {f"pass@{k}": sum(pass_at_k(cfg.eval_n, sum(r["reward"] > 0 for r in g), k) for g in groups) for k in ks}
    s = all_sum({k: sum(r[k] for r in records) for k in ("reward", "lenient", "length")} | {"n": len(records)}
                | passed | {"problems": len(groups)}, device)
    return {"eval_accuracy": s["reward"] / s["n"], "eval_lenient": s["lenient"] / s["n"],
            "eval_length": s["length"] / s["n"], **{f"eval_{k}": s[k] / s["problems"] for k in passed}}


def main(argv=None):
    parent = os.getppid()  # torchrun, read before anything slow (it may die while we start up)
    cfg = parse_config(argv)
    from model import build_policy, setup_distributed
    try:
        rank, world, device = setup_distributed(cfg.threads, cfg.dist_timeout_min)
    except RuntimeError as e:
        fail(str(e))
    import checkpoint
    import loss as L
    from grader import GraderPool
    from packing import at_responses, balance, packed_row, per_response, responses
    from plot import plot_run
    from rollout import engine_kind, fsdp_full_tensors, logprob_mismatch, make_engine
    from templates import get_template
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.utils import logging as transformers_logging
    # One line: the settings that differ from the paper's defaults (the whole Config goes with every checkpoint).
    changed = {f.name: getattr(cfg, f.name) for f in fields(Config) if getattr(cfg, f.name) != f.default}
    print0("config: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items()), rank=rank)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # only torchrun's ranks: a nohup'd single process outlives its shell
        exit_with_parent(parent)
    # A warning nobody running this can act on: FSDP2's note on the view that transformers' output is (nothing
    # here modifies it in place).
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    transformers_logging.disable_progress_bar()
    # Start-up order: everything that can be wrong with the config and the data is checked first (one line,
    # nothing written); then rank 0 takes the run directory's lock; only then is anything cleaned or written.
    template = get_template(cfg.template)
    try:  # on a GPU, a missing vLLM is an error (not a silently slow run), said before anything loads
        engine_kind(cfg.engine, device.type == "cuda", importlib.util.find_spec("vllm") is not None)
    except RuntimeError as e:
        fail(f"--engine {cfg.engine}: {e}")
    if not os.path.isdir(cfg.model) and (cfg.model.startswith(("/", ".", "~")) or cfg.model.count("/") != 1):
        fail(f"--model {cfg.model}: no such directory (and not a hub name like Qwen/Qwen2.5-Math-7B)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        generation_config = GenerationConfig.from_pretrained(cfg.model)
    except (OSError, ValueError) as e:  # a hub name that cannot be fetched, a directory that is not a model
        fail(f"--model {cfg.model}: cannot load it ({str(e).strip().splitlines()[0][:200]})")
    qpath = cfg.questions if cfg.questions.endswith(".jsonl") else os.path.join(cfg.data_dir, cfg.questions + ".jsonl")
    questions = load_questions(qpath, tokenizer, cfg.template, cfg.max_prompt_tokens)
    heldout = load_questions(cfg.eval_file, tokenizer, cfg.template, cfg.max_prompt_tokens)
    heldout = heldout[:cfg.eval_limit] if cfg.eval_limit else heldout
    lock = checkpoint.lock_run_dir(cfg.out_dir) if rank == 0 else None  # held (by its fd) until this process ends
    if all_sum({"busy": isinstance(lock, str)}, device)["busy"]:
        fail(f"--out-dir {cfg.out_dir} is in use by the live run {lock}; stop it or choose another --out-dir")
    # Resuming needs only files: checked before any model or engine starts. Every rank reads the same files,
    # so all stop together.
    checkpoint.clean_partial(cfg.out_dir, rank)
    latest = checkpoint.step_dirs(cfg.out_dir)[-1:]
    if latest and not cfg.resume:  # its old step_N would sort after ours and push them out of --keep
        fail(f"--out-dir {cfg.out_dir} holds checkpoints of another run; --resume false needs a new one")
    if latest:
        with open(os.path.join(latest[0], "train_config.json")) as f:
            err = resume_error(cfg, json.load(f), checkpoint.saved_world(latest[0]), world)
        if err:
            fail(f"cannot resume {latest[0]}: {err}")
    iterations = min(cfg.iterations, math.ceil(cfg.passes * len(questions) / cfg.rollout_batch))
    steps_per_iter = cfg.ppo_epochs * cfg.rollout_batch * cfg.group_size // cfg.train_batch
    # Grader workers first: forking after vLLM has started its OpenMP threads can hang.
    pool = GraderPool(workers=cfg.grader_workers, timeout=cfg.grader_timeout)
    model = build_policy(cfg.model, device, cfg.seed, cfg.grad_checkpointing)
    ref = (build_policy(cfg.model, device, cfg.seed, grad_checkpointing=False).eval().requires_grad_(False)
           if cfg.beta > 0 else None)  # the reference model exists only when the KL term is on
    # vLLM seeds the global RNGs when it starts: start it before a checkpoint restores them.
    engine = make_engine(cfg.engine, cfg.model, seed=cfg.seed, dtype="bfloat16" if device.type == "cuda" else "float32",
                         max_model_len=cfg.max_prompt_tokens + max(cfg.max_new_tokens, cfg.eval_max_new_tokens),
                         gpu_memory_utilization=cfg.gpu_memory_utilization, colocated=True, sleep_level=cfg.sleep_level)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay)
    sched = make_scheduler(opt, cfg, iterations * steps_per_iter)
    start = 0
    if latest:
        start = checkpoint.load(latest[0], model, opt, sched, rank, ref if cfg.ref_sync_every else None)["iteration"]
        print0(f"resumed from {latest[0]} at iteration {start}", rank=rank)
    if start:  # the engine starts from the base weights; give it the resumed policy
        engine.update_weights(fsdp_full_tensors(model))
    loss_fn = {"grpo": L.grpo_loss, "drgrpo": L.drgrpo_loss, "dapo": L.dapo_loss}[cfg.algo]
    loss_kw = dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, tis_cap=cfg.tis_cap or None,
                   ratio_level=cfg.ratio_level)
    if cfg.algo == "drgrpo":
        loss_kw["max_new_tokens"] = cfg.max_new_tokens
    advantages = {"grpo": L.grpo_advantages, "drgrpo": L.drgrpo_advantages, "dapo": L.dapo_advantages}[cfg.algo]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # fills empty micro-steps only
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_path, samples_path = (os.path.join(cfg.out_dir, f) for f in ("metrics.jsonl", "samples.jsonl"))
    wb = None
    if cfg.wandb and rank == 0:
        try:
            import wandb
            id_path = os.path.join(cfg.out_dir, "wandb_id")  # a resumed run logs into the same wandb run
            run_id = open(id_path).read().strip() if os.path.exists(id_path) else os.urandom(6).hex()  # no RNG used
            with open(id_path, "w") as f:
                f.write(run_id)
            wb = wandb.init(project=cfg.wandb, id=run_id, config=dataclasses.asdict(cfg), resume="allow")
        except ImportError:
            print0("wandb is not installed: logging to metrics.jsonl only")
    from tqdm import tqdm
    bar = tqdm(total=iterations, initial=start, desc="iterations", disable=rank != 0, dynamic_ncols=True)
    if start == 0:  # iteration 0 of metrics.jsonl: the base model on the held-out set
        rec = {"iteration": 0, **evaluate_heldout(engine, pool, heldout, cfg, tokenizer, rank, world, device)}
        if rank == 0:
            bar.write(f"held-out accuracy before training: {100 * rec['eval_accuracy']:.1f}% "
                      f"({len(heldout)} problems x {cfg.eval_n}, T={cfg.eval_temperature})")
            with open(metrics_path, "w") as f:
                f.write(json.dumps(rec) + "\n")
    if rank == 0:  # drop what an interrupted run logged after its last checkpoint (all of it if it had none)
        for path in (metrics_path, samples_path):
            keep = [line for line in open(path)] if os.path.exists(path) else []
            keep = [line for line in keep if line.endswith("\n") and json.loads(line)["iteration"] <= start]
            with open(path + ".tmp", "w") as f:  # replaced in one step: a kill here loses no history
                f.writelines(keep)
            os.replace(path + ".tmp", path)

    for it in range(start, iterations):
        t0 = time.time()
        # 1. prompts: this iteration's global slice of the shared-seed order; this rank takes its share
        global_idx = iteration_prompts(len(questions), it, cfg.rollout_batch, cfg.seed)
        rows = [questions[i] for i in global_idx[rank::world]]
        nan_before, timeouts_before = engine.nan_logprobs, pool.timeouts
        # 2-3. G responses per prompt from the colocated engine, graded (0/1, + the format reward if on; a
        # truncated response gets 0 in training). The reset makes the samples depend on weights and seeds only
        # (not on what an evaluation left cached): exact resume.
        engine.reset_prefix_cache()
        seeds = [request_seed(cfg.seed, it, j) for j in range(rank, cfg.rollout_batch, world)]
        batch = generate_and_grade(engine, pool, rows, seeds, cfg, template, round_=0)
        # With --dynamic-sampling, groups whose rewards are all equal carry no signal: more rounds of prompts (a
        # stream keyed by (iteration, round): a resumed run samples the same) until rollout_batch groups over
        # all ranks carry one, or the round cap. Which groups train is decided after the gather, in step 4.
        rounds = 0
        while cfg.dynamic_sampling and rounds < cfg.max_sampling_rounds:
            c = all_sum({"useful": batch["informative"].sum(), "all": len(batch["comps"])}, device)
            missing = cfg.rollout_batch - c["useful"] / cfg.group_size  # groups
            if missing <= 0:
                break
            rounds += 1  # as many prompts as the rate of useful groups so far says are missing, whole rank shares
            n_extra = min(cfg.rollout_batch, world * math.ceil(missing / max(c["useful"] / c["all"], 0.1) / world))
            extra = extra_prompts(len(questions), it, rounds, n_extra, cfg.seed)
            seeds = [request_seed(cfg.seed, it, j, rounds) for j in range(rank, n_extra, world)]
            more = generate_and_grade(engine, pool, [questions[i] for i in extra[rank::world]], seeds, cfg,
                                      template, round_=rounds)
            batch = {k: torch.cat([v, more[k]]) if torch.is_tensor(v) else v + more[k] for k, v in batch.items()}
        engine.sleep()
        rows, comps, rewards, correct = batch["rows"], batch["comps"], batch["rewards"], batch["correct"]
        t1 = time.time()  # grading runs inside each round: its time is split out of generation's below
        # 4. advantages per group (each rank holds whole groups); then every rank gets every response, because
        # the update splits by tokens, not by who generated what
        adv, adv_stats = advantages(rewards, cfg.group_size)                     # (B,)
        prompt_ids = [ids for r in rows for ids in [tokenizer(r["prompt"])["input_ids"]] * cfg.group_size]
        keep = ~batch["truncated"] if cfg.overlong_filter else torch.ones(len(comps), dtype=torch.bool)  # (B,)
        mine = responses(prompt_ids, comps, adv, keep, batch["informative"], batch["round"])
        seqs = [s for part in gather_all(mine, world) for s in part]             # every rank's, in rank order
        generated = len(seqs)
        if cfg.dynamic_sampling:  # the same choice on every rank: earliest rounds first, whole groups
            seqs = sorted((s for s in seqs if s["informative"]), key=lambda s: s["round"])
            seqs = seqs[:cfg.rollout_batch * cfg.group_size]
        # 5. the update plan, the same on every rank: per PPO epoch a shuffled order of all responses, cut into
        # the iteration's optimizer minibatches (train_batch responses each; fewer when dynamic sampling comes
        # up short: the same number of steps, each on an equal share of what there is), each balanced over
        # ranks and packed into rows by tokens. Per minibatch, the loss normaliser: its number of responses
        # (GRPO, Dr. GRPO), or of response tokens in the loss (DAPO), counted before any backward.
        n_minibatches = cfg.rollout_batch * cfg.group_size // cfg.train_batch
        plans = []  # plans[epoch][minibatch] = (normaliser, plan), plan[micro-step][rank] -> sequences of one row
        for epoch in range(cfg.ppo_epochs):
            g = torch.Generator().manual_seed(request_seed(cfg.seed, it, epoch))
            order = torch.randperm(len(seqs), generator=g).tolist()
            cuts = [order[len(order) * k // n_minibatches:len(order) * (k + 1) // n_minibatches]
                    for k in range(n_minibatches)]
            plans.append([(loss_normaliser(cfg.algo, seqs, cut),
                           balance({i: len(seqs[i]["ids"]) for i in cut}, world, cfg.max_tokens_per_micro_batch))
                          for cut in cuts])
        # 6. old log-probs by the trainer (not the sampler's), before any update of this batch, in the rows where
        # epoch 0 trains them. The first minibatch needs no separate pass: the policy has not moved yet, so its
        # update's own forward gives the same values (detached; the ratio is exactly 1).
        old, ref_old = {}, {}  # sequence -> (R,) log-probs of its response tokens, old policy and reference
        with torch.no_grad():
            for k, (_, plan) in enumerate(plans[0]):
                for row in (packed_row(seqs, step[rank], pad_id) for step in plan):
                    ids, pos, tm = (row[key].to(device) for key in ("ids", "pos", "resp"))
                    if k > 0:
                        logp = L.token_logprobs(model, ids, None, tm, cfg.temperature, position_ids=pos)[0]
                        old.update(per_response(row, logp))
                    if ref is not None:
                        logp = L.token_logprobs(ref, ids, None, tm, cfg.temperature, position_ids=pos)[0]
                        ref_old.update(per_response(row, logp))
        if ref is not None:  # FSDP2 keeps the root's parameters gathered after a forward with no backward
            ref.reshard()
        # 7. optimizer steps, one per minibatch, one packed row per micro-step. N, the loss normaliser of the
        # GLOBAL optimizer minibatch (truncation-masked responses count in GRPO's and Dr. GRPO's, as in Oat),
        # divides every micro-step on every rank; gradients are summed over micro-steps and ranks (FSDP divide
        # factor 1), so each optimizer step sees the mean over its N responses (DAPO: tokens).
        # (zeros first: dynamic sampling may leave nothing to train on, and the log line still needs its keys)
        summed, grad_norms = dict.fromkeys(("tokens", "clip_frac_low", "clip_frac_high", "entropy", "entropy_tokens"),
                                           0.0), []
        model.train()
        for epoch, minibatches in enumerate(plans):
            if epoch == 1:  # later epochs reshuffle responses over ranks: every rank needs every old log-prob
                old = {i: v for part in gather_all(old, world) for i, v in part.items()}
                ref_old = {i: v for part in gather_all(ref_old, world) for i, v in part.items()}
            for k, (N, plan) in enumerate(minibatches):
                for row in (packed_row(seqs, step[rank], pad_id) for step in plan):
                    ids, pos, seq, tm, lm = (row[key].to(device) for key in ("ids", "pos", "seq", "resp", "loss"))
                    logp, entropy = L.token_logprobs(model, ids, None, tm, cfg.temperature, position_ids=pos)
                    if epoch == 0 and k == 0:  # not scored in step 6: these are its old log-probs
                        old.update(per_response(row, logp))
                    # where the sampler gave no usable log-prob, TIS must weigh by 1: use the trainer's value there
                    sampler = [torch.where(seqs[i]["ok"], seqs[i]["sampler"], old[i]) for i in row["idx"]]
                    ref_logp = None if ref is None else at_responses(row, [ref_old[i] for i in row["idx"]]).to(device)
                    loss, m = loss_fn(logp, at_responses(row, [old[i] for i in row["idx"]]).to(device),
                                      row["adv"].to(device), seq, lm, N,
                                      sampler_logp=at_responses(row, sampler).to(device), ref_logp=ref_logp, **loss_kw)
                    loss.backward()
                    m["entropy"], m["entropy_tokens"] = (entropy * tm).sum(), tm.sum()
                    for key, v in m.items():
                        summed[key] = summed.get(key, 0.0) + float(v)
                # gradients are already summed over ranks here, so the clip sees the global norm
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)))
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if cfg.ref_sync_every and sched.last_epoch % cfg.ref_sync_every == 0:  # the same shards in both
                    model.reshard()  # gathered if this minibatch had no backward (only step 6's forward)
                    with torch.no_grad():  # (takes effect from the next iteration's reference log-probs)
                        for r, p in zip(ref.parameters(), model.parameters()):
                            r.lerp_(p, cfg.ref_mixup_alpha)  # r <- r + A (p - r)
        mismatch = logprob_mismatch([seqs[i]["sampler"] for i in old], [seqs[i]["ok"] for i in old], [*old.values()])
        t3 = time.time()
        # 7. wake the engine with the new weights, gathered from the FSDP shards one module at a time
        engine.wake_up(fsdp_full_tensors(model))
        t4 = time.time()

        # ---- logging: sums and counts over ranks, then one line on rank 0 --------------------------------
        ok, lengths, refl = correct.bool(), batch["lengths"], batch["reflective"]
        finite = mismatch == mismatch  # nan when this rank had no usable sampler log-prob
        ok_tokens = sum(int(seqs[i]["ok"].sum()) for i in old) if finite else 0  # weighs each rank's mean
        rows_tokens = [[sum(len(seqs[i]["ids"]) for i in row) for row in step]
                       for minibatches in plans for _, plan in minibatches for step in plan] or [[1]]  # all ranks
        s = all_sum({"reward": rewards.sum(), "correct": correct.sum(), "formatted": batch["formatted"].sum(),
                     "truncated": batch["truncated"].sum(), "len_ok": lengths[ok].sum(), "n_ok": ok.sum(),
                     "len_bad": lengths[~ok].sum(), "n_bad": (~ok).sum(), "len": lengths.sum(), "n": len(comps),
                     "refl_ok": refl[ok].sum(), "refl_bad": refl[~ok].sum(), "t_grade": sum(batch["t_grade"]),
                     "zero_adv_frac": adv_stats["zero_adv_group_frac"], "mismatch": mismatch * ok_tokens if finite else 0.0,
                     "mismatch_tokens": ok_tokens, "nan_logprobs": engine.nan_logprobs - nan_before,
                     "timeouts": pool.timeouts - timeouts_before, **summed}, device)
        n = s["n"]
        lm = L.mean_metrics({k: s[k] for k in summed if not k.startswith("entropy")})
        rec = {"iteration": it + 1, "reward": s["reward"] / n, "accuracy": s["correct"] / n,
               "format_rate": s["formatted"] / n, "truncation_rate": s["truncated"] / n,
               "len_correct": s["len_ok"] / max(s["n_ok"], 1), "len_incorrect": s["len_bad"] / max(s["n_bad"], 1),
               "len_mean": s["len"] / n, "zero_adv_group_frac": s["zero_adv_frac"] / world,
               # the paper's self-reflection keywords (eval.py), in correct and in incorrect responses
               "reflection_correct": s["refl_ok"] / max(s["n_ok"], 1),
               "reflection_incorrect": s["refl_bad"] / max(s["n_bad"], 1),
               "logprob_mismatch": s["mismatch"] / max(s["mismatch_tokens"], 1), "nan_logprobs": s["nan_logprobs"],
               "entropy": s["entropy"] / max(s["entropy_tokens"], 1), **{k: v for k, v in lm.items() if k != "tokens"},
               "grad_norm": sum(grad_norms) / len(grad_norms), "lr": sched.get_last_lr()[0],
               "adv_std": adv_stats["adv_std"], "grader_timeouts": s["timeouts"],  # adv_std: rank 0's groups
               # real tokens / tokens the update paid for (each micro-step costs world x its busiest row)
               "update_token_efficiency": sum(map(sum, rows_tokens)) / (world * sum(map(max, rows_tokens))),
               "t_generate": t1 - t0 - s["t_grade"] / world, "t_grade": s["t_grade"] / world, "t_train": t3 - t1,
               "t_sync": t4 - t3,
               "tokens_per_s": s["len"] / (t4 - t0)}
        if cfg.dynamic_sampling:  # groups sampled but not trained on (all-equal rewards, or beyond the batch)
            rec.update(dropped_group_frac=1 - len(seqs) / generated, sampling_rounds=1 + rounds,
                       trained_groups=len(seqs) // cfg.group_size)
        final = it + 1 == iterations
        if (it + 1) % cfg.eval_every == 0 or final:
            rec.update(evaluate_heldout(engine, pool, heldout, cfg, tokenizer, rank, world, device))
        if rank == 0:
            bar.update(1)
            bar.write(f"it {it + 1:4d} | reward {rec['reward']:.3f} | acc {rec['accuracy']:.3f} | "
                      f"len {rec['len_mean']:6.1f} (ok {rec['len_correct']:.0f} / bad {rec['len_incorrect']:.0f}) | "
                      f"trunc {rec['truncation_rate']:.2f} | clip {rec['clip_frac_low']:.3f}/{rec['clip_frac_high']:.3f} | "
                      f"ent {rec['entropy']:.3f} | gnorm {rec['grad_norm']:.3f} | mism {rec['logprob_mismatch']:.1e} | "
                      f"t {t4 - t0:.1f}s (gen {rec['t_generate']:.1f} grade {rec['t_grade']:.1f} train {t3 - t1:.1f} "
                      f"sync {t4 - t3:.1f})"
                      + (f" | drop {rec['dropped_group_frac']:.2f} x{rounds + 1}" if cfg.dynamic_sampling else "")
                      + (f" | eval {100 * rec['eval_accuracy']:.1f}%" if "eval_accuracy" in rec else "")
                      + (f" pass@{cfg.eval_n} {100 * rec[f'eval_pass@{cfg.eval_n}']:.1f}%"
                         if f"eval_pass@{cfg.eval_n}" in rec else ""))
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if wb is not None:
                wb.log(rec, step=it + 1)
            if (it + 1) % cfg.log_samples_every == 0:
                with open(samples_path, "a") as f:
                    for r, c, rw in list(zip([r for r in rows for _ in range(cfg.group_size)], comps,
                                             rewards.tolist()))[:2 * cfg.group_size]:
                        f.write(json.dumps({"iteration": it + 1, "problem": r["problem"], "gold": r["answer"],
                                            "response": c.text, "reward": rw, "truncated": c.truncated}) + "\n")
        if (it + 1) % cfg.save_every == 0 or final:
            checkpoint.save(cfg.out_dir, it + 1, model, opt, sched, tokenizer, generation_config,
                            dataclasses.asdict(cfg), {"iteration": it + 1}, cfg.keep, rank,
                            torch.bfloat16 if device.type == "cuda" else torch.float32,
                            ref if cfg.ref_sync_every else None)
        if final and rank == 0:
            with open(metrics_path) as f:
                first = json.loads(f.readline())
            png = plot_run(metrics_path)  # reward / accuracy, correct / incorrect lengths
            bar.write(f"held-out accuracy: before {100 * first['eval_accuracy']:.1f}% -> after "
                      f"{100 * rec['eval_accuracy']:.1f}% ({iterations} iterations); curves: {png}")
    bar.close()
    pool.close()
    # No destroy_process_group here: vLLM's own shutdown (at exit) tears down the process groups it shares.


if __name__ == "__main__":
    main()
