"""`bench.py gpu`: one GPU, Qwen2.5-1.5B's shape: update tok/s, MFU, peak memory, generation tok/s, save s."""
import math
import sys

# Qwen2.5(-Math)-1.5B's shape, randomly initialised: speed and memory do not depend on the weights' values.
GPU_SHAPE = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                 rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True)
# --dry-run: the same code on a tiny shape (CPU tests); head_dim 32, as vLLM-CPU rejects 16; GQA kept (2 : 1).
GPU_DRY_SHAPE = dict(GPU_SHAPE, vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1)
GPU_WORK = dict(responses=16, max_new=3000, max_tokens=16384, steps=3, gen_prompts=2, gen_n=8, gen_tokens=256)
GPU_DRY_WORK = dict(responses=16, max_new=96, max_tokens=1024, steps=1, gen_prompts=2, gen_n=4, gen_tokens=16)
# Dense bf16 tensor-core peaks in TFLOPS (datasheets, no sparsity); the first name contained in the device's
# wins.
GPU_PEAK_TFLOPS = (("H200", 989), ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H800", 989),
                   ("B200", 2250), ("A100", 312), ("A800", 312), ("L40S", 362))


def update_flops(cfg, n_body: int, seqs: list) -> float:
    """Model FLOPs of one optimizer step over `seqs` (MFU's numerator), recompute NOT counted:
        6 * N_body * tokens                           N_body: parameters outside the embedding and the head
      + 6 * V * H * response_tokens                   the head runs only where log-probs are needed
      + 6 * layers * heads * head_dim * sum_i L_i^2   causal attention: QK^T and AV over L_i^2 / 2 pairs each
    (2 FLOPs per multiply-add, backward twice forward); L_i = prompt + response tokens of sequence i (packed
    rows attend within each sequence only). MFU = this / step seconds / the device's dense bf16 peak."""
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tokens = sum(len(s["ids"]) for s in seqs)
    targets = sum(len(s["ids"]) - s["prompt"] for s in seqs)
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * hd * sum(len(s["ids"]) ** 2 for s in seqs)
    return 6 * n_body * tokens + 6 * cfg.vocab_size * cfg.hidden_size * targets + attn


def gpu_peak_tflops(name: str, flag: float) -> "float | None":
    if flag:
        return flag
    return next((tf for key, tf in GPU_PEAK_TFLOPS if key in name), None)


