"""R1-Zero-style RL of a base model: sample -> grade -> advantage -> update, with GRPO or Dr. GRPO.

    torchrun --nproc_per_node 8 train.py --algo drgrpo             # the paper's Qwen2.5-Math-7B recipe (default)
    torchrun --nproc_per_node 8 train.py --recipe paper_1.5b       # Qwen2.5-Math-1.5B, r1 template, MATH 12k
    torchrun --nproc_per_node 2 train.py --recipe cpu_demo         # the tiny CPU demo (make demo)

Every rank holds an FSDP2 shard of the policy and a whole colocated inference engine (vLLM), which samples for
that rank's share of the prompts, sleeps during the update, and wakes up with the new weights. The loop below
is the whole algorithm; loss.py holds the two objectives side by side.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

# ------------------------------------------------------------------------------------------------------------
# Config: one flat dataclass; argparse is generated from it (dashes on the CLI); recipes override defaults.


@dataclass
class Config:
    # what to train
    algo: str = "drgrpo"                  # "drgrpo" (unbiased) or "grpo"
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
    micro_batch: int = 8                  # responses per forward/backward on one rank (memory only)
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
    recipe: str = "paper_7b"              # defaults to start from: paper_7b | paper_1.5b | cpu_demo


RECIPES = {
    "paper_7b": {},  # the dataclass defaults above
    "paper_1.5b": dict(model="Qwen/Qwen2.5-Math-1.5B", template="r1", questions="math12k", iterations=1900),
    # The CPU demo: the tiny model of data/demo.py on its synthetic task, 2 processes, minutes not days.
    "cpu_demo": dict(
        model="data/demo/model", questions="data/demo/train.jsonl", eval_file="data/demo/heldout.jsonl",
        rollout_batch=32, group_size=8, max_new_tokens=64, max_prompt_tokens=128, train_batch=128,
        micro_batch=64, iterations=100, lr=2e-4, warmup_steps=0, eval_every=20, eval_n=8, eval_temperature=1.0,
        eval_max_new_tokens=64, out_dir="runs/cpu_demo", save_every=20, log_samples_every=10,
        grad_checkpointing=False, grader_workers=1, threads=1),
}


def parse_config(argv=None) -> Config:
    """CLI flags > recipe > dataclass defaults. Unknown flags and bad values stop with one line."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=Config.recipe)
    known, _ = pre.parse_known_args(argv)
    if known.recipe not in RECIPES:
        sys.exit(f"train.py: --recipe {known.recipe!r} is not one of {', '.join(RECIPES)}")
    defaults = {**{f.name: f.default for f in fields(Config)}, **RECIPES[known.recipe], "recipe": known.recipe}
    p = argparse.ArgumentParser(description="R1-Zero RL with GRPO / Dr. GRPO (see Config for every flag)")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = _parse_bool if f.type is bool else f.type  # int, float or str
        p.add_argument(flag, type=kind, default=defaults[f.name], metavar=f.type.__name__.upper())
    cfg = Config(**vars(p.parse_args(argv)))
    err = check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    if err:
        sys.exit(f"train.py: {err}")
    return cfg


def _parse_bool(s: str) -> bool:
    if s.lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")
    return s.lower() in ("1", "true", "yes")


