"""loss.py: hand-computed values for both objectives, the invariants that define them, the chunked log-probs
against the naive full log_softmax, packed rows against sequences run alone, and the minibatch gradient of
train.py's packed, token-balanced update against the padded one under token budgets x ranks {1, 2}."""
import math
import os
import subprocess
import sys

import pytest
import torch

import loss as L
import model as M
import packing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_loss_check as D  # noqa: E402  (the torchrun script; its helpers serve the world-size-1 case)

torch.set_num_threads(1)
SQRT3 = math.sqrt(3.0)
ONE_MINUS_LN2 = 1.0 - math.log(2.0)


def hand_batch():
    """2 responses: A = +1 with ratios (1.1, 0.7, 1.5); A = -1 with ratios (1.3, 0.5, [masked 2.0])."""
    ratios = torch.tensor([[1.1, 0.7, 1.5], [1.3, 0.5, 2.0]], dtype=torch.float64)
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp = ratios.log().requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return logp, old, torch.tensor([1.0, -1.0], dtype=torch.float64), mask


def rows_seq(shape):
    """seq for right-padded rows: every token of row i belongs to response i."""
    return torch.arange(shape[0])[:, None].expand(shape)                        # (B, T)


def test_advantages_hand_values():
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1])
    adv, st = L.grpo_advantages(r, 4)
    # group 1: mean 1/2, unbiased std sqrt(1/3); group 2: all equal; group 3: mean 1/4, unbiased std 1/2
    g1 = 0.5 / (1 / SQRT3 + 1e-6)
    want = [g1, -g1, -g1, g1, 0, 0, 0, 0] + [x / (0.5 + 1e-6) for x in (-0.25, -0.25, -0.25, 0.75)]
    torch.testing.assert_close(adv, torch.tensor(want), rtol=1e-6, atol=1e-7)
    assert st["zero_adv_group_frac"] == pytest.approx(1 / 3)
    assert st["adv_max"] == pytest.approx(0.75 / 0.5, rel=1e-5) and st["adv_min"] == pytest.approx(-g1)
    adv, st = L.drgrpo_advantages(r, 4)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.25, -0.25, -0.25, 0.75]))
    assert st["zero_adv_group_frac"] == pytest.approx(1 / 3) and st["adv_mean"] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("opts, grpo_want, drgrpo_want, dapo_want", [
    # per-token max(-A r, -A clip(r, 0.8, 1.2)): row 0 -> -1.1, -0.7, -1.2; row 1 -> 1.3, 0.8. N = 4 responses
    # (GRPO, Dr. GRPO with budget 4); DAPO divides the token sum by the 5 loss tokens.
    ({}, ((-3.0 / 3) + (2.1 / 2)) / 4, (-3.0 + 2.1) / 4 / 4, (-3.0 + 2.1) / 5),
    # clip-higher eps_high = 0.28: ratio 1.5 (A > 0) clips at 1.28 instead
    ({"eps_high": 0.28}, ((-3.08 / 3) + (2.1 / 2)) / 4, (-3.08 + 2.1) / 4 / 4, (-3.08 + 2.1) / 5),
    # k3 KL with ref = logp + ln 2 on every token: 2 - ln 2 - 1 per token, weight 0.1
    ({"beta": 0.1, "kl": True}, ((-3.0 / 3) + (2.1 / 2) + 2 * 0.1 * ONE_MINUS_LN2) / 4,
     (-3.0 + 2.1 + 5 * 0.1 * ONE_MINUS_LN2) / 4 / 4, (-3.0 + 2.1 + 5 * 0.1 * ONE_MINUS_LN2) / 5),
    # TIS: p_old / p_sampler = 3 on token (0, 0), 0.5 elsewhere; cap 2.5 -> weights 2.5 and 0.5
    ({"tis_cap": 2.5, "tis": True}, ((-2.75 - 0.35 - 0.6) / 3 + (0.65 + 0.4) / 2) / 4,
     (-2.75 - 0.35 - 0.6 + 0.65 + 0.4) / 4 / 4, (-2.75 - 0.35 - 0.6 + 0.65 + 0.4) / 5),
])
def test_losses_hand_values(opts, grpo_want, drgrpo_want, dapo_want):
    logp, old, adv, mask = hand_batch()
    kw = {k: v for k, v in opts.items() if k in ("eps_high", "beta", "tis_cap")}
    if opts.get("kl"):
        kw["ref_logp"] = logp.detach() + math.log(2.0)
    if opts.get("tis"):
        w = torch.tensor([[3.0, 0.5, 0.5], [0.5, 0.5, 0.5]], dtype=torch.float64)
        kw["sampler_logp"] = old - w.log()
    seq = rows_seq(mask.shape)                                                   # (2, 3)
    loss_g, m = L.grpo_loss(logp, old, adv, seq, mask, 4, **kw)
    loss_d, m_d = L.drgrpo_loss(logp, old, adv, seq, mask, 4, 4, **kw)
    assert loss_g.item() == pytest.approx(grpo_want, rel=1e-9)
    assert loss_d.item() == pytest.approx(drgrpo_want, rel=1e-9)
    assert L.dapo_loss(logp, old, adv, seq, mask, 5, **kw)[0].item() == pytest.approx(dapo_want, rel=1e-9)
    means = L.mean_metrics(m)
    assert means["tokens"] == 5 and means["clip_frac_high"] == pytest.approx(1 / 5)
    assert means["clip_frac_low"] == pytest.approx(1 / 5)  # ratio 0.5 with A < 0; 0.7 with A > 0 is not clipped
    assert means["ratio_mean"] == pytest.approx(5.1 / 5)
    k3 = sum(r - 1 - math.log(r) for r in (1.1, 0.7, 1.5, 1.3, 0.5))
    assert means["approx_kl"] == pytest.approx(k3 / 5)
    assert ("kl" in m) == bool(opts.get("kl")) and ("tis_weight" in m) == bool(opts.get("tis"))
    if opts.get("kl"):
        assert means["kl"] == pytest.approx(ONE_MINUS_LN2)
    assert m.keys() == m_d.keys()
    # Metrics are sums: the two rows as two micro-batches add up to the whole.
    parts = [L.grpo_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], seq[:1], mask[i:i + 1], 4, **{
        k: (v[i:i + 1] if torch.is_tensor(v) else v) for k, v in kw.items()}) for i in range(2)]
    assert sum(p[0].item() for p in parts) == pytest.approx(loss_g.item(), rel=1e-12)
    for k in m:
        assert sum(float(p[1][k]) for p in parts) == pytest.approx(float(m[k]), rel=1e-12)


