"""R1-Zero-style RL of a base model: sample -> grade -> advantage -> update, with Dr. GRPO, GRPO or DAPO.

    torchrun --nproc_per_node 8 train.py --algo drgrpo          # the paper's Qwen2.5-Math-7B recipe (default)
    torchrun --nproc_per_node 8 train.py --recipe paper_1.5b    # Qwen2.5-Math-1.5B, r1 template, MATH 12k
    torchrun --nproc_per_node 2 train.py --recipe cpu_demo      # the tiny CPU demo (make demo)
    python train.py --help                                      # every flag (config.py)

Every rank holds an FSDP2 shard of the policy and a whole colocated inference engine (vLLM), which samples for
that rank's share of the prompts, sleeps during the update, and wakes up with the new weights. main() is the
whole algorithm, one call per phase; loss.py holds the objectives side by side, packing.py how responses
become rows, config.py every setting.
"""
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields

# Quiet by default (the user's environment wins): vLLM's CPU build warns about NUMA binding from C++ at start.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
import torch  # noqa: E402

import checkpoint  # noqa: E402
import loss as L  # noqa: E402
from config import Config, fail, out_of_memory, parse_config, resume_error  # noqa: E402
from model import (all_sum, exit_with_parent, gather_all, hub_download, locate_model, print0,  # noqa: E402
                   zero_grads)
from packing import at_responses, balance, packed_row, per_response, responses, trains  # noqa: E402
from templates import get_template  # noqa: E402

# ------------------------------------------------------------------------------------------------------------
# Data: a jsonl question set, and an order that every rank derives from the one shared seed.


def load_questions(path: str, tokenizer, template: str, max_prompt_tokens: int, rank: int = 0):
    """Rows {problem, answer} with their rendered prompts and their lengths; a malformed row stops with
    file:line; problems whose prompt is longer than max_prompt_tokens are skipped, and counted in one line."""
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
    for r, ids in zip(rows, tokenizer([r["prompt"] for r in rows])["input_ids"]):
        r["prompt_tokens"] = len(ids)
    kept = [r for r in rows if r["prompt_tokens"] <= max_prompt_tokens]
    if not kept:
        fail(f"{path} has no question whose prompt fits in --max-prompt-tokens {max_prompt_tokens}")
    if len(kept) < len(rows):
        print0(f"{path}: {len(rows) - len(kept)} of {len(rows)} problems skipped: their prompt is longer "
               f"than --max-prompt-tokens {max_prompt_tokens}", rank=rank)
    return kept


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
    """Each request's own sampling seed, so a resumed run samples exactly what it would have. Keyed by the
    prompt's position in the iteration, not its index: a prompt that comes twice in one iteration (at the end
    of a pass) must get two different groups. Dynamic sampling's rounds are apart."""
    return (seed * 1_000_003 + iteration * 7_919 + position + round_ * 1_000_000_007) % (2 ** 31 - 1)


# ------------------------------------------------------------------------------------------------------------
# Set-up: the checks first (one line, nothing written), then the run directory, then models and engine.