def check_config(cfg: Config, world: int) -> str:
    """The first inconsistency, naming the flag; '' if none. Runs before any work starts."""
    from templates import TEMPLATES
    if cfg.algo not in ("grpo", "drgrpo"):
        return f"--algo must be grpo or drgrpo, got {cfg.algo!r}"
    if cfg.template not in TEMPLATES or not TEMPLATES[cfg.template].train:
        return f"--template {cfg.template!r} is not a training template (qwen_math, r1, no)"
    # grader_workers >= 1: workers=0 grades in-process with no time limit, and model output must not hang a rank
    for name in ("rollout_batch", "train_batch", "iterations", "passes", "micro_batch", "max_new_tokens",
                 "max_prompt_tokens", "ppo_epochs", "eval_every", "eval_n", "eval_max_new_tokens", "save_every",
                 "keep", "log_samples_every", "grader_workers"):
        if getattr(cfg, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    if cfg.rollout_batch % world:
        return f"--rollout-batch {cfg.rollout_batch} prompts do not split into whole groups over {world} ranks"
    responses = cfg.rollout_batch * cfg.group_size
    if cfg.train_batch % world or responses % cfg.train_batch:
        return (f"--train-batch {cfg.train_batch} must divide the {responses} responses of an iteration "
                f"(--rollout-batch x --group-size) and split evenly over {world} ranks")
    if cfg.group_size < 2:
        return "--group-size must be at least 2 (advantages are relative to the group)"
    for name in ("temperature", "grad_clip", "lr"):  # temperature 0 would be greedy: G identical samples
        if getattr(cfg, name) <= 0:
            return f"--{name.replace('_', '-')} must be > 0"
    if not 0 < cfg.top_p <= 1:
        return "--top-p must be in (0, 1]"
    if not (0 <= cfg.eps_low < 1 and cfg.eps_high >= 0):
        return "--eps-low must be in [0, 1) and --eps-high >= 0"
    if min(cfg.warmup_steps, cfg.eval_limit, cfg.beta, cfg.tis_cap, cfg.eval_temperature) < 0:
        return "--warmup-steps, --eval-limit, --beta, --tis-cap and --eval-temperature must be >= 0"
    if cfg.lr_schedule not in ("constant", "cosine"):
        return f"--lr-schedule must be constant or cosine, got {cfg.lr_schedule!r}"
    if cfg.engine not in ("auto", "vllm", "hf"):
        return f"--engine must be auto, vllm or hf, got {cfg.engine!r}"
    if not 0 <= cfg.overlong_penalty < cfg.max_new_tokens:
        return "--overlong-penalty must be in [0, --max-new-tokens)"
    return ""


# Run management and memory knobs: the trajectory does not depend on them, so a resumed run may change them.
RESUME_MAY_CHANGE = {"iterations", "passes", "micro_batch", "grad_checkpointing", "threads", "grader_workers",
                     "grader_timeout", "gpu_memory_utilization", "out_dir", "resume", "save_every", "keep",
                     "log_samples_every", "wandb", "recipe", "eval_file", "eval_every", "eval_limit", "eval_n",
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
        sys.exit(f"train.py: {e}")
    for r in rows:
        r["prompt"] = render(template, r["problem"], tokenizer)
    lengths = [len(ids) for ids in tokenizer([r["prompt"] for r in rows])["input_ids"]]
    rows = [r for r, n in zip(rows, lengths) if n <= max_prompt_tokens]
    if not rows:
        sys.exit(f"train.py: {path} has no question whose prompt fits in --max-prompt-tokens {max_prompt_tokens}")
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


def request_seed(seed: int, iteration: int, position: int) -> int:
    """Each request carries its own sampling seed, so a resumed run samples exactly what it would have. Keyed by
    the prompt's position in the iteration, not its index: a prompt that appears twice in one iteration (at the
    end of a pass) must get two different groups, not the same one twice."""
    return (seed * 1_000_003 + iteration * 7_919 + position) % (2 ** 31 - 1)


# ------------------------------------------------------------------------------------------------------------
# Distributed helpers: one process group, the same code with one CPU process or 8 GPUs.


def setup_distributed(threads: int):
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one, same code path
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    else:  # 2 ranks on 2 cores: one torch thread each, or they fight over the cores
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def all_sum(values: list, device) -> list:
    """Sum a list of floats over ranks (metrics are sent as sums and counts, then divided)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def print0(*args, rank: int = 0):
    if rank == 0:
        print(*args, flush=True)


def build_policy(cfg: Config, device):
    """The HF model, sharded with FSDP2: each decoder layer, then the root. bf16 compute on GPU, fp32 on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM
    cuda = device.type == "cuda"
    kw = {}
    if cuda:
        try:
            import flash_attn  # noqa: F401
            kw["attn_implementation"] = "flash_attention_2"
        except ImportError:
            kw["attn_implementation"] = "sdpa"
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32, **kw).to(device)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else None
    kw = {"mp_policy": mp} if mp else {}
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    # loss.py divides by the GLOBAL number of responses, so gradients are summed over ranks, not averaged.
    # The setting is per fully_shard module; a plain SUM also suits gloo, which has no PREMUL_SUM.
    for m in [*model.model.layers, model]:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    return model


def make_scheduler(opt, cfg: Config, total_steps: int):
    def factor(step):
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "cosine":
            return warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps)))))
        return warm
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def shape_rewards(correct, truncated, lengths, max_new_tokens: int, overlong_penalty: int):
    """Training reward from the grader's 0/1: a truncated response gets 0 (it never finished its answer), and
    with DAPO's soft overlong penalty the reward falls linearly to -1 over the last `overlong_penalty` tokens."""
    rewards = torch.where(truncated, torch.zeros_like(correct), correct)         # (B,)
    if overlong_penalty:
        rewards = rewards - (lengths - (max_new_tokens - overlong_penalty)).clamp(min=0) / overlong_penalty
    return rewards


