"""The minibatch gradient does not depend on how the minibatch is packed into rows and split over ranks.

    torchrun --standalone --nproc_per_node 2 tests/dist_loss_check.py     # FSDP2 on gloo; prints OK lines

Each rank builds the same tiny Qwen2 and computes the reference gradient of the whole minibatch the padded way
(one right-padded row per response, attention mask, unwrapped model). Then it wraps the model with fully_shard
(each decoder layer, then the root) and runs train.py's own update path: `balance` splits the minibatch over
ranks by tokens and packs each rank's share into padding-free rows of at most BUDGET tokens, `packed_row` builds
each row, runs it with train.py's packed attention (one causal sdpa call per sequence), and .backward() is
accumulated over the micro-steps. The full gradient must equal the reference for every token budget. tests/test_loss.py imports the helpers for the world-size-1 case.
"""
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import loss as L  # noqa: E402
import model as M  # noqa: E402
import packing  # noqa: E402

M.register_packed_attention()

VOCAB = 256
G = 4             # samples per prompt
N = 8             # responses in the minibatch: 2 groups; this is the batch normaliser n_responses
MAX_NEW = 12      # Dr. GRPO's generation budget (also the longest response here)
TEMPERATURE = 0.7
BUDGETS = (1, 14, 30, 10_000)  # tokens per row: one sequence per row; 14: rank 1 runs an empty micro-step
# at world 2; a few per row, unevenly; all in one row