@dataclass
class Run:
    """What every phase shares (rank, models, optimizer, engine, grader pool); the rest goes explicitly."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    tokenizer: object
    model_path: str        # the model's local directory (a hub model's is in the hub cache)
    pad_id: int = 0        # the token of an empty micro-step's one-token row (nothing is learned from it)
    model: object = None
    ref: object = None     # the reference model, only when the KL term is on (beta > 0)
    opt: object = None
    sched: object = None
    engine: object = None
    pool: object = None


def start_process(cfg: Config, parent: int):
    """The process group and device; the settings line; quiet logs. -> rank, world, device."""
    from transformers.utils import logging as transformers_logging

    from model import setup_distributed
    try:
        rank, world, device = setup_distributed(cfg.threads, cfg.dist_timeout_min)
    except RuntimeError as e:
        fail(str(e))
    # One line: the settings that differ from the paper's defaults (the whole Config goes with checkpoints).
    changed = {f.name: getattr(cfg, f.name) for f in fields(Config) if getattr(cfg, f.name) != f.default}
    print0("config: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items()), rank=rank)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's ranks only: a nohup'd process outlives its shell
        exit_with_parent(parent)
    # FSDP2's note on the view that transformers' output is: nothing here modifies it in place
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    transformers_logging.disable_progress_bar()
    return rank, world, device


def load_inputs(cfg: Config, model_path: str, rank: int, device):
    """Everything that can be wrong with the engine choice, the model and the data, checked before anything is
    written. -> tokenizer, generation config, training questions, held-out questions, the engine's context."""
    import importlib.util

    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from rollout import engine_kind
    try:  # on a GPU, a missing vLLM is an error (not a silently slow run), said before anything loads
        engine_kind(cfg.engine, device.type == "cuda", importlib.util.find_spec("vllm") is not None)
    except RuntimeError as e:
        fail(f"--engine {cfg.engine}: {e}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        generation_config = GenerationConfig.from_pretrained(model_path)
        context = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    except (OSError, ValueError) as e:  # a hub name that cannot be fetched, a directory that is not a model
        fail(f"--model {cfg.model}: cannot load it ({str(e).strip().splitlines()[0][:200]})")
    if not tokenizer("1 + 1 = 2")["input_ids"]:  # e.g. a checkpoint directory without its tokenizer files
        fail(f"--model {cfg.model}: no usable tokenizer (it encodes text to nothing): tokenizer.json or "
             "vocab.json + merges.txt, and tokenizer_config.json, belong in the directory")
    qpath = cfg.questions if cfg.questions.endswith(".jsonl") else os.path.join(cfg.data_dir,
                                                                                cfg.questions + ".jsonl")
    questions = load_questions(qpath, tokenizer, cfg.template, cfg.max_prompt_tokens, rank)
    heldout = load_questions(cfg.eval_file, tokenizer, cfg.template, cfg.max_prompt_tokens, rank)
    heldout = heldout[:cfg.eval_limit] if cfg.eval_limit else heldout
    for rows, flag, budget in ((questions, "--max-new-tokens", cfg.max_new_tokens),
                               (heldout, "--eval-max-new-tokens", cfg.eval_max_new_tokens)):
        longest = max(r["prompt_tokens"] for r in rows)
        if context and longest + budget > context:  # vLLM would refuse to start, long after this point
            fail(f"{flag} {budget}: the longest prompt ({longest} tokens) + {budget} is past the model's "
                 f"context of {context} tokens (max_position_embeddings); lower {flag} or "
                 "--max-prompt-tokens")
    engine_context = cfg.max_prompt_tokens + max(cfg.max_new_tokens, cfg.eval_max_new_tokens)
    return tokenizer, generation_config, questions, heldout, min(context or engine_context, engine_context)


def claim_out_dir(cfg: Config, rank: int, world: int, device) -> list:
    """Rank 0 takes the run directory's lock (held until the process ends); then resuming's checks, from files
    only, before any model or engine starts. -> [latest checkpoint] or []."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        fail(f"--out-dir {cfg.out_dir} is a file, not a directory")
    lock = checkpoint.lock_run_dir(cfg.out_dir) if rank == 0 else None
    if all_sum({"busy": isinstance(lock, str)}, device)["busy"]:
        fail(f"--out-dir {cfg.out_dir} is in use by the live run {lock}; stop it or choose another --out-dir")
    checkpoint.clean_partial(cfg.out_dir, rank)
    latest = checkpoint.step_dirs(cfg.out_dir)[-1:]
    if latest and not cfg.resume:  # its old step_N would sort after ours and push them out of --keep
        fail(f"--out-dir {cfg.out_dir} holds checkpoints of another run; --resume false needs a new one")
    if latest:  # every rank reads the same files, so all stop together
        with open(os.path.join(latest[0], "train_config.json")) as f:
            err = resume_error(cfg, json.load(f), checkpoint.saved_world(latest[0]), world)
        if err:
            fail(f"cannot resume {latest[0]}: {err}")
    return latest


def make_scheduler(opt, cfg: Config, total_steps: int):
    def factor(step):
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "cosine":
            return warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps)))))
        return warm
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def build(run: Run, total_steps: int, max_model_len: int):
    """The grader pool, the policy (and the reference), the engine, AdamW and its schedule, into run."""
    from grader import GraderPool
    from model import build_policy, set_matmul_precision
    from rollout import make_engine
    cfg = run.cfg
    # Grader workers first: forking after vLLM has started its OpenMP threads can hang.
    run.pool = GraderPool(workers=cfg.grader_workers, timeout=cfg.grader_timeout)
    run.model = build_policy(run.model_path, run.device, cfg.seed, cfg.grad_checkpointing)
    if cfg.beta > 0:  # the reference model exists only when the KL term is on
        run.ref = build_policy(run.model_path, run.device, cfg.seed, grad_checkpointing=False)
        run.ref.eval().requires_grad_(False)
    # vLLM seeds the global RNGs when it starts: start it before a checkpoint restores them.
    auto = "bfloat16" if run.device.type == "cuda" else "float32"  # on CPU: the trainer's fp32
    try:
        run.engine = make_engine(cfg.engine, run.model_path, seed=cfg.seed,
                                 dtype=auto if cfg.sampler_dtype == "auto" else cfg.sampler_dtype,
                                 max_model_len=max_model_len, colocated=True, sleep_level=cfg.sleep_level,
                                 gpu_memory_utilization=cfg.gpu_memory_utilization, enforce_eager=cfg.eager)
    except ValueError as e:  # vLLM's start-up: too little memory left for its KV cache
        if "gpu_memory_utilization" not in str(e):
            raise
        fail(f"vLLM could not start: {str(e).split('. ')[0]} (--gpu-memory-utilization "
             f"{cfg.gpu_memory_utilization}, a context of {max_model_len} tokens): raise "
             f"--gpu-memory-utilization if the GPU is free, or lower --max-new-tokens / --max-prompt-tokens")
    set_matmul_precision(run.device)  # vLLM's worker set it process-wide to its own (plain fp32 on GPU)
    run.opt = torch.optim.AdamW(run.model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                weight_decay=cfg.weight_decay)
    run.sched = make_scheduler(run.opt, cfg, total_steps)


def resume(run: Run, latest: list) -> int:
    """Restore the latest checkpoint into run, if there is one. -> the iteration to start from."""
    from rollout import fsdp_full_tensors
    if not latest:
        return 0
    keep_ref = run.ref if run.cfg.ref_sync_every else None  # a moving reference is part of the state
    start = checkpoint.load(latest[0], run.model, run.opt, run.sched, run.rank, keep_ref)["iteration"]
    print0(f"resumed from {latest[0]} at iteration {start}", rank=run.rank)
    run.engine.update_weights(fsdp_full_tensors(run.model))  # the engine started from the base weights
    return start


@dataclass
class Logs:
    metrics: str          # metrics.jsonl: one record per iteration (0: the base model's evaluation)
    samples: str          # samples.jsonl: a few responses every --log-samples-every iterations
    bar: object           # tqdm's progress bar (rank 0)
    wandb: object = None  # a wandb run, if asked for and installed (rank 0)
    flat: int = 0         # of the first iterations, how many had equal rewards in every group


def open_logs(run: Run, heldout: list, start: int, iterations: int) -> Logs:
    """The run directory's logs: iteration 0 (the base model's held-out score) on a new run, and on a resumed
    one, what the interrupted run logged after its last checkpoint dropped."""
    from tqdm import tqdm
    cfg, rank = run.cfg, run.rank
    os.makedirs(cfg.out_dir, exist_ok=True)
    logs = Logs(*(os.path.join(cfg.out_dir, f) for f in ("metrics.jsonl", "samples.jsonl")),
                bar=tqdm(total=iterations, initial=start, desc="iterations", disable=rank != 0,
                         dynamic_ncols=True))
    if cfg.wandb and rank == 0:
        logs.wandb = open_wandb(cfg)
    if start == 0:
        rec = {"iteration": 0, **evaluate_heldout(run, heldout)}
        if rank == 0:
            logs.bar.write(f"held-out accuracy before training: {100 * rec['eval_accuracy']:.1f}% "
                           f"({len(heldout)} problems x {cfg.eval_n}, T={cfg.eval_temperature})")
            with open(logs.metrics, "w") as f:
                f.write(json.dumps(rec) + "\n")
    if rank == 0:  # drop what an interrupted run logged after its last checkpoint (all of it if it had none)
        for path in (logs.metrics, logs.samples):
            keep = [line for line in open(path)] if os.path.exists(path) else []
            keep = [line for line in keep if line.endswith("\n") and json.loads(line)["iteration"] <= start]
            with open(path + ".tmp", "w") as f:  # replaced in one step: a kill here loses no history
                f.writelines(keep)
            os.replace(path + ".tmp", path)
    return logs


def open_wandb(cfg: Config):  # a resumed run logs into the same wandb run
    try:
        import wandb
    except ImportError:
        print("wandb is not installed: logging to metrics.jsonl only", flush=True)
        return None
    id_path = os.path.join(cfg.out_dir, "wandb_id")
    run_id = open(id_path).read().strip() if os.path.exists(id_path) else os.urandom(6).hex()  # no RNG used
    with open(id_path, "w") as f:
        f.write(run_id)
    return wandb.init(project=cfg.wandb, id=run_id, config=asdict(cfg), resume="allow")


# ------------------------------------------------------------------------------------------------------------
# The phases of one policy iteration, in the order main() calls them.


UPDATE_FLAGS = "--max-tokens-per-micro-batch, or --grad-checkpointing true"


def prompts(questions: list, it: int, cfg: Config, rank: int, world: int):
    """1. This iteration's global slice of the shared-seed order; this rank takes its share, each prompt with
    the sampling seed of its position. -> rows, seeds."""
    global_idx = iteration_prompts(len(questions), it, cfg.rollout_batch, cfg.seed)
    seeds = [request_seed(cfg.seed, it, j) for j in range(rank, cfg.rollout_batch, world)]
    return [questions[i] for i in global_idx[rank::world]], seeds


def generate_and_grade(engine, pool, rows, seeds, cfg: Config, template, round_: int) -> dict:
    """G responses per row (seeded per request), graded, group-major: one round of the rollout."""
    from eval import is_reflective
    groups = engine.generate([r["prompt"] for r in rows], n=cfg.group_size, temperature=cfg.temperature,
                             top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, stop=template.stop,
                             seeds=seeds)
    comps = [c for g in groups for c in g]                                       # B = len(rows) * G
    t = time.time()
    golds = [r["answer"] for r in rows for _ in range(cfg.group_size)]
    graded = pool.rewards([c.text for c in comps], golds, cfg.template)
    correct = torch.tensor([r for r, _ in graded])                               # (B,)
    formatted = torch.tensor([float(f) for _, f in graded])                      # (B,)
    truncated = torch.tensor([c.truncated for c in comps], dtype=torch.bool)     # (B,)
    lengths = torch.tensor([len(c.token_ids) for c in comps], dtype=torch.float)  # (B,)
    rewards = L.shape_rewards(correct, formatted, truncated, lengths, cfg.max_new_tokens,
                              cfg.overlong_penalty, cfg.format_reward)           # (B,)
    r = rewards.view(-1, cfg.group_size)                                         # (B/G, G)
    informative = (r.amax(1) > r.amin(1)).repeat_interleave(cfg.group_size)      # (B,) the group differs
    return {"rows": list(rows), "comps": comps, "correct": correct, "formatted": formatted,
            "truncated": truncated, "lengths": lengths, "rewards": rewards,
            "informative": informative,
            "round": torch.full((len(comps),), round_), "t_grade": [time.time() - t],
            "reflective": torch.tensor([is_reflective(c.text) for c in comps], dtype=torch.float)}  # (B,)


def rollout(run: Run, questions: list, rows: list, seeds: list, it: int, template) -> dict:
    """2-3. G responses per prompt from the colocated engine, graded (0/1, + the format reward if on; a
    truncated response gets 0 in training), then the engine sleeps. With --dynamic-sampling, groups whose
    rewards are all equal carry no signal: more rounds of prompts (a stream keyed by (iteration, round))
    until rollout_batch groups over all ranks carry one, or the round cap; plan_update picks which train."""
    cfg, engine, pool = run.cfg, run.engine, run.pool
    before = engine.nan_logprobs, pool.timeouts, pool.errors
    # The reset makes the samples depend on weights and seeds only (not on what an evaluation left cached).
    engine.reset_prefix_cache()
    size = f"{len(rows)} prompts x {cfg.group_size} of up to {cfg.max_new_tokens} tokens"
    with out_of_memory("the rollout", size, "--gpu-memory-utilization or --max-new-tokens"):
        batch = generate_and_grade(engine, pool, rows, seeds, cfg, template, round_=0)
    rounds = 0
    while cfg.dynamic_sampling and rounds < cfg.max_sampling_rounds:
        c = all_sum({"useful": batch["informative"].sum(), "all": len(batch["comps"])}, run.device)
        missing = cfg.rollout_batch - c["useful"] / cfg.group_size  # groups
        if missing <= 0:
            break
        rounds += 1  # as many prompts as the rate of useful groups so far says are missing, whole rank shares
        rate = max(c["useful"] / c["all"], 0.1)
        n_extra = min(cfg.rollout_batch, run.world * math.ceil(missing / rate / run.world))
        extra = extra_prompts(len(questions), it, rounds, n_extra, cfg.seed)
        seeds = [request_seed(cfg.seed, it, j, rounds) for j in range(run.rank, n_extra, run.world)]
        more_rows = [questions[i] for i in extra[run.rank::run.world]]
        with out_of_memory("the rollout", size, "--gpu-memory-utilization or --max-new-tokens"):
            more = generate_and_grade(engine, pool, more_rows, seeds, cfg, template, round_=rounds)
        batch = {k: torch.cat([v, more[k]]) if torch.is_tensor(v) else v + more[k] for k, v in batch.items()}
    engine.sleep()
    batch.update(rounds=rounds, nan_logprobs=engine.nan_logprobs - before[0],
                 timeouts=pool.timeouts - before[1], grader_errors=pool.errors - before[2])
    return batch


def loss_normaliser(algo: str, seqs: list, idx: list) -> int:
    """N of one optimizer minibatch (global): its responses, or for DAPO its response tokens in the loss
    (at least 1)."""
    if algo == "dapo":
        return max(1, sum(len(seqs[i]["ids"]) - seqs[i]["prompt"] for i in idx if seqs[i]["keep"]))
    return max(1, len(idx))


def plan_update(run: Run, batch: dict, it: int):
    """4. Advantages per group (each rank holds whole groups); then every rank gets every response, because
    the update splits by tokens, not by who generated what. The plan, the same on every rank: per PPO epoch a
    shuffled order of all responses, cut into the iteration's optimizer minibatches (train_batch responses
    each; fewer when dynamic sampling comes up short: the same number of steps, each on an equal share of
    what there is), each balanced over ranks and packed into rows by tokens. Per minibatch, the loss
    normaliser N: its responses (GRPO, Dr. GRPO) or its response tokens in the loss (DAPO), counted before
    any backward. Responses that cannot move the gradient (packing.trains) count in N but get no row.
    -> seqs (every rank's responses), plans[epoch][minibatch] = (N, plan), advantage stats."""
    cfg, tokenizer = run.cfg, run.tokenizer
    advantages = {"grpo": L.grpo_advantages, "drgrpo": L.drgrpo_advantages, "dapo": L.dapo_advantages}
    adv, adv_stats = advantages[cfg.algo](batch["rewards"], cfg.group_size)      # (B,)
    prompt_ids = [tokenizer(r["prompt"])["input_ids"] for r in batch["rows"]]
    prompt_ids = [ids for ids in prompt_ids for _ in range(cfg.group_size)]     # one per response
    n = len(batch["comps"])
    keep = ~batch["truncated"] if cfg.overlong_filter else torch.ones(n, dtype=torch.bool)  # (B,)
    mine = responses(prompt_ids, batch["comps"], adv, keep, batch["informative"], batch["round"])
    seqs = [s for part in gather_all(mine, run.world) for s in part]             # every rank's, in rank order
    adv_stats["generated"] = len(seqs)
    if cfg.dynamic_sampling:  # the same choice on every rank: earliest rounds first, whole groups
        seqs = sorted((s for s in seqs if s["informative"]), key=lambda s: s["round"])
        seqs = seqs[:cfg.rollout_batch * cfg.group_size]
    n_minibatches = cfg.rollout_batch * cfg.group_size // cfg.train_batch
    plans = []  # plans[epoch][minibatch] = (normaliser, plan), plan[micro-step][rank] -> sequences of one row
    for epoch in range(cfg.ppo_epochs):
        g = torch.Generator().manual_seed(request_seed(cfg.seed, it, epoch))
        order = torch.randperm(len(seqs), generator=g).tolist()
        cuts = [order[len(order) * k // n_minibatches:len(order) * (k + 1) // n_minibatches]
                for k in range(n_minibatches)]
        lengths = [{i: len(seqs[i]["ids"]) for i in cut if trains(seqs[i], cfg.beta)} for cut in cuts]
        plans.append([(loss_normaliser(cfg.algo, seqs, cut),
                        balance(n, run.world, cfg.max_tokens_per_micro_batch))
                      for cut, n in zip(cuts, lengths)])
    return seqs, plans, adv_stats


def old_logprobs(run: Run, seqs: list, plans: list):
    """5. Old log-probs by the trainer (not the sampler's), before any update of this batch, in the rows where
    epoch 0 trains them; and the reference's, with the KL term on. The first minibatch needs no separate
    pass: the policy has not moved yet, so its update's own forward gives the same values (detached; the
    ratio is exactly 1). -> old, ref_old: sequence -> (R,) log-probs of its response tokens."""
    cfg, ref = run.cfg, run.ref
    old, ref_old = {}, {}
    with torch.no_grad():
        for k, (_, plan) in enumerate(plans[0]):
            models = ([(run.model, old)] if k > 0 else []) + ([(ref, ref_old)] if ref is not None else [])
            for row in (packed_row(seqs, step[run.rank], run.pad_id) for step in plan):
                ids, pos, tm = (row[key].to(run.device) for key in ("ids", "pos", "resp"))
                size = f"a packed row of {ids.shape[1]} tokens"
                for model, out in models:
                    with out_of_memory("the old log-probs", size, UPDATE_FLAGS):
                        logp = L.token_logprobs(model, ids, None, tm, cfg.temperature, position_ids=pos)[0]
                    out.update(per_response(row, logp))
    if ref is not None:  # FSDP2 keeps the root's parameters gathered after a forward with no backward
        ref.reshard()
    return old, ref_old


def objective(cfg: Config):
    """The loss function of --algo and its keyword arguments."""
    loss_fn = {"grpo": L.grpo_loss, "drgrpo": L.drgrpo_loss, "dapo": L.dapo_loss}[cfg.algo]
    kw = dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, tis_cap=cfg.tis_cap or None,
              ratio_level=cfg.ratio_level, is_mode=cfg.is_mode, is_band=(cfg.is_low, cfg.is_high))
    if cfg.algo == "drgrpo":
        kw["max_new_tokens"] = cfg.max_new_tokens
    return loss_fn, kw


def optimize(run: Run, seqs: list, plans: list, old: dict, ref_old: dict):
    """6. The optimizer steps, one per minibatch, one packed row per micro-step. N, the loss normaliser of the
    GLOBAL optimizer minibatch (truncation-masked responses count in GRPO's and Dr. GRPO's, as in Oat),
    divides every micro-step on every rank; gradients are summed over micro-steps and ranks (FSDP divide
    factor 1), so each optimizer step sees the mean over its N responses (DAPO: tokens). -> summed metrics,
    grad norms, old log-probs of every response trained."""
    cfg, model = run.cfg, run.model
    # zeros first: dynamic sampling may leave nothing to train on, and the log line still needs its keys
    summed = dict.fromkeys(("tokens", "clip_frac_low", "clip_frac_high", "entropy", "entropy_tokens"), 0.0)
    grad_norms = []
    model.train()
    for epoch, minibatches in enumerate(plans):
        if epoch == 1:  # later epochs reshuffle responses over ranks: every rank needs every old log-prob
            old = {i: v for part in gather_all(old, run.world) for i, v in part.items()}
            ref_old = {i: v for part in gather_all(ref_old, run.world) for i, v in part.items()}
        for k, (N, plan) in enumerate(minibatches):
            for row in (packed_row(seqs, step[run.rank], run.pad_id) for step in plan):
                size = f"a packed row of {row['ids'].shape[1]} tokens"
                with out_of_memory("the update", size, UPDATE_FLAGS):
                    m = micro_step(run, seqs, row, old, ref_old, N, first=epoch == 0 and k == 0)
                for key, v in m.items():
                    summed[key] = summed.get(key, 0.0) + float(v)
            if not plan:  # nothing to compute on any rank: AdamW steps on zeros, those responses' gradient
                zero_grads(model)
            # gradients are already summed over ranks here, so the clip sees the global norm
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)))
            run.opt.step()
            run.sched.step()
            run.opt.zero_grad(set_to_none=True)
            if cfg.ref_sync_every and run.sched.last_epoch % cfg.ref_sync_every == 0:
                sync_reference(model, run.ref, cfg.ref_mixup_alpha)
    return summed, grad_norms, old


