"""`bench.py rollout`: tokens/s of our vLLM engine vs raw vLLM vs the transformers fallback, and one weight
sync."""


def bench_rollout(argv):
    """Tokens/s of VLLMEngine.generate vs raw vllm.LLM.generate (the same engine and SamplingParams, so the
    difference is our wrapper: building requests, converting outputs), interleaved, medians; then the
    transformers fallback; then the time of one weight sync. Model: demo-sized random Qwen2 (hidden 64,
    4 layers), fp32."""
    import argparse
    import os
    import statistics
    import tempfile
    import time

    # One OpenMP thread unless told otherwise, set before torch loads OpenMP: on a shared 2-core machine
    # vLLM-CPU's spinning OpenMP threads made runs swing 10x (500 to 6,000 tok/s); with one, they agree.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from data.demo import random_model
    from rollout import HFEngine, VLLMEngine
    from templates import render
    p = argparse.ArgumentParser(prog="bench.py rollout")
    p.add_argument("--prompts", type=int, default=32, help="prompts per generate call")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--tokens", type=int, default=64, help="max new tokens")
    p.add_argument("--runs", type=int, default=5, help="timed runs per variant (median)")
    p.add_argument("--hf-prompts", type=int, default=4, help="prompts for the (slow) transformers fallback")
    args = p.parse_args(argv)

    def timed(fn):
        t0 = time.perf_counter()
        tokens = fn()
        return tokens, time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_model(os.path.join(tmp, "model"), seed=0, hidden=64, layers=4)
        engine = VLLMEngine(model_dir, seed=0, max_model_len=512, dtype="float32")
        prompts = [render("qwen_math", f"What is {i} + {7 * i % 100}?") for i in range(args.prompts)]
        seeds = list(range(args.prompts))
        kw = dict(n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.tokens)
        raw_params = [engine.sampling_params(seed=s * args.n, **kw) for s in seeds]  # what ours sends

        def ours():
            return sum(len(c.token_ids) for g in engine.generate(prompts, seeds=seeds, **kw) for c in g)

        def raw():
            outs = engine.llm.generate(prompts, raw_params, use_tqdm=False)
            return sum(len(o.token_ids) for r in outs for o in r.outputs)

        ours(), raw()  # warm-up
        rates, ratios = {"ours": [], "raw": []}, []
        for r in range(args.runs):  # interleaved, alternating which goes first
            for name in (["ours", "raw"] if r % 2 == 0 else ["raw", "ours"]):
                tokens, dt = timed(ours if name == "ours" else raw)
                rates[name].append(tokens / dt)
            ratios.append(rates["ours"][-1] / rates["raw"][-1])  # a pair shares the machine's load
        med = {k: statistics.median(v) for k, v in rates.items()}
        # The wrapper's own work, timed alone (robust to the machine's load): requests + output conversion.
        outs = engine.llm.generate(prompts, raw_params, use_tqdm=False)
        t0 = time.perf_counter()
        [engine.sampling_params(seed=s * args.n, **kw) for s in seeds]
        # no stop strings: ours decodes
        [[engine._completion(o, decode=True) for o in r.outputs] for r in outs]
        wrapper_ms = 1e3 * (time.perf_counter() - t0)

        hf = HFEngine(model_dir, seed=0, max_model_len=512, dtype="float32")
        hf_rates = []
        for _ in range(5):
            tokens, dt = timed(lambda: sum(len(c.token_ids) for g in hf.generate(
                prompts[:args.hf_prompts], seeds=seeds[:args.hf_prompts], **kw) for c in g))
            hf_rates.append(tokens / dt)

        state = dict(hf.model.named_parameters())
        sync = [timed(lambda: engine.update_weights(iter(state.items())))[1] for _ in range(args.runs)]

        def sleep_wake():
            engine.sleep()
            engine.wake_up(iter(state.items()))
        cycle = [timed(sleep_wake)[1] for _ in range(args.runs)]

    n_params = sum(t.numel() for t in state.values())
    print(f"rollout: {args.prompts} prompts x {args.n} samples x <= {args.tokens} new tokens, T=1.0, "
          f"demo-sized Qwen2 ({n_params / 1e6:.2f}M params, fp32), median of {args.runs} interleaved runs")
    print(f"  ours  VLLMEngine.generate  {med['ours']:9,.0f} tok/s   runs: "
          + " ".join(f"{x:,.0f}" for x in rates["ours"]))
    print(f"  raw   vllm.LLM.generate    {med['raw']:9,.0f} tok/s   runs: "
          + " ".join(f"{x:,.0f}" for x in rates["raw"]))
    print(f"  ours / raw                 {statistics.median(ratios):9.3f}       (median of per-pair ratios; "
          f"target >= 0.90)")
    print(f"  wrapper work per call      {wrapper_ms:9.1f} ms     (requests + Completion objects, timed "
          f"alone)")
    print(f"  HFEngine (transformers)    {statistics.median(hf_rates):9,.0f} tok/s   ({args.hf_prompts} "
          f"prompts, one generate per prompt for per-prompt seeds)")

    print(f"  weight sync: update_weights {1e3 * statistics.median(sync):.1f} ms | sleep + wake_up(weights) "
          f"{1e3 * statistics.median(cycle):.1f} ms")