def tiny_model(tied: bool, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def padded(seqs: list, key: str = None) -> torch.Tensor:
    """Right-padded (N, T): the token ids (key None), or a per-response-token value at the response positions."""
    T = max(len(s["ids"]) for s in seqs)
    out = torch.zeros(len(seqs), T, dtype=torch.long if key is None else torch.float32)  # (N, T)
    for i, s in enumerate(seqs):
        if key is None:
            out[i, :len(s["ids"])] = s["ids"]
        else:
            out[i, s["prompt"]:len(s["ids"])] = s[key]
    return out


def padded_batch(seqs: list) -> dict:
    """The padded view of the minibatch: ids, attention mask, response mask, loss mask, (N, T) each."""
    T = max(len(s["ids"]) for s in seqs)
    pos = torch.arange(T)[None]                                                  # (1, T)
    length = torch.tensor([len(s["ids"]) for s in seqs])[:, None]                # (N, 1)
    prompt = torch.tensor([s["prompt"] for s in seqs])[:, None]                  # (N, 1)
    resp = (pos >= prompt) & (pos < length)                                      # (N, T)
    keep = torch.tensor([s["keep"] for s in seqs])[:, None]                      # (N, 1)
    return {"ids": padded(seqs), "attn": (pos < length).long(), "mask": resp, "loss": resp & keep}


def make_minibatch(model, seed: int = 0) -> list:
    """N responses in train.py's format (packing.responses), uneven prompt and response lengths, one response kept
    out of the loss entirely (as the overlong filter leaves it; it still counts in N), one sampler log-prob not
    usable. old/ref/sampler log-probs are the current policy's plus noise, so ratios move off 1 and some clip."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randint(2, 7, (N,), generator=g).tolist()                          # prompt lengths
    R = torch.randint(1, MAX_NEW + 1, (N,), generator=g).tolist()                # response lengths
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])                           # (N,) group 2 all equal
    seqs = [{"ids": torch.randint(1, VOCAB, (p + r,), generator=g), "prompt": p, "keep": i != 5, "reward": float(x)}
            for i, (p, r, x) in enumerate(zip(P, R, rewards))]
    b = padded_batch(seqs)
    with torch.no_grad():
        logp, _ = L.token_logprobs(model, b["ids"], b["attn"], b["mask"], TEMPERATURE)  # (N, T)
    for s, row in zip(seqs, logp):
        mine = row[s["prompt"]:len(s["ids"])]
        for key in ("old", "ref", "sampler"):
            s[key] = mine + 0.3 * torch.randn(mine.shape, generator=g)
        s["ok"] = torch.ones(len(mine), dtype=torch.bool)
    seqs[2]["ok"][0] = False  # the trainer's old value stands in for it (TIS weight 1), as in train.py
    return seqs


def set_advantages(seqs: list, algo: str):
    adv_fn = getattr(L, f"{algo}_advantages")
    adv, _ = adv_fn(torch.tensor([s["reward"] for s in seqs]), G)                 # (N,) on the whole minibatch
    for s, a in zip(seqs, adv.tolist()):
        s["adv"] = a


BETA = {"grpo": 0.05, "drgrpo": 0.0, "dapo": 0.0}  # loss_of's KL weights: what packing.trains needs to know


def loss_of(algo: str, seqs: list, logp, old, adv, seq, mask, ref, sampler):
    """Each objective with a different option switched on, so every code path is covered."""
    if algo == "grpo":  # clip-higher, the k3 KL, the token mask of --is-mode
        return L.grpo_loss(logp, old, adv, seq, mask, N, eps_high=0.28, beta=BETA[algo], ref_logp=ref,
                           sampler_logp=sampler, is_mode="token-mask", is_band=(0.5, 2.0))
    if algo == "dapo":  # GSPO's sequence-level ratio, the sequence mask; n_tokens: the minibatch's loss tokens
        n_tokens = sum(len(s["ids"]) - s["prompt"] for s in seqs if s["keep"])
        return L.dapo_loss(logp, old, adv, seq, mask, n_tokens, eps_high=0.28, ratio_level="sequence",
                           sampler_logp=sampler, is_mode="sequence-mask", is_band=(0.7, 1.4))
    return L.drgrpo_loss(logp, old, adv, seq, mask, N, MAX_NEW, tis_cap=1.5, sampler_logp=sampler)


def full_grads(model) -> dict:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters()}


def padded_grads(model, seqs: list, algo: str) -> dict:
    """The reference: the whole minibatch as right-padded rows in one forward/backward."""
    set_advantages(seqs, algo)
    model.zero_grad(set_to_none=True)
    b = padded_batch(seqs)
    logp, _ = L.token_logprobs(model, b["ids"], b["attn"], b["mask"], TEMPERATURE, chunk=5)
    seq = torch.arange(N)[:, None].expand_as(b["ids"])                           # (N, T)
    sampler = torch.where(padded(seqs, "ok").bool(), padded(seqs, "sampler"), padded(seqs, "old"))
    loss, _ = loss_of(algo, seqs, logp, padded(seqs, "old"), torch.tensor([s["adv"] for s in seqs]), seq, b["loss"],
                      padded(seqs, "ref"), sampler)
    loss.backward()
    return full_grads(model)


def packed_grads(model, seqs: list, algo: str, budget: int, rank: int, world: int, skip: bool = False) -> dict:
    """train.py's path: token-balanced plan, one packed row per micro-step, gradients accumulated. skip: as
    train.py, responses that cannot move the gradient (packing.trains) get no row; N stays the whole
    minibatch's."""
    set_advantages(seqs, algo)
    model.zero_grad(set_to_none=True)
    kept = [i for i, s in enumerate(seqs) if not skip or packing.trains(s, BETA[algo])]
    plan = packing.balance({i: len(seqs[i]["ids"]) for i in kept}, world, budget)
    if not plan:  # nothing left to compute on any rank: train.py's zero gradients
        M.zero_grads(model)
    for step in plan:
        row = packing.packed_row(seqs, step[rank], pad_id=0)
        logp, _ = L.token_logprobs(model, row["ids"], None, row["resp"], TEMPERATURE, chunk=5,
                                   position_ids=row["pos"])
        at = {k: packing.at_responses(row, [seqs[i][k] for i in row["idx"]]) for k in ("old", "ref")}
        sampler = packing.at_responses(row, [torch.where(seqs[i]["ok"], seqs[i]["sampler"], seqs[i]["old"])
                                           for i in row["idx"]])
        loss, _ = loss_of(algo, seqs, logp, at["old"], row["adv"], row["seq"], row["loss"], at["ref"], sampler)
        loss.backward()
    return full_grads(model)


def adamw_after(model, seqs: list, rank: int, world: int, skip: bool = False) -> list:
    """Parameters and AdamW state (full tensors, as lists) after a real step, then a step on a minibatch whose
    rewards are all equal: computed (today's zero gradient) or left out entirely (skip); weights restored."""
    model.zero_grad(set_to_none=True)  # nothing left from earlier checks (while the root is still sharded)
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for minibatch, skipping in ((seqs, False), ([dict(s, reward=1.0) for s in seqs], skip)):
        with torch.no_grad():  # as train.py's old_logprobs: FSDP2 leaves the root gathered after it
            model(input_ids=seqs[0]["ids"][None], use_cache=False)
        packed_grads(model, minibatch, "drgrpo", 30, rank, world, skip=skipping)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as train.py: mixed tensors would raise here
        opt.step()
        opt.zero_grad(set_to_none=True)
    full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).tolist()  # noqa: E731
    out = [full(p) for p in model.parameters()]
    out += [[full(v) if torch.is_tensor(v) else v for v in st.values()] for st in opt.state.values()]
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), start):
            p.copy_(p0)
    return out


