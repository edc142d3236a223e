"""Checkpoints: an HF model directory per save, plus the trainer state for exact resume.

    {out_dir}/step_000016/
        config.json model.safetensors generation_config.json tokenizer*   what transformers, vLLM and eval.py load
        train_config.json                                                   the run's Config
        trainer/                                                            torch.distributed.checkpoint (DCP):
                                                                            sharded parameters + AdamW state
        trainer/rank{r}.pt                                                  per-rank RNG states, scheduler, counters

Atomic: everything is written under .tmp-step_N, flushed to disk, and renamed to step_N by rank 0 only after
every rank has finished, so a crash mid-save never leaves a directory that looks complete (resume ignores and
removes .tmp-*). The last `keep` step directories are kept; older ones are deleted only once the new one is on
disk, so a power loss cannot leave a complete-looking step_N with empty files and no good checkpoint.
"""
import glob
import json
import os
import random
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)


def step_dirs(out_dir: str):
    """Complete checkpoints, oldest first."""
    return sorted(d for d in glob.glob(os.path.join(out_dir, "step_*")) if os.path.isdir(d))


def save_hf(full_state: dict, hf_config, tokenizer, path: str, dtype: torch.dtype):
    """The HF directory: one safetensors file (tied lm_head dropped, as transformers expects)."""
    tensors = {k: v.to(dtype).contiguous() for k, v in full_state.items()
               if not (hf_config.tie_word_embeddings and k == "lm_head.weight")}
    hf_config.dtype = dtype  # what the file holds (the trainer keeps fp32 master weights)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hf_config.save_pretrained(path)
    tokenizer.save_pretrained(path)


def save(out_dir: str, step: int, model, optimizer, scheduler, tokenizer, generation_config, config: dict,
         counters: dict, keep: int, rank: int, hf_dtype: torch.dtype, ref=None):
    """ref: a reference model that moves during the run (--ref-sync-every), saved sharded beside the policy."""
    tmp = os.path.join(out_dir, f".tmp-step_{step:06d}")
    final = os.path.join(out_dir, f"step_{step:06d}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "trainer"))
    dist.barrier()
    # 1. Sharded trainer state: each rank writes its own shards, no full copy anywhere.
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    if ref is not None:
        state["ref"] = get_model_state_dict(ref)
    dcp.save(state, checkpoint_id=os.path.join(tmp, "trainer"))
    torch.save({"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                "scheduler": scheduler.state_dict(), "world": dist.get_world_size(), **counters},
               os.path.join(tmp, "trainer", f"rank{rank}.pt"))
    # 2. The HF export, gathered to rank 0's CPU (the one full copy, only for the length of the save).
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_hf(full, model.config, tokenizer, tmp, hf_dtype)
        generation_config.save_pretrained(tmp)
        with open(os.path.join(tmp, "train_config.json"), "w") as f:
            json.dump(config, f, indent=1)
    del full
    dist.barrier()
    if rank == 0:
        for root, _, files in os.walk(tmp):  # DCP syncs its shards; the rest (rank*.pt, the HF files) is ours
            for name in [*files, "."]:
                fsync(os.path.join(root, name))
        shutil.rmtree(final, ignore_errors=True)   # a re-save of the same step after a resume
        os.rename(tmp, final)                        # the commit point
        fsync(out_dir)                               # the rename itself is on disk
        for old in step_dirs(out_dir)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def fsync(path: str):
    """Flush a file or a directory (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str, model, optimizer, scheduler, rank: int, ref=None) -> dict:
    """Restore parameters, AdamW state, scheduler and RNG states in place (and ref's, if it was saved with
    one); return the saved counters."""
    # get_optimizer_state_dict initialises AdamW's lazy state, so DCP has tensors to load into.
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    if ref is not None:
        state["ref"] = get_model_state_dict(ref)
    dcp.load(state, checkpoint_id=os.path.join(path, "trainer"))
    if ref is not None:
        set_model_state_dict(ref, state["ref"])
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    extra = torch.load(os.path.join(path, "trainer", f"rank{rank}.pt"), weights_only=False)
    scheduler.load_state_dict(extra.pop("scheduler"))
    torch.set_rng_state(extra.pop("torch_rng"))
    random.setstate(extra.pop("python_rng"))
    cuda_rng = extra.pop("cuda_rng")
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng)
    return extra


def saved_world(path: str) -> int:
    """How many ranks wrote this checkpoint (one rank{r}.pt each)."""
    return len(glob.glob(os.path.join(path, "trainer", "rank*.pt")))


def lock_run_dir(out_dir: str):
    """One run per out_dir: an OS lock (flock) on out_dir/.lock, held through the returned file descriptor for
    the life of the process; the OS drops it when the process dies, even by SIGKILL, so a crashed run never
    blocks its own restart. Returns the fd, or "host:pid" of the live run that holds it. Caveat: flock is not
    reliable on every network file system (NFS before v4, some FUSE mounts); there, two runs are not stopped."""
    import fcntl
    import socket
    os.makedirs(out_dir, exist_ok=True)
    fd = os.open(os.path.join(out_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "(unknown process)"
        os.close(fd)
        return holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()}:{os.getpid()}".encode(), 0)
    return fd


def clean_partial(out_dir: str, rank: int):
    """Remove what an interrupted save left behind."""
    if rank == 0:
        for d in glob.glob(os.path.join(out_dir, ".tmp-step_*")):
            shutil.rmtree(d, ignore_errors=True)
    dist.barrier()
