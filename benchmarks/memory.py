"""`bench.py memory`: host memory of the policy's set-up on 2 ranks, a full model per rank (before) vs meta
device + broadcast (after)."""
import sys

from benchmarks.common import BENCH, torchrun

MEMORY_VARIANTS = {"before": "from_pretrained on every rank, then fully_shard (the old build_policy)",
                   "after": "meta device, fully_shard, rank 0 reads + broadcasts (model.build_policy)"}


def build_policy_before(path: str, device):
    """The baseline: build_policy before issue 13, on CPU (fp32, no gradient checkpointing): every rank loads
    the full fp32 model into host memory, then shards it."""
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    import model as M
    M.register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="packed_sdpa").to(device)
    model.config.use_cache = False
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    for m in [*model.model.layers, model]:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    return model


def memory_model(out: str, dtype: str) -> tuple:
    """A random ~100M-parameter Qwen2 saved as HF safetensors under out: (parameters, largest tensor's share).
    Vocab 8192 keeps the tied embedding (the largest tensor, which every rank holds whole while it is
    broadcast) at ~6% of the model, near Qwen2.5-Math-7B's 7%."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=8192, hidden_size=768, intermediate_size=3072, num_hidden_layers=11,
                      num_attention_heads=12, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    return n, max(p.numel() for p in model.parameters()) / n


def memory_worker(args):
    """One rank of `bench.py memory` (under torchrun): imports and the process group first, then the model's
    set-up between barriers, bracketed by files the parent watches (start.<rank>, end.<rank>: its seconds)."""
    import os
    import time

    import torch
    import torch.distributed as dist
    # imported before the clock starts: not set-up's cost
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2ForCausalLM  # noqa: F401

    import model as M
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dist.barrier()
    open(os.path.join(args.marks, f"start.{rank}"), "w").close()
    t0 = time.perf_counter()
    if args.variant == "before":
        model = build_policy_before(args.model, torch.device("cpu"))
    else:
        model = M.build_policy(args.model, torch.device("cpu"), seed=0, grad_checkpointing=False)
    dist.barrier()
    with open(os.path.join(args.marks, f"end.{rank}"), "w") as f:
        f.write(str(time.perf_counter() - t0))
    time.sleep(0.5)  # the parent samples the built model's memory
    dist.barrier()
    del model
    dist.destroy_process_group()


def _pss(pid: int) -> int:
    """Proportional set size in bytes: a page shared by k processes (an mmapped file) counts 1/k in each, so
    the ranks' sum counts it once (summed RSS, or ru_maxrss, would count it k times)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):  # exited
        return 0


def _children(pid: int) -> list:
    """The processes whose parent is pid: torchrun's ranks."""
    import os
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the "(name)"
                    out.append(int(d))
        except OSError:
            pass
    return out


def memory_run(variant: str, model_dir: str, nproc: int, interval: float) -> dict:
    """One variant under torchrun while this process samples its ranks' summed PSS every `interval` s: the
    last value before set-up, the peak over time during it, the first after it (bytes); rank 0's set-up
    seconds; the median time between samples during set-up (reading smaps_rollup walks the page tables: ~10 ms
    per rank here, so the gap is ~25 ms, not 10). The ranks run at nice 10, so that on 2 busy cores the
    sampler gets a core when it wakes: the old set-up's peak lasts only ~100 ms here."""
    import os
    import statistics
    import subprocess
    import tempfile
    import time
    marks = tempfile.mkdtemp()
    cmd = torchrun(nproc, BENCH, "memory", "--worker", "--variant", variant, "--model", model_dir,
                   "--marks", marks)
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(10))
    ranks, s, times = [], {"base": 0, "peak": 0, "after": None}, []

    def all_marked(tag):
        return all(os.path.exists(os.path.join(marks, f"{tag}.{r}")) for r in range(nproc))

    while proc.poll() is None:
        t0 = time.perf_counter()
        ranks = ranks if len(ranks) == nproc else _children(proc.pid)
        started, ended = all_marked("start"), all_marked("end")  # read before the memory: never counted early
        total = sum(_pss(pid) for pid in ranks)
        if not started:
            s["base"] = total
        elif not ended:
            s["peak"] = max(s["peak"], total)
            times.append(t0)
        elif s["after"] is None:
            s["after"] = total
        time.sleep(max(0.0, interval - (time.perf_counter() - t0)))  # reading smaps_rollup takes ms
    if proc.returncode or s["after"] is None:
        log.seek(0)
        sys.exit(f"bench.py memory: the {variant} run failed:\n{log.read().decode()[-3000:]}")
    with open(os.path.join(marks, "end.0")) as f:
        s["seconds"] = float(f.read())
    s["gap"] = statistics.median(b - a for a, b in zip(times, times[1:]))
    return s