def gpu_model_dir(path: str, shape: dict, device, dtype, prompts: list) -> str:
    """A randomly initialised model of `shape` saved as an HF directory (what build_policy and the engines
    load). Tokenizer: the demo's byte-level BPE with Qwen's special tokens, trained here on the prompts (a few
    hundred ids, saved by this transformers); the 151,936-way head samples any id, and decode skips ids it
    lacks."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from data.demo import LATEX_SAMPLE, build_tokenizer, save_model
    tok = build_tokenizer(prompts + [LATEX_SAMPLE])
    end, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    cfg = Qwen2Config(**shape, bos_token_id=end, eos_token_id=[im_end, end])
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it will run: seconds on a GPU for 1.5B parameters
        model = Qwen2ForCausalLM(cfg)
    save_model(model.to(dtype).cpu(), tok, path)  # cast where it is, write from host memory
    return path


def bench_gpu(argv):
    """One GPU, the trainer's real code paths, a random model of Qwen2.5-1.5B's shape: FSDP2 (world of 1) bf16
    with gradient checkpointing, packed Dr. GRPO updates of 16 long-tailed responses up to 3,000 tokens
    (update tokens/s, MFU, peak GPU memory of the update), one checkpoint.save (seconds), then the rollout
    engine train.py would pick (vLLM if installed, else transformers) at a short budget (tokens/s). The
    warm-up update step and the warm-up generation are not timed. Ends with one summary line. --dry-run: a
    tiny shape and workload, the same code, on whatever device there is (the CPU tests). Sized to finish in
    under 4 minutes on one H200 (writing the ~22 GB checkpoint is likely the slowest part)."""
    import argparse
    import gc
    import importlib.util
    import os
    import shutil
    import socket
    import statistics
    import tempfile
    import time

    t_start = time.perf_counter()
    import torch
    import torch.distributed as dist

    import checkpoint
    from loss import drgrpo_loss, token_logprobs
    from model import build_policy, set_matmul_precision, setup_distributed
    from packing import at_responses, balance, packed_row, per_response
    from rollout import make_engine
    from templates import render
    p = argparse.ArgumentParser(prog="bench.py gpu", description=bench_gpu.__doc__)
    p.add_argument("--dry-run", action="store_true", help="tiny shape and workload (CPU tests)")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"])
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's dense bf16 peak; 0 = from the table")
    p.add_argument("--out-dir", default="",
                   help="keep the model and checkpoint here; default: a temp dir, removed")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.35,
                   help="vLLM's share (train.py's default)")
    for k in GPU_WORK:
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None,
                       help=f"default {GPU_WORK[k]} ({GPU_DRY_WORK[k]} with --dry-run)")
    args = p.parse_args(argv)
    for k, v in (GPU_DRY_WORK if args.dry_run else GPU_WORK).items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    shape = GPU_DRY_SHAPE if args.dry_run else GPU_SHAPE
    # A world of one, without torchrun: the trainer's code paths (FSDP2, DCP) want a process group, set up as
    # train.py sets it up (on a free port, so a training run on the same machine does not collide).
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        sys.exit("bench.py gpu: one process on one device; run it with python, not torchrun")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    _, _, device = setup_distributed(threads=0, timeout_min=60)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    peak_tf = gpu_peak_tflops(name, args.peak_tflops)
    out = args.out_dir or tempfile.mkdtemp(prefix="bench-gpu-")
    os.makedirs(out, exist_ok=True)

    def log(msg):
        print(f"  [{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    try:
        prompts = [render("qwen_math", f"What is {17 * i + 3} + {29 * i % 100}?")
                   for i in range(args.gen_prompts)]
        # bf16 on disk, as Qwen2.5's own checkpoints: the dry run also loads bf16 into the fp32 trainer
        model_dir = gpu_model_dir(os.path.join(out, "model"), shape, device, torch.bfloat16, prompts)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        log(f"random model ({'tiny dry-run shape' if args.dry_run else 'Qwen2.5-1.5B shape'}) written to "
            f"{model_dir}")
        model = build_policy(model_dir, device, seed=0, grad_checkpointing=True)
        cfg = model.config
        n_params = sum(p.numel() for p in model.parameters())  # full sizes (DTensor.numel is global)
        n_body = sum(p.numel() for n, p in model.named_parameters()
                     if "embed_tokens" not in n and "lm_head" not in n)
        log(f"policy built: {n_params / 1e6:,.2f}M parameters ({n_body / 1e6:,.2f}M outside embedding and "
            f"head), FSDP2, {'bf16 compute' if cuda else 'fp32 (CPU)'}, gradient checkpointing, "
            f"attention {cfg._attn_implementation}")

        # -- packed Dr. GRPO updates, as train.py's step 7 (one optimizer minibatch = all responses) ---------
        # Long-tailed lengths: responses lognormal (sigma 0.9) with median budget / 6 (500 of 3,000: mean
        # ~750), cut at the budget, the first one AT the budget (truncated); prompts 40..160 tokens as in
        # `bench.py pack`. At 3,000: ~13.8k tokens, one packed row of train.py's default 16,384.
        g = torch.Generator().manual_seed(0)
        resp = (torch.randn(args.responses, generator=g) * 0.9 + math.log(args.max_new / 6)).exp().round()
        resp = resp.clamp(1, args.max_new).long().tolist()                       # (n,)
        resp[0] = args.max_new
        prompt = torch.randint(40, 161, (args.responses,), generator=g).tolist()  # (n,)
        seqs = [{"ids": torch.randint(cfg.vocab_size, (pr + r,), generator=g), "prompt": pr,
                 "adv": float(torch.randint(0, 2, (1,), generator=g)) - 0.5, "keep": True}
                for pr, r in zip(prompt, resp)]
        plan = balance({i: len(s["ids"]) for i, s in enumerate(seqs)}, 1, args.max_tokens)
        N = len(seqs)  # the loss normaliser: responses in the (global) optimizer minibatch
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        old = {}  # sequence -> log-probs of the first (warm-up) step: the old policy of the later ones
        model.train()

        def update_step():
            for step in plan:
                row = packed_row(seqs, step[0], pad_id=0)
                ids, pos, seq, tm, lm = (row[k].to(device) for k in ("ids", "pos", "seq", "resp", "loss"))
                logp, _ = token_logprobs(model, ids, None, tm, 1.0, position_ids=pos)  # (1, T)
                if not all(i in old for i in row["idx"]):
                    old.update(per_response(row, logp))
                loss, _ = drgrpo_loss(logp, at_responses(row, [old[i] for i in row["idx"]]).to(device),
                                      row["adv"].to(device), seq, lm, N, args.max_new,
                                      eps_low=0.2, eps_high=0.2)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for k in range(1 + args.steps):  # step 0: warm-up (AdamW state, kernels), not timed
            sync()
            t0 = time.perf_counter()
            update_step()
            sync()
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times[1:])
        tokens = sum(len(s["ids"]) for s in seqs)
        upd_rate = tokens / step_s
        flops = update_flops(cfg, n_body, seqs)
        mfu = flops / step_s / (peak_tf * 1e12) if peak_tf else None
        peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
        log(f"update: {N} responses, {tokens} tokens (longest {max(len(s['ids']) for s in seqs)}) in "
            f"{len(plan)} packed rows of <= {args.max_tokens}; step s: warm-up {times[0]:.2f}, timed "
            + " ".join(f"{t:.2f}" for t in times[1:]) + f"; {flops / 1e12:.1f} model TFLOP per step"
            + (f", peak {peak_tf:g} TFLOPS ({name})" if peak_tf else ", no peak known: pass --peak-tflops")
            + f"; fp32 matmuls (the head) at precision {torch.get_float32_matmul_precision()!r}")

        # -- one checkpoint save (DCP shards + AdamW, then the HF export) ------------------------------------
        from transformers import AutoTokenizer, GenerationConfig
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        gen_cfg = GenerationConfig.from_pretrained(model_dir)
        sync()
        t0 = time.perf_counter()
        saved = checkpoint.save(os.path.join(out, "ckpt"), 1, model, opt, sched, tokenizer, gen_cfg,
                                {"bench": "gpu", **vars(args)}, {"iteration": 1}, keep=1, rank=0,
                                hf_dtype=torch.bfloat16 if cuda else torch.float32)
        save_s = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(saved) for f in fs)
        log(f"checkpoint.save: {size / 1e9:.2f} GB to {saved}")

        # -- generation, last: an engine started in this process (vLLM-CPU's threads) would slow a CPU update
        # The engine as train.py makes it: colocated vLLM when installed, else transformers generate.
        gen_len = max(len(tokenizer(q)["input_ids"]) for q in prompts) + args.gen_tokens
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()  # the trainer's state stays, as in train.py; its cached free blocks go
        # "auto" resolved here: vLLM when installed, else transformers (make_engine's own "auto" refuses a GPU
        # without vLLM, right for training; a benchmark measures what the machine has).
        kind = args.engine if args.engine != "auto" else "vllm" if importlib.util.find_spec("vllm") else "hf"
        engine = make_engine(kind, model_dir, seed=0, dtype="bfloat16" if cuda else "float32",
                             max_model_len=gen_len,
                             **({"gpu_memory_utilization": args.gpu_memory_utilization, "colocated": True}
                                if kind == "vllm" else {}))
        engine_name = type(engine).__name__
        set_matmul_precision(device)  # as train.py: vLLM's worker reset it; the update above ran at this one
        kw = dict(n=args.gen_n, temperature=1.0, top_p=1.0)
        engine.generate(prompts[:1], max_new_tokens=min(8, args.gen_tokens), seeds=[10 ** 6], **kw)  # warm-up
        sync()
        t0 = time.perf_counter()
        groups = engine.generate(prompts, max_new_tokens=args.gen_tokens, seeds=list(range(len(prompts))),
                                 **kw)
        sync()
        gen_s = time.perf_counter() - t0
        gen_tokens = sum(len(c.token_ids) for g in groups for c in g)
        gen_rate = gen_tokens / gen_s
        log(f"{engine_name}: {len(prompts)} prompts x {args.gen_n} samples x <= {args.gen_tokens} new "
            f"tokens: {gen_tokens} tokens in {gen_s:.2f} s (one warm-up call before, not timed)")
        total = time.perf_counter() - t_start
        print(f"bench.py gpu: {name} | update {upd_rate:,.0f} tok/s MFU "
              f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} peak "
              f"{'n/a' if peak_gb is None else f'{peak_gb:.1f}'} GB | generate {gen_rate:,.0f} tok/s "
              f"({engine_name}) | save {save_s:.1f} s | total {total:.1f} s", flush=True)

    finally:
        if not args.out_dir:
            shutil.rmtree(out, ignore_errors=True)
    if engine_name == "HFEngine":  # vLLM's own shutdown tears down the process groups it shares (train.py)
        dist.destroy_process_group()