def pack(prompt_ids: list, completions: list, pad_id: int):
    """Right-padded (B, T) tensors of prompt + response; response positions marked in resp_mask, with the
    sampler's log-probs (and their validity) at the same positions."""
    rows = [p + c.token_ids for p, c in zip(prompt_ids, completions)]
    B, T = len(rows), max(map(len, rows))
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)                    # (B, T)
    attn = torch.zeros(B, T, dtype=torch.long)                                   # (B, T)
    resp_mask = torch.zeros(B, T, dtype=torch.bool)                              # (B, T)
    sampler_logp = torch.zeros(B, T)                                             # (B, T)
    sampler_ok = torch.zeros(B, T, dtype=torch.bool)                             # (B, T)
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        n, m = len(p), len(c.token_ids)
        input_ids[i, :n + m] = torch.tensor(rows[i])
        attn[i, :n + m] = 1
        resp_mask[i, n:n + m] = True
        sampler_logp[i, n:n + m] = torch.tensor(c.logprobs)
        sampler_ok[i, n:n + m] = torch.tensor(c.logprob_ok)
    return input_ids, attn, resp_mask, sampler_logp, sampler_ok


def micro_batches(rows: torch.Tensor, size: int):
    """Index tensors of at most `size` rows (the last may be smaller)."""
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def crop(idx, *tensors):
    """Rows idx of (B, T) tensors, cut to the longest of those rows (right padding)."""
    T = int(tensors[1][idx].sum(1).max())  # tensors[1] is the attention mask
    return [t[idx, :T] for t in tensors]


def evaluate_heldout(engine, pool, rows, cfg: Config, tokenizer, rank: int, world: int, device):
    """Mean template reward on the held-out set, each rank scoring its share (eval.py's protocol)."""
    from eval import evaluate
    _, records = evaluate(engine, pool, rows[rank::world], cfg.template, n=cfg.eval_n,
                          temperature=cfg.eval_temperature, top_p=1.0,
                          max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed, tokenizer=tokenizer)
    s = all_sum([sum(r["reward"] for r in records), sum(r["lenient"] for r in records), len(records),
                 sum(r["length"] for r in records)], device)
    return {"eval_accuracy": s[0] / s[2], "eval_lenient": s[1] / s[2], "eval_length": s[3] / s[2]}


