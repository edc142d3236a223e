"""The process group, and the policy as the trainer holds it: a transformers causal LM, sharded with FSDP2,
reading packed rows.

    register_packed_attention()
    model = build_policy("Qwen/Qwen2.5-Math-7B", device, seed=42, grad_checkpointing=True)

Packed rows (train.py) put several sequences back to back with position_ids restarting at 0 at each; the
attention must stay inside each sequence without a dense (T, T) mask, whose cost grows with the square of the
whole row. On GPU with flash-attn installed that is its varlen kernel; everywhere else `packed_attention` below.
"""
import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from config import fail


def setup_distributed(threads: int, timeout_min: int):
    """One process group for every case: torchrun's ranks, or plain `python train.py` (a world of one). Returns
    (rank, world, device). The device decides NCCL vs gloo; a GPU that torch cannot use is an error."""
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one, same code path
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    gpus = 0 if cuda or os.environ.get("CUDA_VISIBLE_DEVICES") == "" else visible_gpus()
    if gpus:  # a CUDA machine whose torch cannot use it: an error, never a silent CPU run
        raise RuntimeError(f"nvidia-smi sees {gpus} GPU(s) but torch {torch.__version__} sees none: install the "
                           "CUDA build (./setup.sh), or set CUDA_VISIBLE_DEVICES= to run on the CPU on purpose")
    if cuda:
        torch.cuda.set_device(local_rank)
    set_matmul_precision(torch.device("cuda" if cuda else "cpu"))
    if not cuda:  # 2 ranks on 2 cores: one torch thread each, or they fight over the cores
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min))
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def exit_with_parent(parent: int):
    """torchrun starts its ranks in their own sessions: killing torchrun's process group (a scheduler, a
    closed terminal) does not reach them. A daemon thread watches the parent and, once it is gone, kills this
    rank's process group (itself and its grader workers). A checkpoint being written stays .tmp-step_N
    (removed later)."""
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
    """Sum named numbers (floats or 0-d tensors) over ranks: metrics go as sums and counts, then divided."""
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def gather_all(obj, world: int) -> list:
    """Every rank's obj, in rank order (any picklable value; a list of one on a single process)."""
    if world == 1:
        return [obj]
    parts = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def print0(*args, rank: int = 0):
    if rank == 0:
        print(*args, flush=True)


def local_path(name: str) -> bool:
    """A path, never a hub name: it starts with /, . or ~, ends with /, or its first component exists here."""
    return name.startswith(("/", ".", "~")) or name.endswith("/") or os.path.exists(name.split("/")[0])


def locate_model(name: str, download) -> str:
    """The model's local directory. A name whose first component exists here (or that starts with /, . or ~)
    is a local path, never a hub name; a hub name is fetched into the hub cache now, before the process
    group exists, so no collective waits on a download (every rank calls it: the cache's file locks make
    that safe, and quick once one rank has it)."""
    if os.path.isdir(name):
        return name
    if local_path(name) or name.count("/") != 1:
        fail(f"--model {name}: no such directory (and not a hub name like Qwen/Qwen2.5-Math-7B)")
    try:
        return download(name, allow_patterns=HUB_FILES)
    except Exception as e:  # offline, a typo, no access: the hub's own exception types vary by version
        fail(f"--model {name}: cannot download it ({str(e).strip().splitlines()[0][:200]})")


# What the trainer, vLLM and eval.py read of a hub model (not its .bin / .gguf / .pt duplicates).
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def hub_download(name: str, **kw) -> str:
    from huggingface_hub import snapshot_download
    return snapshot_download(name, **kw)


def zero_grads(model):
    """Zero gradients, each with its parameter's sharding (a DTensor like it): an optimizer step with nothing
    to compute on any rank still steps AdamW (momentum, step count), as the zero gradient of its responses
    would; a None gradient would make AdamW skip the parameter instead."""
    if hasattr(model, "reshard"):  # FSDP2 keeps the root gathered after a no-grad forward (old_logprobs'):
        model.reshard()            # its parameters would be full tensors, not the shards AdamW holds
    for p in model.parameters():
        p.grad = torch.zeros_like(p)


# The trainer's float32 matmul precision by device. The only fp32 matmul on GPU is the output head on bf16
# values (loss.py), which TF32 ("high") represents exactly.
MATMUL_PRECISION = {"cuda": "high", "cpu": "highest"}


def set_matmul_precision(device):
    """Set the trainer's fp32 matmul precision (process-wide). Call it again once an engine exists: vLLM's
    worker constructor (the CPU worker subclasses it) sets VLLM_FLOAT32_MATMUL_PRECISION, "highest" by
    default, which would run the head at plain FP32 on a GPU. (Not through that variable: it would change
    vLLM's own matmuls.)"""
    torch.set_float32_matmul_precision(MATMUL_PRECISION[device.type])