def bench_memory(argv):
    """Host memory of the policy's set-up (issue 13): the ranks' summed PSS, peak over time, before (every
    rank loads the full model) and after (model.build_policy: meta device, rank 0 reads and broadcasts), on 2
    CPU ranks under torchrun and a random ~100M-parameter Qwen2, in units of the fp32 model size."""
    import argparse
    import os
    import shutil
    import statistics
    import tempfile
    p = argparse.ArgumentParser(prog="bench.py memory", description=bench_memory.__doc__)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--runs", type=int, default=1,
                   help="runs per variant, interleaved; the table shows medians")
    p.add_argument("--interval", type=float, default=0.01, help="seconds between samples")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="the checkpoint's dtype: Qwen2.5's are bf16, so every rank upcasts its own fp32 copy "
                   "(an fp32 file is mapped instead, and its pages are shared by the ranks)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=list(MEMORY_VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--marks", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return memory_worker(args)
    tmp = tempfile.mkdtemp()
    try:
        n, largest = memory_model(os.path.join(tmp, "model"), args.dtype)
        runs = {v: [] for v in MEMORY_VARIANTS}
        for r in range(args.runs):
            for v in (list(MEMORY_VARIANTS) if r % 2 == 0 else list(MEMORY_VARIANTS)[::-1]):
                runs[v].append(memory_run(v, os.path.join(tmp, "model"), args.nproc, args.interval))
    finally:
        shutil.rmtree(tmp)
    unit = 4 * n  # the fp32 model, bytes
    med = {v: {k: statistics.median(s[k] for s in runs[v]) for k in runs[v][0]} for v in MEMORY_VARIANTS}
    print(f"memory: policy set-up on {args.nproc} ranks (torchrun, gloo, CPU), random Qwen2 {n / 1e6:.1f}M "
          f"parameters, checkpoint {args.dtype}; 1 model = the fp32 model = {unit / 2**20:.0f} MiB")
    gap = statistics.median(s["gap"] for v in MEMORY_VARIANTS for s in runs[v])
    print(f"  the ranks' summed PSS, sampled every {args.interval * 1000:.0f} ms (measured: "
          f"{gap * 1000:.0f} ms; ranks at nice 10), in models; median of {args.runs} run(s) per variant")
    print(f"  {'variant':7s} | {'before set-up':>13s} | {'peak':>6s} | {'peak - before':>13s} | "
          f"{'after set-up':>12s} | {'set-up s':>8s}")
    for v, how in MEMORY_VARIANTS.items():
        m = med[v]
        print(f"  {v:7s} | {m['base'] / unit:13.2f} | {m['peak'] / unit:6.2f} | "
              f"{(m['peak'] - m['base']) / unit:13.2f} | {m['after'] / unit:12.2f} | "
              f"{m['seconds']:8.2f}   {how}")
    gain = (med["before"]["peak"] - med["before"]["base"]
            - med["after"]["peak"] + med["after"]["base"]) / unit
    print(f"  set-up peak: {gain:.2f} model copies less with {args.nproc} ranks (target: >= 1)")
    before = (med["before"]["peak"] - med["before"]["base"]) / unit / args.nproc  # each rank's own full copy
    # each rank's memory beyond the shards (1 model)
    after = ((med["after"]["peak"] - med["after"]["base"]) / unit - 1) / args.nproc
    print(f"  8 ranks, set-up's peak - before: after ~ 1 (the shards, for any number of ranks) + 8 x "
          f"{after:.2f} (per rank here: a receive buffer the size of the largest tensor, {largest:.2f}, and "
          f"malloc's leftovers) = {1 + 8 * after:.2f} models; " + (
              f"before ~ 8 x {before:.2f} (per rank here: its own fp32 copy) = {8 * before:.1f} models"
              if args.dtype != "float32" else "before: not extrapolated (an fp32 file is mapped, not copied: "
              "the ranks share its pages, counted once, so it does not grow with the ranks; a bf16 file "
              "does)"))