def test_sequence_ratio_is_gspo():
    """ratio_level="sequence": each response's ratio is the geometric mean of its tokens' (row 0: (1.1 * 0.7 *
    1.5)^(1/3), row 1: (1.3 * 0.5)^(1/2)); with GRPO's per-response mean that is GSPO's objective, and the
    gradient on each token is A_i s_i / (|o_i| N) (no clip is active here)."""
    logp, old, adv, mask = hand_batch()
    s0, s1 = (1.1 * 0.7 * 1.5) ** (1 / 3), (1.3 * 0.5) ** 0.5                    # 1.049, 0.806
    loss, m = L.grpo_loss(logp, old, adv, rows_seq(mask.shape), mask, 4, ratio_level="sequence")
    assert loss.item() == pytest.approx((-s0 + s1) / 4, rel=1e-9)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-s0 / 12] * 3, [s1 / 8, s1 / 8, 0]], dtype=torch.float64))
    assert L.mean_metrics(m)["clip_frac_low"] == 0 and L.mean_metrics(m)["ratio_mean"] == pytest.approx(
        (3 * s0 + 2 * s1) / 5)


def mismatch_batch(w0=(1.2, 3.0, 1.0)):
    """2 responses at ratio 1 (old = logp): A = +1 with sampler weights w = p_old / p_sampler of w0, A = -1 with
    w (0.3, 0.3, [masked])."""
    logp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([list(w0), [0.3, 0.3, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return logp, -w.log(), torch.tensor([1.0, -1.0], dtype=torch.float64), mask  # sampler = old - log w


# --is-mode by hand, band [0.5, 2]. Per-token terms -A: -1, -1, -1 | +1, +1. Dr. GRPO: token sums / 4, / N = 2.
# GRPO: token means over |o_i| = 3 and 2, which a mask must not shrink (a factor, not a change to the loss mask).
@pytest.mark.parametrize("mode, cap, drgrpo, grpo, masked, masked_responses", [
    ("tis", 2.0, (-(1.2 + 2 + 1) + 0.6) / 4 / 2, (-4.2 / 3 + 0.3) / 2, None, None),   # weights min(w, 2)
    ("token-mask", None, -2 / 4 / 2, -2 / 3 / 2, 3, 2),      # w 3.0 out; w 0.3, 0.3 out: both responses hit
    ("token-mask", 1.5, -2.2 / 4 / 2, -2.2 / 3 / 2, 3, 2),   # the kept tokens weighed by min(w, 1.5)
    ("sequence-mask", None, -3 / 4 / 2, -3 / 3 / 2, 2, 1),   # geometric means 3.6^(1/3) = 1.53 in, 0.3 out
])
def test_sampler_mismatch_modes_hand_values(mode, cap, drgrpo, grpo, masked, masked_responses):
    for algo, want in (("drgrpo", drgrpo), ("grpo", grpo)):
        logp, sampler, adv, mask = mismatch_batch()
        extra = (4,) if algo == "drgrpo" else ()
        loss, m = getattr(L, f"{algo}_loss")(logp, logp.detach(), adv, rows_seq(mask.shape), mask, 2, *extra,
                                             sampler_logp=sampler, tis_cap=cap, is_mode=mode,
                                             is_band=(0.5, 2.0))
        assert loss.item() == pytest.approx(want, rel=1e-9), (mode, cap, algo)
        loss.backward()
        assert logp.grad[~mask].abs().max() == 0
        if masked is not None:  # counted: tokens, and responses with any masked token
            assert (m["is_masked"], m["is_masked_responses"], m["responses"]) == (masked, masked_responses, 2)
            means = L.mean_metrics({k: v for k, v in m.items()})
            assert means["is_masked"] == pytest.approx(masked / 5)
            assert means["is_masked_responses"] == pytest.approx(masked_responses / 2)
        else:
            assert "is_masked" not in m
    # DAPO: N is the minibatch's 5 loss tokens, masked ones included (fixed before the first forward)
    logp, sampler, adv, mask = mismatch_batch()
    loss, _ = L.dapo_loss(logp, logp.detach(), adv, rows_seq(mask.shape), mask, 5, sampler_logp=sampler,
                          is_mode="sequence-mask", is_band=(0.5, 2.0))
    assert loss.item() == pytest.approx(-3 / 5)


def response_batch(lengths, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]                # (B, T)
    logp = (-torch.rand(len(lengths), T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    return logp, mask


def test_ratio_one_is_reinforce():
    """With old = logp (ratio 1, no clipping) and beta = 0 the gradient on the MODEL equals REINFORCE's."""
    model = D.tiny_model(tied=False)
    b = D.padded_batch(D.make_minibatch(model))
    adv = torch.linspace(-1, 1, D.N)                                             # (N,)
    m = b["mask"].float()                                                        # (N, T)
    seq = rows_seq(m.shape)                                                      # (N, T)
    for name in ("grpo", "drgrpo"):
        model.zero_grad()
        logp, _ = L.token_logprobs(model, b["ids"], b["attn"], b["mask"], D.TEMPERATURE)
        if name == "grpo":
            loss, _ = L.grpo_loss(logp, logp.detach(), adv, seq, b["mask"], D.N)
            norm = m.sum(1).clamp(min=1)                                         # (N,) |o_i|
        else:
            loss, _ = L.drgrpo_loss(logp, logp.detach(), adv, seq, b["mask"], D.N, D.MAX_NEW)
            norm = torch.full((D.N,), float(D.MAX_NEW))                          # (N,)
        loss.backward()
        ours = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        logp, _ = L.token_logprobs(model, b["ids"], b["attn"], b["mask"], D.TEMPERATURE)
        reinforce = -(adv * (logp * m).sum(1) / norm).sum() / D.N
        reinforce.backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-5, atol=1e-9)
        assert max(g.abs().max() for g in ours.values()) > 0


def test_per_token_gradient_vs_response_length():
    """Dr. GRPO: every token's gradient is -A / (max_new_tokens N) whatever the length; GRPO: -A / (|o| N);
    DAPO: -A / (loss tokens in the minibatch)."""
    logp, mask = response_batch([2, 6])
    adv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    L.drgrpo_loss(logp, logp.detach(), adv, rows_seq(mask.shape), mask, 2, 8)[0].backward()
    torch.testing.assert_close(logp.grad[mask], torch.full((8,), -1 / (8 * 2), dtype=torch.float64))
    logp.grad = None
    L.grpo_loss(logp, logp.detach(), adv, rows_seq(mask.shape), mask, 2)[0].backward()
    assert torch.allclose(logp.grad[0, :2], torch.tensor(-1 / (2 * 2), dtype=torch.float64))
    assert torch.allclose(logp.grad[1, :6], torch.tensor(-1 / (6 * 2), dtype=torch.float64))
    # DAPO: every token -A / (tokens in the minibatch) = -1/8 whatever its response's length; but a token's
    # weight falls when OTHER responses in the batch grow (here the 2-token response's, as the other grows to 8)
    logp.grad = None
    L.dapo_loss(logp, logp.detach(), adv, rows_seq(mask.shape), mask, int(mask.sum()))[0].backward()
    torch.testing.assert_close(logp.grad[mask], torch.full((8,), -1 / 8, dtype=torch.float64))
    logp, mask = response_batch([2, 8])
    L.dapo_loss(logp, logp.detach(), adv, rows_seq(mask.shape), mask, int(mask.sum()))[0].backward()
    torch.testing.assert_close(logp.grad[0, :2], torch.full((2,), -1 / 10, dtype=torch.float64))


@pytest.mark.parametrize("algo", ["grpo", "drgrpo", "dapo"])
def test_equal_reward_groups_give_zero_gradient(algo):
    rewards = torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0])  # groups 1 and 3 all equal
    adv_fn, loss_fn = getattr(L, f"{algo}_advantages"), getattr(L, f"{algo}_loss")
    adv, st = adv_fn(rewards, 4)
    logp, mask = response_batch([3, 5, 8, 1] * 3)
    old = logp.detach() + 0.3 * torch.randn(12, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    extra = (8,) if algo == "drgrpo" else ()
    loss_fn(logp, old, adv.double(), rows_seq(mask.shape), mask, 12, *extra)[0].backward()
    assert st["zero_adv_group_frac"] == pytest.approx(2 / 3)
    assert logp.grad[:4].abs().max() == 0 and logp.grad[8:].abs().max() == 0
    assert logp.grad[4:8].abs().max() > 0


@pytest.mark.parametrize("algo", ["grpo", "drgrpo", "dapo"])
def test_equal_fractional_rewards_give_exactly_zero_advantage(algo):
    """With --format-reward 0.2 an all-correct group's rewards are 1.2 each, whose mean is rounded: GRPO's and
    DAPO's std + eps would turn that into +-0.119 of noise (Dr. GRPO's into 1.2e-7). Exactly 0 instead, which
    is also what lets the update leave those responses out (packing.trains)."""
    rewards = torch.tensor([1.2] * 8 + [0.2] * 8 + [1.2, 0.2] * 4)
    adv, stats = getattr(L, f"{algo}_advantages")(rewards, 8)
    assert adv[:16].eq(0).all() and stats["zero_adv_group_frac"] == pytest.approx(2 / 3)
    assert adv[16:].abs().min() > 0.4  # the informative group keeps its advantages
    assert not packing.trains({"keep": True, "adv": float(adv[0])}, beta=0.0)
    assert packing.trains({"keep": True, "adv": float(adv[0])}, beta=0.01)  # its KL term still moves it
    assert not packing.trains({"keep": False, "adv": float(adv[16])}, beta=0.01)  # filtered: masked whole


@pytest.mark.parametrize("algo", ["grpo", "drgrpo", "dapo"])
def test_masked_tokens_get_zero_gradient(algo):
    logp, mask = response_batch([3, 8, 5, 0])
    mask[1, 2] = False
    g = torch.Generator().manual_seed(2)
    noise = [0.5 * torch.randn(4, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    kw = dict(beta=0.1, ref_logp=logp.detach() + noise[1], tis_cap=2.0, sampler_logp=logp.detach() + noise[2])
    for x, bad in zip((kw["ref_logp"], kw["sampler_logp"], noise[0]), (float("inf"), float("nan"), -float("inf"))):
        x[~mask] = bad  # padding may hold anything (e.g. a sampler's -inf); it must not leak in
    adv = torch.tensor([1.0, -0.5, 2.0, 1.0], dtype=torch.float64)
    fn = {"grpo": L.grpo_loss, "dapo": L.dapo_loss, "drgrpo": lambda *a, **k: L.drgrpo_loss(*a[:6], 8, **k)}[algo]
    loss, metrics = fn(logp, logp.detach() + noise[0], adv, rows_seq(mask.shape), mask, 4, **kw)
    loss.backward()
    assert torch.isfinite(loss) and all(math.isfinite(float(v)) for v in metrics.values())
    assert logp.grad[~mask].abs().max() == 0
    assert (logp.grad[mask] != 0).all()


@pytest.mark.parametrize("tied", [False, True])
def test_token_logprobs_match_naive_log_softmax(tied):
    model = D.tiny_model(tied)
    b = D.padded_batch(D.make_minibatch(model))
    w = torch.randn(b["mask"].shape, generator=torch.Generator().manual_seed(3))  # (N, T)
    logp, ent = L.token_logprobs(model, b["ids"], b["attn"], b["mask"], 0.7, chunk=5)
    (logp * w).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=b["ids"], attention_mask=b["attn"]).logits / 0.7    # (N, T, V)
    full = logits.log_softmax(-1)                                                # (N, T, V)
    naive = torch.zeros_like(logp)
    naive[:, 1:] = full[:, :-1].gather(2, b["ids"][:, 1:, None]).squeeze(2)
    naive = naive * b["mask"]                                                    # (N, T)
    naive_ent = torch.zeros_like(ent)
    naive_ent[:, 1:] = -(full[:, :-1].exp() * full[:, :-1]).sum(-1)
    naive_ent = naive_ent * b["mask"]
    torch.testing.assert_close(logp, naive, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, naive_ent, rtol=0, atol=1e-5)
    assert (logp[~b["mask"]] == 0).all() and (logp[b["mask"]] < 0).all() and not ent.requires_grad
    (naive * w).sum().backward()
    assert D.max_rel_err(ours, {n: p.grad for n, p in model.named_parameters()}) < 1e-5
    # The default chunk (one chunk here) gives the same values.
    torch.testing.assert_close(L.token_logprobs(model, b["ids"], b["attn"], b["mask"], 0.7)[0], logp)


def test_packed_row_equals_sequences_alone():
    """A packed row (position_ids restarting at 0, no attention mask) gives each sequence the log-probs and
    gradient it gets alone in a padded batch, with transformers' block mask and with train.py's per-sequence
    attention: attention does not cross sequences. Without the restarting positions it would (the check can
    fail)."""
    model = D.tiny_model(tied=True)
    seqs = D.make_minibatch(model)
    D.set_advantages(seqs, "drgrpo")
    b = D.padded_batch(seqs)
    logp, _ = L.token_logprobs(model, b["ids"], b["attn"], b["mask"], 0.7)
    want = torch.cat([row[m] for row, m in zip(logp.detach(), b["mask"])])
    logp.sum().backward()
    want_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    row = packing.packed_row(seqs, list(range(D.N)), pad_id=0)
    assert row["ids"].shape == (1, sum(len(s["ids"]) for s in seqs))  # no padding at all
    M.register_packed_attention()
    for attn, pos, ok in (("sdpa", row["pos"], True), ("packed_sdpa", row["pos"], True), ("sdpa", None, False)):
        model.set_attn_implementation(attn)
        model.zero_grad()
        logp, _ = L.token_logprobs(model, row["ids"], None, row["resp"], 0.7, position_ids=pos)
        got = logp[row["resp"]]
        assert torch.allclose(got.detach(), want, rtol=0, atol=1e-5) == ok
        if ok:
            logp.sum().backward()
            assert D.max_rel_err({n: p.grad for n, p in model.named_parameters()}, want_grad) < 1e-5


def test_balance_splits_by_tokens():
    """Ranks get nearly equal tokens (not equal counts), rows stay within the budget unless one sequence is
    longer, every rank runs the same number of micro-steps, and the plan is a pure function of its input."""
    lengths = {i: n for i, n in enumerate([900, 40, 35, 30, 300, 20, 25, 610, 15, 45, 70, 1500])}
    plan = packing.balance(lengths, world=2, max_tokens=1000)
    assert plan == packing.balance(dict(reversed(lengths.items())), world=2, max_tokens=1000)
    assert all(len(step) == 2 for step in plan)
    placed = sorted(i for step in plan for row in step for i in row)
    assert placed == sorted(lengths)  # each sequence exactly once
    load = [sum(lengths[i] for step in plan for i in step[r]) for r in range(2)]
    assert abs(load[0] - load[1]) <= max(lengths.values()) and abs(load[0] - load[1]) < 0.1 * sum(load)
    for step in plan:
        for row in step:
            assert sum(lengths[i] for i in row) <= 1000 or len(row) == 1
    # one rank, a budget of one token: every sequence alone, longest first
    alone = packing.balance(lengths, world=1, max_tokens=1)
    assert [step[0] for step in alone] == [[i] for i in sorted(lengths, key=lambda i: (-lengths[i], i))]


@pytest.mark.parametrize("attn", ["packed_sdpa", "sdpa"])
def test_minibatch_gradient_world_1(attn):
    """train.py's packed update, token budgets from one sequence per row to one row, against the padded path;
    with train.py's per-sequence attention and with transformers' own block mask (the path flash-attention's
    varlen kernel takes on GPU, from the same position_ids)."""
    model = D.tiny_model(tied=False)
    seqs = D.make_minibatch(model)
    for algo in ("grpo", "drgrpo", "dapo"):
        model.set_attn_implementation("sdpa")
        ref = D.padded_grads(model, seqs, algo)
        assert max(g.abs().max() for g in ref.values()) > 0
        model.set_attn_implementation(attn)
        for budget in D.BUDGETS:
            got = D.packed_grads(model, seqs, algo, budget, rank=0, world=1)
            assert D.max_rel_err(got, ref) < 1e-5, (algo, budget)
            got = D.packed_grads(model, seqs, algo, budget, rank=0, world=1, skip=True)  # as train.py
            assert D.max_rel_err(got, ref) < 1e-5, (algo, budget, "skipping")


def test_minibatch_gradient_world_2_fsdp2():
    """Real torchrun, 2 gloo ranks, FSDP2 fully_shard on each layer and the root (tests/dist_loss_check.py)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_loss_check.py")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        script], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("OK world=2") == 2 * 3 * len(D.BUDGETS) + 2 and "ALL OK" in p.stdout
    assert "dapo budget=30 max_rel_err" in p.stdout and "skipping 4:" in p.stdout  # group 2 (the filtered one in it)
    assert p.stdout.count("AdamW after an all-skipped step equals a zero-gradient step") == 2


def test_bf16_head_numerics():
    """In bf16 (the GPU trainer's compute dtype) the sampled tokens' log-probs come from fp32 logits, and the
    head's gradient is summed over chunks in fp32. Compared with exact fp32 arithmetic on the same bf16 hidden
    states: the log-prob error (what the PPO ratio sees) stays at fp32 rounding, where rounding the logits to
    bf16 first would move it by ~0.2, and the head gradient over 98 chunks is within one bf16 rounding (2^-9)."""
    import copy

    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # logits of a trained model's size: |logit| up to ~30
    model = copy.deepcopy(model).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 200))                             # (B, T)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :10] = False                                                         # a prompt of 10 tokens
    logp, _ = L.token_logprobs(model, ids, None, mask, 0.7, chunk=4)            # (B, T), 98 chunks
    logp.sum().backward()
    # exact reference: the same bf16 hidden states and head weight, every operation in fp32
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]    # (B, T, H) bf16
    w = model.lm_head.weight.detach().float().requires_grad_()                   # (V, H)
    ref = (h.float() @ w.T / 0.7).log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    m = mask[:, 1:]
    ref[m].sum().backward()
    err = (logp[:, 1:] - ref).abs()[m].max().item()
    bf16_logits = (h @ model.lm_head.weight.T).float().div(0.7).log_softmax(-1)[:, :-1].gather(
        -1, ids[:, 1:, None]).squeeze(-1)                                        # the logits rounded to bf16 first
    rounded = (bf16_logits - ref).abs()[m].max().item()
    assert logp.dtype == torch.float32
    assert err < 1e-4 and rounded > 0.1, (err, rounded)  # rounded: 0.19
    g = model.lm_head.weight.grad.float()
    rel = ((g - w.grad).norm() / w.grad.norm()).item()
    assert rel < 2 ** -9, rel  # summing bf16 chunk gradients instead: 0.0043
