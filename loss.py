"""Per-token log-probs, advantages, and the GRPO / Dr. GRPO / DAPO objectives side by side.

The paper's point fits in two lines: GRPO divides each advantage by its group's reward std (question-difficulty
bias) and each response's loss by its own length |o_i| (length bias); Dr. GRPO removes both. DAPO keeps the std
and replaces |o_i| by the number of response tokens in the whole minibatch: every token weighs the same, but
that weight still shrinks as the batch's responses grow. The three sections below are a deliberate
near-duplicate: diff any two and those lines are what differ.

Layout. The trainer packs several responses back to back into one padding-free row (train.py), so the loss
functions see tokens, not responses: logp, old_logp, mask and `seq` share one shape (a packed (1, T) row, or
(B, T) right-padded rows), seq[t] numbers the response that token t belongs to, and adv holds one advantage per
response, adv[seq] being the token's. A response never straddles two micro-batches, so a per-response sum
(GRPO's |o_i|) is complete inside one call.

Batch units. One optimizer step consumes a minibatch of N responses (global, across ranks), split into
micro-batches only to fit memory. Each loss function returns sum_{i in micro-batch} L_i / N, N = n_responses
(DAPO: n_tokens, the loss tokens of the whole minibatch) computed once by the caller before any backward, so
summing .backward() over micro-batches AND ranks yields the minibatch gradient (1/N) sum_i grad L_i. FSDP2
averages gradients over ranks by default, which would divide by the world size a second time, so on EVERY module
wrapped with fully_shard (the setting is per module, not inherited) call `m.set_gradient_divide_factor(1.0)` and
`m.set_force_sum_reduction_for_comms(True)` (a plain SUM reduce-scatter; gloo has no PREMUL_SUM).
tests/dist_loss_check.py checks this on 2 gloo ranks, packed and padded.

Metrics are summable: every value is a sum over the micro-batch's unmasked tokens (plus the token count
"tokens"); add them over micro-batches and ranks, then mean_metrics() divides by the count.
Options off by default, as in the paper's recipe: beta > 0 adds a k3 KL to a reference policy (with beta = 0 no
reference log-probs are needed, so none are passed); tis_cap = C weights each token by min(p_old / p_sampler, C)
(truncated importance sampling against the sampler's processed log-probs); ratio_level="sequence" gives every
token its response's ratio exp(mean_t log pi/pi_old), so the clip acts on whole responses: with GRPO's per-
response mean that is GSPO's objective (Zheng et al., 2025; its clip range is ~3e-4, not 0.2). The overlong filter
(zero the mask of truncated responses; they still count in N, as in Oat) and several PPO epochs live in train.py.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

STD_EPS = 1e-6  # GRPO: A = (R - mean) / (std + STD_EPS); keeps all-equal groups (std 0) at A = 0, not NaN


# ---- per-token log-probs without the (B, T, V) log-softmax ----------------------------------------------------
def _chunk_logprobs(h, weight, bias, targets, temperature: float):
    """log p(target) and entropy of softmax(h W^T / temperature) for a chunk of positions."""
    # fp32 logits even for bf16 models: inputs upcast BEFORE the matmul, so the logits are never rounded to bf16
    # (at |logit| ~ 20 that rounding alone moves a log-prob by ~0.04, a fifth of the PPO clip range). On GPU
    # train.py allows TF32 for fp32 matmuls: bf16 values are exact in TF32, so this runs on tensor cores at
    # half bf16 speed with fp32 accumulation and output. Divided by the temperature exactly as the sampler did
    # (in place: one buffer, and the matmul's backward does not need its output).
    logits = F.linear(h.float(), weight, bias).div_(temperature)                 # (C, V)
    logprobs = logits.log_softmax(-1)                                            # (C, V)
    del logits  # nothing saves it: at most two (C, V) buffers live here
    logp = logprobs.gather(1, targets[:, None]).squeeze(1)                       # (C,)
    # Entropy is for logging only. It comes after every tensor backward needs, so checkpoint's early stop
    # skips it when recomputing this chunk in backward; einsum contracts V without a (C, V) product buffer.
    with torch.no_grad():
        entropy = -torch.einsum("cv,cv->c", logprobs.exp(), logprobs)           # (C,)
    return logp, entropy


def token_logprobs(model, input_ids, attention_mask, targets_mask, temperature: float, chunk: int = 1024,
                   position_ids=None):
    """logp[:, t] = log p(input_ids[:, t] | input_ids[:, :t]) at the sampler's temperature, and the entropy of
    that next-token distribution (detached); both (B, T), zero wherever targets_mask is 0.

    Packed rows: pass position_ids restarting at 0 at each sequence and attention_mask=None; transformers then
    keeps attention inside each sequence (flash-attention's varlen kernel on GPU, a block-diagonal mask with sdpa).
    A target's previous token must belong to the same sequence: true when every sequence starts with its prompt.

    The output embedding is applied in chunks of `chunk` positions over the masked positions only, each under
    activation checkpointing: forward and backward hold the (chunk, V) buffers of one chunk at a time, never
    the (B, T, V) logits (fp32 logits of 8 x 4,096 tokens x Qwen's 151,936 vocabulary are 20 GB).
    """
    # logits_to_keep=1: the model's own head runs on one position only; we want the final (normed) hidden states.
    # use_cache=False is required for packing: with a cache object transformers builds no block mask.
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden = out.hidden_states[-1]                                               # (B, T, H)
    # Read the head weight AFTER the forward: FSDP2 unshards the root's params then and does not reshard them
    # until backward, so this is the full weight and its gradient is reduce-scattered like any other.
    head = model.get_output_embeddings()  # weight (V, H), bias None for Qwen2
    b, t = targets_mask[:, 1:].nonzero(as_tuple=True)  # the hidden state at t predicts token t + 1
    h = hidden[b, t]                                                             # (M, H)
    targets = input_ids[b, t + 1]                                                # (M,)
    # At least one (maybe empty) chunk keeps the graph connected when nothing is masked in, so every rank
    # still runs the same backward (FSDP2's collectives must match across ranks).
    # One fp32 copy of the head for all chunks (a no-op when it is fp32 already): autograd then sums the chunks'
    # head gradients in fp32 and casts to bf16 once, instead of adding dozens of bf16-rounded pieces.
    weight = head.weight.float()                                                 # (V, H)
    bias = None if head.bias is None else head.bias.float()
    pieces = [checkpoint(_chunk_logprobs, h[i:i + chunk], weight, bias, targets[i:i + chunk],
                         temperature, use_reentrant=False) for i in range(0, max(len(targets), 1), chunk)]
    logp = torch.cat([p[0] for p in pieces])                                     # (M,)
    entropy = torch.cat([p[1] for p in pieces])                                  # (M,)
    zeros = torch.zeros(input_ids.shape, dtype=logp.dtype, device=logp.device)   # (B, T)
    return zeros.index_put((b, t + 1), logp), zeros.index_put((b, t + 1), entropy.detach())


# ---- shared by both objectives ---------------------------------------------------------------------------------
def shape_rewards(correct, formatted, truncated, lengths, max_new_tokens: int, overlong_penalty: int,
                  format_reward: float):
    """Training reward from the grader's 0/1, plus format_reward for the template's format: a truncated
    response gets 0 (it never finished its answer), and with DAPO's soft overlong penalty the reward falls
    linearly to -1 over the last `overlong_penalty` tokens."""
    rewards = torch.where(truncated, 0.0, correct + format_reward * formatted)  # (B,)
    if overlong_penalty:
        rewards = rewards - (lengths - (max_new_tokens - overlong_penalty)).clamp(min=0) / overlong_penalty
    return rewards


def by_response(rewards, adv):
    """rewards, adv: (n_groups, G) -> advantages (B,) and their stats (logged once per batch). A group whose
    rewards are all equal gets exactly 0: its mean is rounded (1.2 is not a float), and GRPO's division by
    std + eps would blow the rounding up to +-0.1 of noise to train on."""
    equal = rewards.amax(1, keepdim=True) == rewards.amin(1, keepdim=True)       # (n_groups, 1)
    adv = torch.where(equal, 0.0, adv)                                           # (n_groups, G)
    stats = {"adv_mean": adv.mean().item(), "adv_std": adv.std().item(), "adv_min": adv.min().item(),
             "adv_max": adv.max().item(), "zero_adv_group_frac": equal.float().mean().item()}
    return adv.view(-1), stats


def policy_term(logp, old_logp, adv, seq, m, eps_low, eps_high, beta, ref_logp, sampler_logp, tis_cap,
                ratio_level, is_mode="tis", is_band=(0.5, 2.0)):
    """Per-token loss (B, T): PPO clipped surrogate (clip-higher: separate eps), the sampler correction and
    an optional k3 KL. Each token's advantage is its response's, adv[seq]. Returns the loss with the
    token-sum metrics."""
    a = adv[seq]                                                                 # (B, T)
    keep = m > 0  # where(), not a product: whatever padding holds (inf, nan) cannot reach the loss or gradient
    log_ratio = torch.where(keep, logp - old_logp, 0.0)                          # (B, T)
    if ratio_level == "sequence":  # GSPO: one ratio per response, exp of its tokens' MEAN log-ratio, on each token
        count = torch.zeros_like(adv, dtype=m.dtype).index_add(0, seq.flatten(), m.flatten())  # (S,)
        total = torch.zeros_like(adv, dtype=m.dtype).index_add(0, seq.flatten(), log_ratio.flatten())  # (S,)
        log_ratio = torch.where(keep, (total / count.clamp(min=1))[seq], 0.0)   # (B, T)
    ratio = log_ratio.exp()                                                      # (B, T)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)                             # (B, T)
    per_tok = torch.maximum(-a * ratio, -a * clipped)                            # (B, T)
    with torch.no_grad():  # tokens whose gradient the clip switched off, by side
        low = ((ratio < 1 - eps_low) & (a < 0)).float()                          # (B, T)
        high = ((ratio > 1 + eps_high) & (a > 0)).float()                        # (B, T)
        metrics = {"tokens": m.sum(), "clip_frac_low": (low * m).sum(), "clip_frac_high": (high * m).sum(),
                   "approx_kl": ((ratio - 1 - log_ratio) * m).sum(),  # k3 estimate of KL(old || new)
                   "ratio_mean": (ratio * m).sum()}
    if tis_cap is not None or is_mode != "tis":  # the sampler (vLLM's kernels) is not the trainer's policy
        log_w = old_logp - sampler_logp                                          # (B, T) log p_old / p_sampler
        per_tok = per_tok * sampler_correction(log_w, seq, m, adv, tis_cap, is_mode, is_band, metrics)
    if beta > 0:
        d = torch.where(keep, ref_logp - logp, 0.0)                              # (B, T)
        kl = d.exp() - d - 1  # k3 estimator of KL(new || ref): unbiased, >= 0    # (B, T)
        per_tok = per_tok + beta * kl
        metrics["kl"] = (kl.detach() * m).sum()
    return per_tok, metrics


def sampler_correction(log_w, seq, m, adv, tis_cap, is_mode: str, is_band: tuple, metrics: dict):
    """(B, T) detached factor on the per-token loss, from log w = log p_old / p_sampler per token. "tis": the
    truncated weight min(w, tis_cap). "token-mask": 0 for a token whose w lies outside is_band.
    "sequence-mask": 0 for every token of a response whose geometric-mean w lies outside it. A mask may
    combine with tis_cap (the weights then apply to the kept tokens). A factor, not a change to the loss mask:
    GRPO's |o_i| and every N still count the masked tokens."""
    keep = m > 0
    log_w = torch.where(keep, log_w, 0.0).detach()                               # (B, T)
    factor = log_w.exp().clamp(max=tis_cap) if tis_cap is not None else torch.ones_like(log_w)  # (B, T)
    if tis_cap is not None:
        metrics["tis_weight"] = (factor * m).sum()
    if is_mode == "tis":
        return factor
    lo, hi = torch.tensor(is_band, dtype=log_w.dtype).log()
    count = torch.zeros_like(adv, dtype=m.dtype).index_add(0, seq.flatten(), m.flatten())  # (S,) |o_i|
    if is_mode == "sequence-mask":  # the response's geometric-mean ratio, on each of its tokens
        total = torch.zeros_like(count).index_add(0, seq.flatten(), log_w.flatten())  # (S,)
        log_w = torch.where(keep, (total / count.clamp(min=1))[seq], 0.0)       # (B, T)
    out = keep & ((log_w < lo) | (log_w > hi))                                   # (B, T) masked tokens
    hit = torch.zeros_like(count).index_add(0, seq.flatten(), out.flatten().to(m.dtype))  # (S,)
    metrics.update(is_masked=out.sum().to(m.dtype), is_masked_responses=(hit > 0).sum().to(m.dtype),
                   responses=(count > 0).sum().to(m.dtype))
    return torch.where(out, 0.0, factor)


def mean_metrics(summed: dict) -> dict:
    """Sums (added over micro-batches and ranks) -> means: per token, and *_responses per response."""
    n, r = max(float(summed["tokens"]), 1.0), max(float(summed.get("responses", 0)), 1.0)
    return {k: float(v) if k in ("tokens", "responses") else float(v) / (r if k.endswith("_responses") else n)
            for k, v in summed.items()}


# ---- GRPO (DeepSeekMath) ---------------------------------------------------------------------------------------
def grpo_advantages(rewards, group_size: int):
    """rewards (B,) group-major (G consecutive samples per prompt) -> advantages (B,), stats."""
    r = rewards.float().view(-1, group_size)                                     # (B/G, G)
    # Bias 1 (question difficulty): scale by the group's std, unbiased (Bessel), + STD_EPS.
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + STD_EPS)     # (B/G, G)
    return by_response(r, adv)


def grpo_loss(logp, old_logp, adv, seq, mask, n_responses: int, eps_low=0.2, eps_high=0.2, beta=0.0,
              ref_logp=None, sampler_logp=None, tis_cap=None, ratio_level="token", is_mode="tis",
              is_band=(0.5, 2.0)):
    """logp, old_logp, seq, mask: (B, T) tokens of this micro-batch; adv (S,) per response, seq in [0, S).
    Returns (sum_i L_i / n_responses, metrics)."""
    m = mask.to(logp.dtype)                                                      # (B, T)
    per_tok, metrics = policy_term(logp, old_logp, adv, seq, m, eps_low, eps_high, beta, ref_logp, sampler_logp,
                                   tis_cap, ratio_level, is_mode, is_band)       # (B, T)
    # Bias 2 (length): token MEAN over the response's own length |o_i|.
    o_len = torch.zeros_like(adv, dtype=m.dtype).index_add_(0, seq.flatten(), m.flatten())  # (S,) |o_i|
    per_resp = (per_tok * m / o_len[seq].clamp(min=1)).sum()                     # sum_i L_i
    return per_resp / n_responses, metrics


# ---- Dr. GRPO (this paper) -------------------------------------------------------------------------------------
def drgrpo_advantages(rewards, group_size: int):
    """rewards (B,) group-major (G consecutive samples per prompt) -> advantages (B,), stats."""
    r = rewards.float().view(-1, group_size)                                     # (B/G, G)
    # No bias 1: the mean baseline only, never divided by the group's std.
    adv = r - r.mean(1, keepdim=True)                                            # (B/G, G)
    return by_response(r, adv)


def drgrpo_loss(logp, old_logp, adv, seq, mask, n_responses: int, max_new_tokens: int, eps_low=0.2, eps_high=0.2,
                beta=0.0, ref_logp=None, sampler_logp=None, tis_cap=None, ratio_level="token", is_mode="tis",
                is_band=(0.5, 2.0)):
    """logp, old_logp, seq, mask: (B, T) tokens of this micro-batch; adv (S,) per response, seq in [0, S).
    Returns (sum_i L_i / n_responses, metrics)."""
    m = mask.to(logp.dtype)                                                      # (B, T)
    per_tok, metrics = policy_term(logp, old_logp, adv, seq, m, eps_low, eps_high, beta, ref_logp, sampler_logp,
                                   tis_cap, ratio_level, is_mode, is_band)       # (B, T)
    # No bias 2: token SUM over a CONSTANT, the generation budget, the same for every response.
    per_resp = (per_tok * m / max_new_tokens).sum()                              # sum_i L_i
    return per_resp / n_responses, metrics


# ---- DAPO (Yu et al., 2025) ------------------------------------------------------------------------------------
def dapo_advantages(rewards, group_size: int):
    """rewards (B,) group-major (G consecutive samples per prompt) -> advantages (B,), stats."""
    r = rewards.float().view(-1, group_size)                                     # (B/G, G)
    # Bias 1 kept: DAPO scales by the group's std, as GRPO does.
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + STD_EPS)     # (B/G, G)
    return by_response(r, adv)


def dapo_loss(logp, old_logp, adv, seq, mask, n_tokens: int, eps_low=0.2, eps_high=0.2, beta=0.0,
              ref_logp=None, sampler_logp=None, tis_cap=None, ratio_level="token", is_mode="tis",
              is_band=(0.5, 2.0)):
    """logp, old_logp, seq, mask: (B, T) tokens of this micro-batch; adv (S,) per response, seq in [0, S).
    Returns (sum_t l_t / n_tokens, metrics)."""
    m = mask.to(logp.dtype)                                                      # (B, T)
    per_tok, metrics = policy_term(logp, old_logp, adv, seq, m, eps_low, eps_high, beta, ref_logp, sampler_logp,
                                   tis_cap, ratio_level, is_mode, is_band)       # (B, T)
    # Token level: a token SUM over the minibatch over its number of loss tokens (global, counted by the caller).
    per_resp = (per_tok * m).sum()                                               # sum_i sum_t l_t
    return per_resp / n_tokens, metrics