def micro_step(run: Run, seqs: list, row: dict, old: dict, ref_old: dict, N: int, first: bool) -> dict:
    """One packed row's forward and backward (the gradient accumulates). first: the iteration's first
    minibatch, whose old log-probs are this forward's own (old_logprobs skipped it). -> its summed metrics."""
    cfg, device = run.cfg, run.device
    loss_fn, loss_kw = objective(cfg)
    ids, pos, seq, tm, lm = (row[key].to(device) for key in ("ids", "pos", "seq", "resp", "loss"))
    logp, entropy = L.token_logprobs(run.model, ids, None, tm, cfg.temperature, position_ids=pos)
    if first:
        old.update(per_response(row, logp))
    # where the sampler gave no usable log-prob, TIS must weigh by 1: the trainer's value there
    sampler = [torch.where(seqs[i]["ok"], seqs[i]["sampler"], old[i]) for i in row["idx"]]
    ref_logp = None if run.ref is None else at_responses(row, [ref_old[i] for i in row["idx"]]).to(device)
    loss, m = loss_fn(logp, at_responses(row, [old[i] for i in row["idx"]]).to(device), row["adv"].to(device),
                      seq, lm, N, sampler_logp=at_responses(row, sampler).to(device), ref_logp=ref_logp,
                      **loss_kw)
    loss.backward()
    m["entropy"], m["entropy_tokens"] = (entropy * tm).sum(), tm.sum()
    return m


