"""The minibatch gradient does not depend on how the minibatch is split over micro-batches and ranks.

    torchrun --standalone --nproc_per_node 2 tests/dist_loss_check.py     # FSDP2 on gloo; prints OK lines

Each rank builds the same tiny Qwen2, computes the reference gradient of the whole minibatch in one piece on
the unwrapped model, then wraps it with fully_shard (each decoder layer, then the root), takes its share of
the responses, splits it into micro-batches of 1, 3 or uneven sizes, accumulates .backward() and compares the
full gradient with the reference. tests/test_loss.py imports the helpers for the world-size-1 case.
"""
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import loss as L  # noqa: E402

VOCAB = 256
G = 4             # samples per prompt
N = 8             # responses in the minibatch: 2 groups; this is the batch normaliser n_responses
MAX_NEW = 12      # Dr. GRPO's generation budget (also the longest response here)
TEMPERATURE = 0.7
SPLITS = ("1", "3", "uneven")


def tiny_model(tied: bool, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def make_minibatch(model, seed: int = 0) -> dict:
    """N right-padded prompt+response rows of uneven lengths, with a masked token inside one response and one
    response masked out entirely (as the overlong filter leaves it; it still counts in N). old/ref/sampler
    log-probs are the current policy's plus noise, so ratios move off 1 and some tokens clip."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randint(2, 7, (N,), generator=g)                                   # (N,) prompt lengths
    R = torch.randint(1, MAX_NEW + 1, (N,), generator=g)                         # (N,) response lengths
    T = int((P + R).max())
    pos = torch.arange(T)[None]                                                  # (1, T)
    attn = (pos < (P + R)[:, None]).long()                                       # (N, T)
    ids = torch.randint(0, VOCAB, (N, T), generator=g) * attn                    # (N, T) pad id 0
    mask = (pos >= P[:, None]) & (attn > 0)                                      # (N, T)
    mask[1, P[1]] = False
    mask[5] = False
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 1])                           # (N,) group-major
    with torch.no_grad():
        logp, _ = L.token_logprobs(model, ids, attn, mask, TEMPERATURE)          # (N, T)
    noisy = [logp + 0.3 * torch.randn(N, T, generator=g) for _ in range(3)]
    return {"ids": ids, "attn": attn, "mask": mask, "rewards": rewards,
            "old": noisy[0], "ref": noisy[1], "sampler": noisy[2]}


def loss_of(algo: str, logp, b: dict, adv):
    """Each objective with a different option switched on, so every code path is covered."""
    if algo == "grpo":  # clip-higher and the k3 KL
        return L.grpo_loss(logp, b["old"], adv, b["mask"], N, eps_high=0.28, beta=0.05, ref_logp=b["ref"])
    return L.drgrpo_loss(logp, b["old"], adv, b["mask"], N, MAX_NEW, tis_cap=1.5, sampler_logp=b["sampler"])


def split_sizes(spec: str, n: int, rank: int) -> list:
    """Micro-batch sizes for n local responses; every rank gets the same NUMBER of micro-batches (each
    backward is a collective under FSDP2) but not the same sizes."""
    if spec == "uneven":
        return [1, 3, n - 4] if n > 4 else ([1, n - 1] if rank % 2 == 0 else [n - 1, 1])
    k = int(spec)
    return [k] * (n // k) + ([n % k] if n % k else [])


def grads_of(model, batch: dict, rows: list, sizes: list, algo: str) -> dict:
    """Accumulate the backward of each micro-batch of `rows`; returns the full gradient of every parameter."""
    adv_fn = L.grpo_advantages if algo == "grpo" else L.drgrpo_advantages
    adv, _ = adv_fn(batch["rewards"], G)                                         # (N,) on the whole minibatch
    model.zero_grad(set_to_none=True)
    start = 0
    for s in sizes:
        r = rows[start:start + s]
        start += s
        T = int(batch["attn"][r].sum(1).max())  # pad only to this micro-batch's longest row
        b = {k: v[r, :T] for k, v in batch.items() if k != "rewards"}
        logp, _ = L.token_logprobs(model, b["ids"], b["attn"], b["mask"], TEMPERATURE, chunk=5)
        loss, _ = loss_of(algo, logp, b, adv[r])
        loss.backward()
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters()}


def max_rel_err(grads: dict, ref: dict) -> float:
    return max(float((grads[n] - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1e-12)) for n in ref)


def main():
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = list(range(rank, N, world))  # interleaved, so groups straddle ranks
    for tied in (False, True):
        model = tiny_model(tied)
        batch = make_minibatch(model)
        refs = {algo: grads_of(model, batch, list(range(N)), [N], algo) for algo in ("grpo", "drgrpo")}
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in fsdp_modules:  # sum over ranks: the loss already divides by the global N
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
        for algo, ref in refs.items():
            for spec in SPLITS:
                err = max_rel_err(grads_of(model, batch, rows, split_sizes(spec, len(rows), rank), algo), ref)
                assert err < 1e-4, f"tied={tied} {algo} micro={spec}: max rel err {err:.2e}"
                if rank == 0:
                    print(f"OK world={world} tied={tied} {algo} micro={spec} max_rel_err={err:.1e}", flush=True)
        # The check is sensitive to FSDP2's default (average over ranks): it would scale the gradient by 1/world.
        for m in fsdp_modules:
            m.set_gradient_divide_factor(float(world))
            m.set_force_sum_reduction_for_comms(False)
        err = max_rel_err({n: world * g for n, g in grads_of(model, batch, rows, [1] * len(rows), "grpo").items()},
                          refs["grpo"])
        assert err < 1e-4, f"default divide factor did not average: {err:.2e}"
    dist.destroy_process_group()
    if rank == 0:
        print("ALL OK", flush=True)


if __name__ == "__main__":
    main()