def main(argv=None):
    cfg = parse_config(argv)
    rank, world, device = setup_distributed(cfg.threads)
    import checkpoint
    import loss as L
    from grader import GraderPool
    from rollout import fsdp_full_tensors, logprob_mismatch, make_engine
    from templates import get_template
    from transformers import AutoTokenizer, GenerationConfig
    print0(json.dumps(dataclasses.asdict(cfg), indent=1), rank=rank)
    # Resuming needs only files: checked before any model or engine starts. Every rank reads the same files,
    # so all stop together.
    checkpoint.clean_partial(cfg.out_dir, rank)
    latest = checkpoint.step_dirs(cfg.out_dir)[-1:]
    if latest and not cfg.resume:  # its old step_N would sort after ours and push them out of --keep
        sys.exit(f"train.py: --out-dir {cfg.out_dir} holds checkpoints of another run; --resume false needs a new one")
    if latest:
        with open(os.path.join(latest[0], "train_config.json")) as f:
            err = resume_error(cfg, json.load(f), checkpoint.saved_world(latest[0]), world)
        if err:
            sys.exit(f"train.py: cannot resume {latest[0]}: {err}")
    template = get_template(cfg.template)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    generation_config = GenerationConfig.from_pretrained(cfg.model)
    qpath = cfg.questions if cfg.questions.endswith(".jsonl") else os.path.join(cfg.data_dir, cfg.questions + ".jsonl")
    questions = load_questions(qpath, tokenizer, cfg.template, cfg.max_prompt_tokens)
    heldout = load_questions(cfg.eval_file, tokenizer, cfg.template, cfg.max_prompt_tokens)
    heldout = heldout[:cfg.eval_limit] if cfg.eval_limit else heldout
    iters_per_pass = len(questions) / cfg.rollout_batch
    iterations = min(cfg.iterations, math.ceil(cfg.passes * iters_per_pass))
    steps_per_iter = cfg.ppo_epochs * cfg.rollout_batch * cfg.group_size // cfg.train_batch
    # Grader workers first: forking after vLLM has started its OpenMP threads can hang.
    pool = GraderPool(workers=cfg.grader_workers, timeout=cfg.grader_timeout)
    model = build_policy(cfg, device)
    ref = None
    if cfg.beta > 0:  # the reference model exists only when the KL term is on
        ref = build_policy(dataclasses.replace(cfg, grad_checkpointing=False), device).eval().requires_grad_(False)
    # vLLM seeds the global RNGs when it starts: start it before a checkpoint restores them.
    engine = make_engine(cfg.engine, cfg.model, seed=cfg.seed, dtype="bfloat16" if device.type == "cuda" else "float32",
                         max_model_len=cfg.max_prompt_tokens + max(cfg.max_new_tokens, cfg.eval_max_new_tokens),
                         **({"gpu_memory_utilization": cfg.gpu_memory_utilization, "colocated": True}
                            if cfg.engine != "hf" else {}))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay)
    sched = make_scheduler(opt, cfg, iterations * steps_per_iter)
    start = 0
    if latest:
        start = checkpoint.load(latest[0], model, opt, sched, rank)["iteration"]
        print0(f"resumed from {latest[0]} at iteration {start}", rank=rank)
    if start:  # the engine starts from the base weights; give it the resumed policy
        engine.update_weights(fsdp_full_tensors(model))
    loss_fn = {"grpo": L.grpo_loss, "drgrpo": L.drgrpo_loss}[cfg.algo]
    loss_kw = dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, tis_cap=cfg.tis_cap or None)
    if cfg.algo == "drgrpo":
        loss_kw["max_new_tokens"] = cfg.max_new_tokens
    advantages = {"grpo": L.grpo_advantages, "drgrpo": L.drgrpo_advantages}[cfg.algo]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Batches are right-padded and attention is causal: no real token ever attends to a pad, so the mask only
    # matters for speed. GPU: flash-attention uses it to skip the pads. CPU: sdpa is faster without it (its
    # causal path; the values at real positions are identical, tested).
    use_mask = device.type == "cuda"
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
        mine = global_idx[rank::world]
        rows = [questions[i] for i in mine]
        nan_before, timeouts_before = engine.nan_logprobs, pool.timeouts
        # 2. generate G responses per prompt with the colocated engine, then put it to sleep. The reset makes
        # the samples depend on weights and seeds only (not on what an evaluation left cached): exact resume.
        engine.reset_prefix_cache()
        groups = engine.generate([r["prompt"] for r in rows], n=cfg.group_size, temperature=cfg.temperature,
                                 top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, stop=template.stop,
                                 seeds=[request_seed(cfg.seed, it, j) for j in range(rank, cfg.rollout_batch, world)])
        engine.sleep()
        comps = [c for g in groups for c in g]                                   # group-major, B = len(rows) * G
        golds = [r["answer"] for r in rows for _ in range(cfg.group_size)]
        t1 = time.time()
        # 3. grade: 0/1 reward; a truncated response gets 0 in training (evaluation grades it as it is)
        graded = pool.rewards([c.text for c in comps], golds, cfg.template)
        correct = torch.tensor([r for r, _ in graded])                           # (B,)
        formatted = torch.tensor([float(f) for _, f in graded])                  # (B,)
        truncated = torch.tensor([c.truncated for c in comps])                   # (B,)
        lengths = torch.tensor([len(c.token_ids) for c in comps], dtype=torch.float)  # (B,)
        rewards = shape_rewards(correct, truncated, lengths, cfg.max_new_tokens, cfg.overlong_penalty)  # (B,)
        t2 = time.time()
        # 4. advantages per group (each rank holds whole groups)
        adv, adv_stats = advantages(rewards, cfg.group_size)                     # (B,)
        prompt_ids = [ids for r in rows for ids in [tokenizer(r["prompt"])["input_ids"]] * cfg.group_size]
        input_ids, attn, resp_mask, sampler_logp, sampler_ok = pack(prompt_ids, comps, pad_id)
        loss_mask = resp_mask & ~truncated[:, None] if cfg.overlong_filter else resp_mask  # (B, T)
        # 5. old log-probs by the trainer (not the sampler's), before any update of this batch. The first
        # minibatch of epoch 0 needs no separate pass: the policy has not moved yet, so its update's own forward
        # gives the same values (detached; the ratio is exactly 1). Only the later minibatches are scored here.
        B = len(comps)
        local_mb = cfg.train_batch // world
        orders = [torch.randperm(B, generator=torch.Generator().manual_seed(request_seed(cfg.seed, it, epoch)))
                  for epoch in range(cfg.ppo_epochs)]
        old_logp = torch.zeros(input_ids.shape)                                  # (B, T)
        ref_logp = torch.zeros(input_ids.shape) if ref is not None else None     # (B, T)
        with torch.no_grad():
            for idx in micro_batches(orders[0][local_mb:], cfg.micro_batch):
                ids, am, tm = (t.to(device) for t in crop(idx, input_ids, attn, resp_mask))
                logp = L.token_logprobs(model, ids, am if use_mask else None, tm, cfg.temperature)[0]
                old_logp[idx, :ids.shape[1]] = logp.float().cpu()
            for idx in (micro_batches(torch.arange(B), cfg.micro_batch) if ref is not None else []):
                ids, am, tm = (t.to(device) for t in crop(idx, input_ids, attn, resp_mask))
                logp = L.token_logprobs(ref, ids, am if use_mask else None, tm, cfg.temperature)[0]
                ref_logp[idx, :ids.shape[1]] = logp.float().cpu()
        # 6. optimizer steps over minibatches of train_batch responses (global), micro-batched per rank.
        # N: the loss normaliser = responses in the GLOBAL optimizer minibatch, truncation-masked ones included
        # (Oat). Every micro-batch on every rank divides by it; gradients are summed over micro-batches and
        # ranks (FSDP divide factor 1), so each optimizer step sees the mean over its N responses.
        N = cfg.train_batch
        summed, grad_norms = {}, []
        model.train()
        for epoch, order in enumerate(orders):
            for step, mb in enumerate(micro_batches(order, local_mb)):
                for idx in micro_batches(mb, cfg.micro_batch):
                    ids, am, tm, lm, ok, slp = crop(idx, input_ids, attn, resp_mask, loss_mask, sampler_ok,
                                                    sampler_logp)
                    ids, am, tm, lm = (t.to(device) for t in (ids, am, tm, lm))
                    logp, entropy = L.token_logprobs(model, ids, am if use_mask else None, tm, cfg.temperature)
                    if epoch == 0 and step == 0:  # not scored in step 5: these are its old log-probs
                        old_logp[idx, :ids.shape[1]] = logp.detach().float().cpu()
                    old = old_logp[idx, :ids.shape[1]]
                    # where the sampler gave no usable log-prob, TIS must weigh by 1: use the trainer's value there
                    slp = torch.where(ok, slp, old).to(device)
                    extra = dict(ref_logp=ref_logp[idx, :ids.shape[1]].to(device)) if ref is not None else {}
                    loss, m = loss_fn(logp, old.to(device), adv[idx].to(device), lm, N, sampler_logp=slp, **extra,
                                      **loss_kw)
                    loss.backward()
                    m["entropy"] = (entropy * tm).sum()
                    m["entropy_tokens"] = tm.sum()
                    for k, v in m.items():
                        summed[k] = summed.get(k, 0.0) + float(v)
                # gradients are already summed over ranks here, so the clip sees the global norm
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)))
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
        mismatch = logprob_mismatch(sampler_logp, sampler_ok & resp_mask, old_logp)
        t3 = time.time()
        # 7. wake the engine with the new weights, gathered from the FSDP shards one module at a time
        engine.wake_up(fsdp_full_tensors(model))
        t4 = time.time()

        # ---- logging: sums and counts over ranks, then one line on rank 0 --------------------------------
        ok = correct.bool()
        keys = sorted(summed)
        s = all_sum([float(rewards.sum()), float(correct.sum()), float(formatted.sum()), float(truncated.sum()),
                     float(lengths[ok].sum()), float(ok.sum()), float(lengths[~ok].sum()), float((~ok).sum()),
                     float(lengths.sum()), adv_stats["zero_adv_group_frac"], mismatch if mismatch == mismatch else 0.0,
                     float(engine.nan_logprobs - nan_before), float(mismatch == mismatch),
                     float(pool.timeouts - timeouts_before)]
                    + [summed[k] for k in keys], device)
        n = B * world
        tok = {k: s[14 + i] for i, k in enumerate(keys)}
        lm = L.mean_metrics({k: v for k, v in tok.items() if not k.startswith("entropy")})
        rec = {"iteration": it + 1, "reward": s[0] / n, "accuracy": s[1] / n, "format_rate": s[2] / n,
               "truncation_rate": s[3] / n, "len_correct": s[4] / max(s[5], 1), "len_incorrect": s[6] / max(s[7], 1),
               "len_mean": s[8] / n, "zero_adv_group_frac": s[9] / world, "logprob_mismatch": s[10] / max(s[12], 1),
               "nan_logprobs": s[11], "entropy": tok["entropy"] / max(tok["entropy_tokens"], 1),
               **{k: v for k, v in lm.items() if k != "tokens"},
               "grad_norm": sum(grad_norms) / len(grad_norms), "lr": sched.get_last_lr()[0],
               "adv_std": adv_stats["adv_std"], "grader_timeouts": s[13],  # adv_std: rank 0's groups
               "t_generate": t1 - t0, "t_grade": t2 - t1, "t_train": t3 - t2, "t_sync": t4 - t3,
               "tokens_per_s": s[8] / (t4 - t0)}
        final = it + 1 == iterations
        if (it + 1) % cfg.eval_every == 0 or final:
            rec.update(evaluate_heldout(engine, pool, heldout, cfg, tokenizer, rank, world, device))
        if rank == 0:
            bar.update(1)
            bar.write(f"it {it + 1:4d} | reward {rec['reward']:.3f} | acc {rec['accuracy']:.3f} | "
                      f"len {rec['len_mean']:6.1f} (ok {rec['len_correct']:.0f} / bad {rec['len_incorrect']:.0f}) | "
                      f"trunc {rec['truncation_rate']:.2f} | clip {rec['clip_frac_low']:.3f}/{rec['clip_frac_high']:.3f} | "
                      f"ent {rec['entropy']:.3f} | gnorm {rec['grad_norm']:.3f} | mism {rec['logprob_mismatch']:.1e} | "
                      f"t {t4 - t0:.1f}s (gen {t1 - t0:.1f} grade {t2 - t1:.1f} train {t3 - t2:.1f} sync {t4 - t3:.1f})"
                      + (f" | eval {100 * rec['eval_accuracy']:.1f}%" if "eval_accuracy" in rec else ""))
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
                            torch.bfloat16 if device.type == "cuda" else torch.float32)
        if final and rank == 0:
            with open(metrics_path) as f:
                first = json.loads(f.readline())
            bar.write(f"held-out accuracy: before {100 * first['eval_accuracy']:.1f}% -> after "
                      f"{100 * rec['eval_accuracy']:.1f}% ({iterations} iterations)")
    bar.close()
    pool.close()
    # No destroy_process_group here: vLLM's own shutdown (at exit) tears down the process groups it shares.


if __name__ == "__main__":
    main()