def visible_gpus() -> int:
    """GPUs that nvidia-smi lists (0 without nvidia-smi or a driver)."""
    import shutil
    import subprocess
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    return out.stdout.count("GPU ") if out.returncode == 0 else 0


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
    """The HF model, sharded with FSDP2: each decoder layer, then the root. bf16 compute on GPU, fp32 on CPU.

    Start-up host memory is about one model per node, not one per rank: every rank builds the model on the meta
    device (no memory), shards it and allocates only its own shard; then rank 0 reads the weights one tensor at a
    time and broadcasts each into the shards (load_from_rank0). Loading every rank's full fp32 copy first would
    cost ~30 GB per rank for a 7B model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

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
    with torch.device("meta"):  # shapes only: no rank holds a full copy
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32,
                                                 attn_implementation=attn)
    # Tied (Qwen2.5-1.5B, the demo model; not 7B): one Parameter before fully_shard sees two modules. from_config
    # ties it already (transformers 5.19), and to_empty and fully_shard keep it; this line keeps it so.
    if model.config.get_text_config().tie_word_embeddings:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if not hasattr(getattr(model, "model", None), "layers"):  # GPT-2's: transformer.h (README, Architectures)
        fail(f"--model {path}: {type(model).__name__} keeps no decoder layers at model.model.layers to shard")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else None
    kw = {"mp_policy": mp} if mp else {}
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    model.to_empty(device=device)  # this rank's shards, uninitialised
    init_rotary(model)
    load_from_rank0(model, path, device)
    # loss.py divides by the GLOBAL number of responses, so gradients are summed over ranks, not averaged.
    # The setting is per fully_shard module; a plain SUM also suits gloo, which has no PREMUL_SUM.
    for m in [*model.model.layers, model]:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    return model


@torch.no_grad()
def init_rotary(model):
    """Recompute the rotary inverse frequencies, as the module's constructor does. They are non-persistent buffers:
    not in the checkpoint, so to_empty leaves them as garbage. Any other non-persistent buffer is an error here
    rather than silently uninitialised."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    persistent = set(model.state_dict())
    done = set()
    for name, m in model.named_modules():
        if hasattr(m, "original_inv_freq"):  # Qwen2RotaryEmbedding and its kin (transformers' _init_weights test)
            fn = m.compute_default_rope_parameters if m.rope_type == "default" else ROPE_INIT_FUNCTIONS[m.rope_type]
            inv_freq, m.attention_scaling = fn(m.config)
            m.inv_freq.copy_(inv_freq)
            m.original_inv_freq.copy_(inv_freq)
            done |= {f"{name}.inv_freq".lstrip("."), f"{name}.original_inv_freq".lstrip(".")}
    unknown = [n for n, _ in model.named_buffers() if n not in persistent and n not in done]
    if unknown:
        raise NotImplementedError(f"build_policy: no initialiser for the non-persistent buffers {unknown}")


def weight_files(path: str) -> dict:
    """{tensor name: safetensors file} of an HF model directory (one file, or an index of shards) or hub name."""
    import json
    import os
    if not os.path.isdir(path):  # a hub name: the files in the local cache, fetched once (not run here: no hub)
        from huggingface_hub import snapshot_download
        path = snapshot_download(path, allow_patterns=["*.safetensors", "*.safetensors.index.json"])
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    from safetensors import safe_open
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {k: os.path.join(path, "model.safetensors") for k in f.keys()}


@torch.no_grad()
def load_from_rank0(model, path: str, device):
    """Fill the sharded model from the checkpoint: rank 0 reads one tensor, broadcasts it, every rank keeps its own
    shard of it. Host memory beyond the shards: one receive buffer the size of the largest tensor, allocated once
    (one buffer per tensor would leave tens of MB per rank in malloc's free lists). Each tensor is opened on its
    own: safetensors maps the whole file, and the mapping (counted in the process's memory once touched) lives as
    long as any tensor read from it. The names are the model's own (named_parameters skips the tied lm_head, which
    a tied checkpoint omits); a missing name or a shape mismatch stops rank 0, and torchrun then stops the others."""
    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, distribute_tensor
    rank = dist.get_rank()
    files = weight_files(path) if rank == 0 else {}
    persistent = set(model.state_dict())  # non-persistent buffers: init_rotary
    named = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if n in persistent]
    buf = torch.empty(max(t.numel() * t.element_size() for _, t in named), dtype=torch.uint8, device=device)
    for name, target in named:
        full = buf[:target.numel() * target.element_size()].view(target.dtype).view(target.shape)
        if rank == 0:
            if name not in files:
                raise KeyError(f"build_policy: {name} is not in the checkpoint {path}")
            with safe_open(files[name], "pt") as f:
                t = f.get_tensor(name)
            if t.shape != full.shape:
                raise ValueError(f"build_policy: {name} is {tuple(t.shape)} in {path}, model {tuple(full.shape)}")
            full.copy_(t)  # the file's dtype (bf16 for Qwen2.5) to the model's fp32
            del t
        dist.broadcast(full, src=0)
        if isinstance(target, DTensor):  # this rank's shard: local slicing, no communication
            target.to_local().copy_(distribute_tensor(full, target.device_mesh, target.placements,
                                                      src_data_rank=None).to_local())
        else:
            target.copy_(full)
