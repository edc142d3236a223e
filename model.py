"""The policy as the trainer holds it: a transformers causal LM, sharded with FSDP2, reading packed rows.

    register_packed_attention()
    model = build_policy("Qwen/Qwen2.5-Math-7B", device, seed=42, grad_checkpointing=True)

Packed rows (train.py) put several sequences back to back with position_ids restarting at 0 at each; the
attention must stay inside each sequence without a dense (T, T) mask, whose cost grows with the square of the
whole row. On GPU with flash-attn installed that is its varlen kernel; everywhere else `packed_attention` below.
"""
import torch
import torch.nn.functional as F


def packed_attention(module, query, key, value, attention_mask, scaling=None, position_ids=None, **kwargs):
    """Causal attention over a packed row (1, H, T, D), one sdpa call per sequence (position_ids restart at 0
    at each), so no (T, T) mask is built and no work crosses sequences: the counterpart of flash-attention's
    varlen kernel where flash-attention is missing (CPU, or a GPU without it). transformers' own sdpa path
    would apply a dense block mask, whose cost grows with the square of the whole row. Registered with
    transformers as "packed_sdpa" by register_packed_attention(); the trainer feeds it packed rows only."""
    if attention_mask is not None or position_ids is None or query.shape[0] != 1:
        raise ValueError("packed_sdpa takes one packed row: position_ids and no attention mask")
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [query.shape[2]]
    out = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                          scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
           for a, b in zip(starts, starts[1:])]                                   # (1, H, L_i, D) each
    return torch.cat(out, dim=2).transpose(1, 2), None                           # (1, T, H, D)


def register_packed_attention():
    from transformers import AttentionInterface
    AttentionInterface.register("packed_sdpa", packed_attention)


def build_policy(path: str, device, seed: int, grad_checkpointing: bool):
    """The HF model, sharded with FSDP2: each decoder layer, then the root. bf16 compute on GPU, fp32 on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    cuda = device.type == "cuda"
    # The update feeds packed rows: flash-attention's varlen kernel where installed (GPU), else one causal sdpa
    # call per sequence (packed_attention); never transformers' sdpa path, whose block mask is dense.
    attn = "packed_sdpa"
    if cuda:
        try:
            import flash_attn  # noqa: F401
            attn = "flash_attention_2"
        except ImportError:
            pass
    register_packed_attention()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).to(device)
    if grad_checkpointing:
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