def sync_reference(model, ref, alpha: float):
    """ref <- ref + alpha (policy - ref), shard by shard (the same shards in both); it takes effect from the
    next iteration's reference log-probs."""
    model.reshard()  # gathered if this minibatch had no backward (only old_logprobs' forward)
    with torch.no_grad():
        for r, p in zip(ref.parameters(), model.parameters()):
            r.lerp_(p, alpha)


def sync_engine(run: Run):  # 7. wake the engine with the new weights, gathered one FSDP module at a time
    from rollout import fsdp_full_tensors
    share = f"vLLM's share {run.cfg.gpu_memory_utilization} of the GPU"
    with out_of_memory("the engine's wake-up", share, "--gpu-memory-utilization (or --sleep-level 2)"):
        run.engine.wake_up(fsdp_full_tensors(run.model))


def iteration_record(run: Run, it: int, batch: dict, seqs: list, plans: list, adv_stats: dict, old: dict,
                     summed: dict, grad_norms: list, t: dict) -> dict:
    """8. The iteration's metrics: sums and counts over ranks, then divided (one all-reduce)."""
    from rollout import logprob_mismatch
    cfg, world = run.cfg, run.world
    mismatch = logprob_mismatch([seqs[i]["sampler"] for i in old], [seqs[i]["ok"] for i in old],
                                [*old.values()])
    correct, lengths, refl = batch["correct"], batch["lengths"], batch["reflective"]
    ok = correct.bool()
    finite = mismatch == mismatch  # nan when this rank had no usable sampler log-prob
    ok_tokens = sum(int(seqs[i]["ok"].sum()) for i in old) if finite else 0  # weighs each rank's mean
    rows_tokens = [[sum(len(seqs[i]["ids"]) for i in row) for row in step]
                   for minibatches in plans for _, plan in minibatches for step in plan]  # all ranks
    s = all_sum({"reward": batch["rewards"].sum(), "correct": correct.sum(),
                 "formatted": batch["formatted"].sum(), "truncated": batch["truncated"].sum(),
                 "len_ok": lengths[ok].sum(), "n_ok": ok.sum(),
                 "len_bad": lengths[~ok].sum(), "n_bad": (~ok).sum(), "len": lengths.sum(),
                 "n": len(batch["comps"]), "refl_ok": refl[ok].sum(), "refl_bad": refl[~ok].sum(),
                 "t_grade": sum(batch["t_grade"]), "zero_adv_frac": adv_stats["zero_adv_group_frac"],
                 "mismatch": mismatch * ok_tokens if finite else 0.0, "mismatch_tokens": ok_tokens,
                 "nan_logprobs": batch["nan_logprobs"], "timeouts": batch["timeouts"],
                 "grader_errors": batch["grader_errors"], **summed}, run.device)
    n, n_ok, n_bad = s["n"], max(s["n_ok"], 1), max(s["n_bad"], 1)
    lm = L.mean_metrics({k: s[k] for k in summed if not k.startswith("entropy")})
    rec = {"iteration": it + 1, "reward": s["reward"] / n, "accuracy": s["correct"] / n,
           "format_rate": s["formatted"] / n, "truncation_rate": s["truncated"] / n,
           "len_correct": s["len_ok"] / n_ok, "len_incorrect": s["len_bad"] / n_bad,
           "len_mean": s["len"] / n, "zero_adv_group_frac": s["zero_adv_frac"] / world,
           # the paper's self-reflection keywords (eval.py), in correct and in incorrect responses
           "reflection_correct": s["refl_ok"] / n_ok, "reflection_incorrect": s["refl_bad"] / n_bad,
           # nan, not 0 (a perfect sync), when no response was scored: all of them left out of the update
           "logprob_mismatch": s["mismatch"] / s["mismatch_tokens"] if s["mismatch_tokens"] else math.nan,
           "nan_logprobs": s["nan_logprobs"], "entropy": s["entropy"] / max(s["entropy_tokens"], 1),
           **{k: v for k, v in lm.items() if k != "tokens"}, "trained_tokens": s["tokens"],
           "micro_steps": sum(len(plan) for minibatches in plans for _, plan in minibatches),
           "grad_norm": sum(grad_norms) / len(grad_norms), "lr": run.sched.get_last_lr()[0],
           "adv_std": adv_stats["adv_std"], "grader_timeouts": s["timeouts"],  # adv_std: rank 0's groups
           "grader_errors": s["grader_errors"],  # grader exceptions: each scored 0
           # real tokens / tokens the update paid for (each micro-step costs world x its busiest row)
           "update_token_efficiency": sum(map(sum, rows_tokens)) / (world * sum(map(max, rows_tokens)))
           if rows_tokens else math.nan,
           "t_generate": t["rollout"] - t["start"] - s["t_grade"] / world, "t_grade": s["t_grade"] / world,
           "t_train": t["update"] - t["rollout"], "t_sync": t["sync"] - t["update"],
           "tokens_per_s": s["len"] / (t["sync"] - t["start"])}
    if cfg.dynamic_sampling:  # groups sampled but not trained on (all-equal rewards, or beyond the batch)
        rec.update(dropped_group_frac=1 - len(seqs) / adv_stats["generated"],
                   sampling_rounds=1 + batch["rounds"], trained_groups=len(seqs) // cfg.group_size)
    return rec


def evaluate_heldout(run: Run, rows: list) -> dict:
    """Mean template reward on the held-out set, each rank scoring its share (eval.py's protocol), and with
    --eval-n > 1 pass@k (unbiased estimator) for k = 1, 2, 4, ... up to eval_n."""
    from eval import evaluate, pass_at_k, pass_ks
    cfg, n = run.cfg, run.cfg.eval_n
    size = f"{len(rows[run.rank::run.world])} problems x {n} of up to {cfg.eval_max_new_tokens} tokens"
    with out_of_memory("the evaluation", size, "--gpu-memory-utilization or --eval-max-new-tokens"):
        _, records = evaluate(run.engine, run.pool, rows[run.rank::run.world], cfg.template, n=n,
                              temperature=cfg.eval_temperature, top_p=1.0,
                              max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed, tokenizer=run.tokenizer)
    groups = [records[j:j + n] for j in range(0, len(records), n)]  # problem-major
    ks = pass_ks(n) if n > 1 else []
    passed = {f"pass@{k}": sum(pass_at_k(n, sum(r["reward"] > 0 for r in g), k) for g in groups) for k in ks}
    sums = {k: sum(r[k] for r in records) for k in ("reward", "lenient", "length")}
    sums["format"] = sum(r["extracted"] is not None for r in records)  # the template's answer form was found
    s = all_sum(sums | {"n": len(records), "problems": len(groups)} | passed, run.device)
    return {"eval_accuracy": s["reward"] / s["n"], "eval_format_rate": s["format"] / s["n"],
            "eval_lenient": s["lenient"] / s["n"], "eval_length": s["length"] / s["n"],
            **{f"eval_{k}": s[k] / s["problems"] for k in passed}}


FLAT_ITERATIONS = 5  # a run whose every group had equal rewards for this many first iterations is told so


def log_iteration(logs: Logs, rec: dict, batch: dict, cfg: Config, rank: int):
    """9. One fixed-format line, the metrics record, and every --log-samples-every iterations some samples."""
    if rank != 0:
        return
    it = rec["iteration"]
    logs.bar.update(1)
    line = (f"it {it:4d} | reward {rec['reward']:.3f} | acc {rec['accuracy']:.3f} | "
            f"len {rec['len_mean']:6.1f} (ok {rec['len_correct']:.0f} / bad {rec['len_incorrect']:.0f}) | "
            f"trunc {rec['truncation_rate']:.2f} | "
            f"clip {rec['clip_frac_low']:.3f}/{rec['clip_frac_high']:.3f} | "
            f"ent {rec['entropy']:.3f} | gnorm {rec['grad_norm']:.3f} | mism {rec['logprob_mismatch']:.1e} | "
            f"t {rec['t_generate'] + rec['t_grade'] + rec['t_train'] + rec['t_sync']:.1f}s "
            f"(gen {rec['t_generate']:.1f} grade {rec['t_grade']:.1f} train {rec['t_train']:.1f} "
            f"on {rec['trained_tokens']:.0f} tok "
            f"sync {rec['t_sync']:.1f})")
    if cfg.dynamic_sampling:
        line += f" | drop {rec['dropped_group_frac']:.2f} x{rec['sampling_rounds']}"
    if "is_masked" in rec:  # --is-mode token-mask / sequence-mask: the share of tokens / responses masked
        line += f" | masked {rec['is_masked']:.3f}/{rec['is_masked_responses']:.3f}"
    if "eval_accuracy" in rec:
        line += f" | eval {100 * rec['eval_accuracy']:.1f}%"
    if f"eval_pass@{cfg.eval_n}" in rec:
        line += f" pass@{cfg.eval_n} {100 * rec[f'eval_pass@{cfg.eval_n}']:.1f}%"
    logs.bar.write(line)
    logs.flat += it <= FLAT_ITERATIONS and rec["zero_adv_group_frac"] == 1
    if logs.flat == FLAT_ITERATIONS and it == FLAT_ITERATIONS:  # said once, and the run goes on
        logs.bar.write(f"train.py: note: in each of the first {it} iterations every group's rewards were "
                       f"equal (mean reward {rec['reward']:.2f}): no advantage, so nothing is learned. Check "
                       f"the golds of --questions, the --template's answer format and the grader (responses "
                       f"go to {logs.samples} every --log-samples-every {cfg.log_samples_every} iterations)")
    with open(logs.metrics, "a") as f:
        f.write(json.dumps(rec) + "\n")
    if logs.wandb is not None:
        logs.wandb.log(rec, step=it)
    if it % cfg.log_samples_every == 0:
        golds = [r for r in batch["rows"] for _ in range(cfg.group_size)]
        with open(logs.samples, "a") as f:
            for r, c, rw in list(zip(golds, batch["comps"], batch["rewards"].tolist()))[:2 * cfg.group_size]:
                f.write(json.dumps({"iteration": it, "problem": r["problem"], "gold": r["answer"],
                                    "response": c.text, "reward": rw, "truncated": c.truncated}) + "\n")


def save(run: Run, it: int, generation_config):
    """A checkpoint of iteration it: the HF directory, the trainer state, the config (checkpoint.py)."""
    cfg = run.cfg
    checkpoint.save(cfg.out_dir, it, run.model, run.opt, run.sched, run.tokenizer, generation_config,
                    asdict(cfg), {"iteration": it}, cfg.keep, run.rank,
                    torch.bfloat16 if run.device.type == "cuda" else torch.float32,
                    run.ref if cfg.ref_sync_every else None)


def finish(logs: Logs, rec: dict, iterations: int):  # the before -> after line and the run's curves
    from plot import plot_run
    with open(logs.metrics) as f:
        first = json.loads(f.readline())
    png = plot_run(logs.metrics)  # reward / accuracy, correct / incorrect lengths
    logs.bar.write(f"held-out accuracy: before {100 * first['eval_accuracy']:.1f}% -> after "
                   f"{100 * rec['eval_accuracy']:.1f}% ({iterations} iterations); curves: {png}")


def main(argv=None):
    parent = os.getppid()  # torchrun, read before anything slow (it may die while we start up)
    cfg = parse_config(argv)
    model_path = locate_model(cfg.model, hub_download)
    rank, world, device = start_process(cfg, parent)
    template = get_template(cfg.template)
    tokenizer, generation_config, questions, heldout, context = load_inputs(cfg, model_path, rank, device)
    latest = claim_out_dir(cfg, rank, world, device)  # only now is anything cleaned or written
    iterations = min(cfg.iterations, math.ceil(cfg.passes * len(questions) / cfg.rollout_batch))
    steps_per_iter = cfg.ppo_epochs * cfg.rollout_batch * cfg.group_size // cfg.train_batch
    run = Run(cfg, rank, world, device, tokenizer, model_path, tokenizer.pad_token_id or 0)
    build(run, iterations * steps_per_iter, context)
    start = resume(run, latest)
    logs = open_logs(run, heldout, start, iterations)

    for it in range(start, iterations):
        t = {"start": time.time()}
        rows, seeds = prompts(questions, it, cfg, rank, world)                  # 1. this rank's prompts
        batch = rollout(run, questions, rows, seeds, it, template)              # 2-3. generate, grade
        t["rollout"] = time.time()
        seqs, plans, adv_stats = plan_update(run, batch, it)                    # 4. advantages, the plan
        old, ref_old = old_logprobs(run, seqs, plans)                           # 5. old / reference log-probs
        summed, grad_norms, old = optimize(run, seqs, plans, old, ref_old)      # 6. the optimizer steps
        t["update"] = time.time()
        sync_engine(run)                                                        # 7. new weights to the engine
        t["sync"] = time.time()
        rec = iteration_record(run, it, batch, seqs, plans, adv_stats, old, summed, grad_norms, t)  # 8.
        final = it + 1 == iterations
        if (it + 1) % cfg.eval_every == 0 or final:
            rec.update(evaluate_heldout(run, heldout))
        log_iteration(logs, rec, batch, cfg, rank)                              # 9. log, checkpoint
        if (it + 1) % cfg.save_every == 0 or final:
            save(run, it + 1, generation_config)
        if final and rank == 0:
            finish(logs, rec, iterations)
    logs.bar.close()
    run.pool.close()
    # No destroy_process_group here: vLLM's own shutdown (at exit) tears down the process groups it shares.


def run_main(argv=None):
    """main(), with two endings as one line of ours and no traceback: Ctrl-C (torchrun passes SIGINT to every
    rank), and a rank whose peer failed (the peer's line says why; torchrun then stops this one)."""
    rank = os.environ.get("RANK", "0")
    try:
        main(argv)
    except KeyboardInterrupt:
        done = checkpoint.step_dirs(parse_config(argv).out_dir)
        print0("train.py: interrupted; " + (f"the last complete checkpoint is {done[-1]}" if done else
                                            "no checkpoint was written yet"), rank=int(rank))
        sys.exit(130)
    except RuntimeError as e:  # gloo's words for a peer process that is gone (NCCL waits for torchrun)
        peer_gone = any(w in str(e) for w in ("closed by peer", "reset by peer", "Broken pipe"))
        if os.environ.get("WORLD_SIZE", "1") == "1" or not peer_gone:
            raise
        time.sleep(30)  # torchrun ends this rank first, unless it has not noticed; then one line
        sys.exit(f"train.py: rank {rank}: another rank stopped ({type(e).__name__}: {str(e)[:200]})")


if __name__ == "__main__":
    run_main()