def max_rel_err(grads: dict, ref: dict) -> float:
    return max(float((grads[n] - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1e-12)) for n in ref)


def main():
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for tied in (False, True):
        model = tiny_model(tied)
        seqs = make_minibatch(model)
        refs = {algo: padded_grads(model, seqs, algo) for algo in ("grpo", "drgrpo", "dapo")}
        model.set_attn_implementation("packed_sdpa")  # train.py's attention on CPU: one sdpa call per sequence
        plan = packing.balance({i: len(s["ids"]) for i, s in enumerate(seqs)}, world, 14)
        assert world == 1 or [] in plan[-1], "budget 14 no longer gives a rank an empty micro-step"
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in fsdp_modules:  # sum over ranks: the loss already divides by the global N
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
        for algo, ref in refs.items():
            for budget in BUDGETS:
                err = max_rel_err(packed_grads(model, seqs, algo, budget, rank, world), ref)
                assert err < 1e-5, f"tied={tied} {algo} budget={budget}: max rel err {err:.2e}"
                skip = max_rel_err(packed_grads(model, seqs, algo, budget, rank, world, skip=True), ref)
                assert skip < 1e-5, f"tied={tied} {algo} budget={budget} skipping: max rel err {skip:.2e}"
                if rank == 0:
                    print(f"OK world={world} tied={tied} {algo} budget={budget} max_rel_err={err:.1e} "
                          f"skipping {N - sum(packing.trains(s, BETA[algo]) for s in seqs)}: {skip:.1e}",
                          flush=True)
        assert adamw_after(model, seqs, rank, world, skip=True) == adamw_after(model, seqs, rank, world)
        if rank == 0:
            print(f"OK world={world} tied={tied} AdamW after an all-skipped step equals a zero-gradient step")
        # The check is sensitive to FSDP2's default (average over ranks): it would scale the gradient by 1/world.
        for m in fsdp_modules:
            m.set_gradient_divide_factor(float(world))
            m.set_force_sum_reduction_for_comms(False)
        err = max_rel_err({n: world * g for n, g in packed_grads(model, seqs, "grpo", 1, rank, world).items()},
                          refs["grpo"])
        assert err < 1e-5, f"default divide factor did not average: {err:.2e}"
    dist.destroy_process_group()
    if rank == 0:
        print("ALL OK", flush=True)


if __name__ == "__main__":
    main()
