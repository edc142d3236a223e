"""How one iteration's responses become the update's work: balanced over ranks by tokens, packed into rows.

A response is a dict (`responses`): "ids" prompt + response token ids, "prompt" the prompt length, "adv" its
advantage, "keep" whether it is in the loss at all. train.py gathers every rank's responses to every rank. An
optimizer minibatch of them is split over ranks by tokens (`balance`), each rank's share packed into padding-free
rows (`packed_row`) whose attention stays inside each sequence (model.packed_attention, or flash-attention's
varlen kernel). Every function here is a pure function of its arguments, so every rank computes the same plan, and
a resumed run the same again.
"""
import torch


def responses(prompt_ids: list, completions: list, adv, keep, informative, round_) -> list:
    """This rank's responses as the update's dicts. Every rank gets all of them (train.py gathers them): the
    update splits minibatches over ranks by tokens, so any rank may train on any response. Per response:
    prompt + response ids, the prompt length, its advantage, whether it is in the loss (the overlong filter),
    the sampler's log-probs, and for dynamic sampling whether its group's rewards differ and its round."""
    return [{"ids": torch.tensor(p + c.token_ids), "prompt": len(p), "adv": float(a), "keep": bool(k),
             "sampler": torch.tensor(c.logprobs), "ok": torch.tensor(c.logprob_ok), "informative": bool(i),
             "round": r} for p, c, a, k, i, r in zip(prompt_ids, completions, adv.tolist(), keep.tolist(),
                                                     informative.tolist(), round_.tolist())]


def trains(seq: dict, beta: float) -> bool:
    """Whether a response can move the gradient at all. One the overlong filter keeps out of the loss cannot
    (its KL term is masked too); with beta = 0 neither can one whose advantage is exactly 0 (every response of
    an all-equal group): its per-token loss is -0 x ratio, whatever the ratio, clip or TIS weight. The update
    leaves such responses out of its rows (they still count in N)."""
    return seq["keep"] and (beta > 0 or seq["adv"] != 0)


def balance(lengths: dict, world: int, max_tokens: int) -> list:
    """Split one optimizer minibatch {sequence: tokens} over ranks and micro-steps: plan[step][rank] is the list
    of sequences one rank packs into one row at that step. Ranks get equal tokens, not equal counts (longest
    first, each to the least-loaded rank), then each rank's share is packed first-fit-decreasing into rows of
    at most max_tokens (a longer sequence gets a row of its own). Rows are ordered longest first, so ranks
    work on similar rows at each step; a rank with fewer rows runs empty ones, as FSDP2's collectives need
    every rank in every step. Deterministic: same plan on every rank and after resume."""
    order = sorted(lengths, key=lambda i: (-lengths[i], i))
    load, shares = [0] * world, [[] for _ in range(world)]
    for i in order:
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += lengths[i]
        shares[r].append(i)
    rows = []
    for share in shares:
        mine = []  # [tokens, sequences] per row
        for i in share:
            fit = next((row for row in mine if row[0] + lengths[i] <= max_tokens), None)
            if fit is None:
                mine.append([lengths[i], [i]])
            else:
                fit[0] += lengths[i]
                fit[1].append(i)
        rows.append([seqs for _, seqs in sorted(mine, key=lambda row: -row[0])])
    steps = max(map(len, rows))  # 0 for an empty minibatch: no micro-step at all
    return [[r[k] if k < len(r) else [] for r in rows] for k in range(steps)]


def packed_row(seqs: list, idx: list, pad_id: int) -> dict:
    """One padding-free row: the sequences idx back to back, position_ids restarting at 0 at each (attention
    stays inside a sequence), their per-response values, and `resp` to scatter response-token values in order.
    An empty idx gives a one-token row with nothing to learn (the empty micro-step of a less loaded rank)."""
    if not idx:
        zero = torch.zeros(1, 1, dtype=torch.long)                               # (1, 1)
        return {"ids": zero + pad_id, "pos": zero, "seq": zero, "resp": zero.bool(), "loss": zero.bool(),
                "adv": torch.zeros(1), "idx": [], "sizes": []}
    ids = torch.cat([seqs[i]["ids"] for i in idx])[None]                         # (1, T)
    pos = torch.cat([torch.arange(len(seqs[i]["ids"])) for i in idx])[None]     # (1, T)
    seq = torch.cat([torch.full((len(seqs[i]["ids"]),), k) for k, i in enumerate(idx)])[None]  # (1, T)
    resp = pos >= torch.tensor([seqs[i]["prompt"] for i in idx])[seq]            # (1, T)
    keep = torch.tensor([seqs[i]["keep"] for i in idx])                          # (S,)
    return {"ids": ids, "pos": pos, "seq": seq, "resp": resp, "loss": resp & keep[seq],
            "adv": torch.tensor([seqs[i]["adv"] for i in idx]), "idx": idx,       # adv: (S,)
            "sizes": [len(seqs[i]["ids"]) - seqs[i]["prompt"] for i in idx]}


def per_response(row: dict, logp) -> dict:
    """A row's (1, T) log-probs as {sequence: (R,) values of its response tokens}."""
    return dict(zip(row["idx"], torch.split(logp.detach()[row["resp"].to(logp.device)].float().cpu(), row["sizes"])))


def at_responses(row: dict, values: list):
    """Per-response vectors (one value per response token) laid out on the row: (1, T), zero elsewhere."""
    out = torch.zeros(row["resp"].shape)                                         # (1, T)
    return out.masked_scatter_(row["resp"], torch.cat(values)) if values else out
