"""Generation engines: a colocated vLLM engine per rank, and a plain-transformers fallback with the same interface.

    engine = make_engine("auto", "ckpt/", seed=0, max_model_len=4096, colocated=True)
    groups = engine.generate(prompts, n=8, temperature=1.0, top_p=1.0, max_new_tokens=3000, stop=("</answer>",),
                             seeds=[...])            # [prompt][sample] -> Completion
    engine.sleep()                                   # trainer update runs here, with the engine's memory freed
    engine.wake_up(fsdp_full_tensors(model))         # weights first, push EVERY weight, then the KV cache

Every torchrun rank owns one in-process vLLM engine ("external_launcher", tensor_parallel_size=1) and generates
for its own prompts. What silently wrecks RL training if it is wrong, and how this file prevents it:
  stale weights    new weights are pushed in memory with vLLM's in-place `reload_weights`, ALL of them (sleep level
                   2 discards the engine's copy); nothing reloads from disk after a sync (that restores the base);
  stale prefix     the prefix cache holds KV computed with the OLD weights; it is reset after every sync;
  OOM on wake      on GPU, waking weights + KV cache at once can run out of memory: wake weights, push, then KV;
  wrong log-probs  the engine returns log-probs AFTER temperature ("processed_logprobs"), which is what the
                   trainer computes (logits / T); raw ones differ by a lot at T != 1;
  NaN log-probs    vLLM can return NaN for near-deterministic tokens: counted, masked, never propagated.
`logprob_mismatch` measures sampler vs trainer log-probs each step, so every run shows the sync works.
"""
import logging
import math
import os
import random
import warnings
from dataclasses import dataclass

import torch

# Wrapper modules insert these into parameter names; HF checkpoints (what vLLM loads) have none of them.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


@dataclass
class Completion:
    token_ids: list[int]      # response tokens (no prompt), stop string's tokens and the EOS token included
    text: str                 # decoded response, special tokens skipped; ends with the stop string if one hit
    logprobs: list[float]     # sampler log-prob of each token AFTER temperature/top_p; 0.0 where not ok
    logprob_ok: list[bool]    # False where the sampler returned NaN/inf: excluded from every statistic
    truncated: bool           # hit max_new_tokens (vLLM finish_reason == "length")


def clean_logprobs(values) -> tuple[list[float], list[bool]]:
    """Replace non-finite sampler log-probs by 0.0 and mark them, so a NaN never reaches a sum or a loss."""
    ok = [math.isfinite(v) for v in values]
    return [v if good else 0.0 for v, good in zip(values, ok)], ok


def stop_token_ids(tokenizer, model_path: str) -> list[int]:
    """The model's EOS ids (generation_config, else the tokenizer's) plus <|im_end|> when the vocab has it."""
    from transformers import GenerationConfig
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    eos = tokenizer.eos_token_id if eos is None else eos
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    return list(dict.fromkeys(ids))


def _set_cpu_env_defaults() -> None:
    """vLLM on CPU: the engine core in this process (so `collective_rpc` reaches the model), a small KV cache; the
    user's environment wins. No thread binding needed: in-process vLLM keeps torch at one intra-op thread (or
    OMP_NUM_THREADS, 1 under torchrun); VLLM_CPU_OMP_THREADS_BIND acts only on worker processes not started here."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB


def _repack_tied_lm_head(worker) -> None:
    """CPU only, in vLLM's worker. vLLM-CPU packs the lm_head weight into a private GEMM copy at load. With tied
    embeddings (Qwen2.5-1.5B, the demo model) a reload updates the shared tensor but never re-packs the head (not
    in the checkpoint): the engine would sample from the OLD head (seen here). On GPU it reads the shared tensor."""
    head = getattr(worker.get_model(), "lm_head", None)
    if head is not None and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)


class VLLMEngine:
    def __init__(self, model_path: str, *, seed: int, max_model_len: int, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.35, tensor_parallel_size: int = 1, colocated: bool = False,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False, sleep_level: int = 2):
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        self.sleep_level = sleep_level
        cuda = torch.cuda.is_available()
        if not cuda:
            _set_cpu_env_defaults()
        # vLLM logs INFO/WARNING lines per call (cache resets, sleep, reloads) that bury the trainer's line per
        # iteration: errors only, unless VLLM_LOGGING_LEVEL says otherwise; setLevel: also while vLLM imports.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
        warnings.filterwarnings("ignore", message=".*torch.distributed.reduce_op.*is deprecated")  # vLLM's own
        from vllm import LLM
        kw = dict(distributed_executor_backend="external_launcher") if colocated else {}
        if dtype == "auto" and not cuda:  # vLLM-CPU would pick bf16; the CPU trainer is fp32, so sample in fp32
            dtype = "float32"
        self.llm = LLM(model=model_path, seed=seed, max_model_len=max_model_len, dtype=dtype,
                       gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                       enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
                       enable_sleep_mode=cuda,  # CPU rejects it; sleep/wake are no-ops there
                       # CPU: a prompt split over scheduler steps makes vLLM rewind a seeded request's
                       # generator, which CPU generators cannot do ("CPU Generator does not use offset").
                       enable_chunked_prefill=cuda,
                       logprobs_mode="processed_logprobs", use_tqdm_on_load=False, **kw)
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_ids = stop_token_ids(self.tokenizer, model_path)
        self.nan_logprobs = 0

    def sampling_params(self, *, n: int, temperature: float, top_p: float, max_new_tokens: int,
                        stop: tuple = (), seed: int | None = None):
        from vllm import SamplingParams
        return SamplingParams(
            n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
            max_tokens=max_new_tokens, stop=list(stop), stop_token_ids=self.stop_ids,
            include_stop_str_in_output=True, seed=seed,
            # vLLM detokenizes every step only to check stop strings, and also each log-prob's token (a quarter of
            # CPU generation time). Without stop strings the text is decoded once per response in _completion.
            detokenize=bool(stop),
            logprobs=0,           # 0 = only the sampled token's log-prob
            flat_logprobs=True)   # a few flat lists per response instead of a dict per token (GC cost)

    def generate(self, prompts: list[str], *, n: int, temperature: float, top_p: float, max_new_tokens: int,
                 stop: tuple = (), seeds: list[int] | None = None, progress: bool = False
                 ) -> list[list[Completion]]:
        """n samples per prompt; temperature 0 = greedy. seeds: one per prompt, so a prompt's samples do not
        depend on the rest of the batch or on the engine's history (a resumed run samples the same)."""
        # vLLM gives sample j of a request the seed `seed + j`; scale by n so neighbouring prompts never share one.
        req_seeds = [None] * len(prompts) if seeds is None else [(s * n) % 2**63 for s in seeds]
        k = n if temperature > 0 else 1  # vLLM refuses n > 1 for greedy: the samples would be identical anyway
        params = [self.sampling_params(n=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                       stop=stop, seed=s) for s in req_seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=progress)
        # the rule of sampling_params: vLLM detokenizes only when there are stop strings, else we decode here
        return [[self._completion(o, decode=not stop) for o in out.outputs] * (n // k) for out in outputs]

    def _completion(self, o, decode: bool) -> Completion:
        lp = o.logprobs.logprobs  # FlatLogprobs with logprobs=0: exactly one value per generated token
        assert len(lp) == len(o.token_ids), (len(lp), len(o.token_ids))
        values, ok = clean_logprobs(lp)
        self.nan_logprobs += ok.count(False)
        # (as vLLM's own detokenizer does, a multi-byte character cut off by the token limit is not text yet)
        text = self.tokenizer.decode(o.token_ids, skip_special_tokens=True).rstrip("\ufffd") if decode else o.text
        return Completion(list(o.token_ids), text, values, ok, o.finish_reason == "length")

    def sleep(self) -> None:
        """Frees the engine's GPU memory for the update (CPU: a no-op). Level 2 DISCARDS the weights (not
        buffers such as rotary tables): wake_up must push all; level 1 keeps them in pinned host RAM."""
        self.llm.sleep(level=self.sleep_level)

    def wake_up(self, named_tensors=None) -> None:
        """After the update, in the memory-safe order: weights back, new weights in, only then the KV cache."""
        if named_tensors is None and self.sleep_level == 2:
            raise ValueError("sleep level 2 discarded the weights: wake_up must be given the new ones")
        self.llm.wake_up(tags=["weights"])
        if named_tensors is not None:
            self._push(named_tensors)
        self.llm.wake_up(tags=["kv_cache"])
        self.reset_prefix_cache()

    def update_weights(self, named_tensors) -> None:
        """Push (HF name, full tensor) pairs into the running engine, in memory, then drop the prefix cache."""
        self._push(named_tensors)
        self.reset_prefix_cache()

    def _push(self, named_tensors) -> None:
        # ONE reload call fed by a stream: vLLM buffers a layer's pieces until it is complete (q/k/v -> qkv), so memory
        # stays bounded by one layer; a fused layer split across several calls would load half uninitialised.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        if not torch.cuda.is_available():
            self.llm.collective_rpc(_repack_tied_lm_head)

    def reset_prefix_cache(self) -> None:
        """After every sync: a stale prefix cache serves KV computed by the OLD weights (a mix of policies).
        train.py also calls it before each rollout, so what is sampled depends only on weights and seeds."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset the prefix cache (requests still running?)")


class HFEngine:
    """Fallback on plain transformers `generate` (no vLLM): same interface, much slower. The model lives in
    this object; weight sync copies tensors into it."""

    def __init__(self, model_path: str, *, seed: int, max_model_len: int, dtype: str = "auto", device=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")  # decoder-only
        if self.tokenizer.pad_token is None:  # Llama's have none; padded positions are masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stop_ids = stop_token_ids(self.tokenizer, model_path)
        self.max_model_len = max_model_len
        self.rng = random.Random(seed)  # per-prompt seeds when the caller gives none
        self.nan_logprobs = 0

    @torch.no_grad()
    def generate(self, prompts: list[str], *, n: int, temperature: float, top_p: float, max_new_tokens: int,
                 stop: tuple = (), seeds: list[int] | None = None, progress: bool = False
                 ) -> list[list[Completion]]:
        if temperature == 0:  # greedy needs no randomness: batch all prompts, one sample each is enough
            groups = self._generate_batch(prompts, 1, temperature, top_p, max_new_tokens, stop)
            return [[group[0]] * n for group in groups]
        seeds = seeds if seeds is not None else [self.rng.randrange(2**31) for _ in prompts]
        out = []
        for prompt, seed in zip(prompts, seeds):  # one prompt at a time: its samples depend on its seed only
            torch.manual_seed(seed)
            out += self._generate_batch([prompt], n, temperature, top_p, max_new_tokens, stop)
        return out

    def _generate_batch(self, prompts, n, temperature, top_p, max_new_tokens, stop) -> list[list[Completion]]:
        from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        class KeepSampledLogprob(LogitsProcessor):
            """Last in the chain: each sampled token's log-prob under the PROCESSED scores (as vLLM's), a column per
            step. Stacking generate's output_scores would hold (B*n, T, V): 16 x 3,000 x 151,936 fp32 is 29 GB."""
            def __init__(self):
                self.last, self.picked = None, []

            def __call__(self, input_ids, scores):  # input_ids ends with the token drawn from the previous scores
                if self.last is not None:
                    self.picked.append(self.last.gather(1, input_ids[:, -1:]))              # (B*n, 1)
                self.last = scores.float().log_softmax(-1)                                  # (B*n, V)
                return scores

        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        P = enc["input_ids"].shape[1]
        budget = min(max_new_tokens, self.max_model_len - P)
        # generate() runs custom processors BEFORE its own warpers (transformers 5.x), so the warpers go in our chain
        # ahead of the recorder, and generate gets neutral values, explicitly: a model's generation_config (e.g.
        # Qwen's top_k, repetition_penalty) must not leak in.
        keep = KeepSampledLogprob()
        chain = [TemperatureLogitsWarper(temperature)] if temperature > 0 and temperature != 1.0 else []
        chain += [TopPLogitsWarper(top_p)] if temperature > 0 and top_p < 1.0 else []
        sample = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if temperature > 0 else dict(do_sample=False)
        out = self.model.generate(**enc, **sample, logits_processor=LogitsProcessorList(chain + [keep]),
                                  repetition_penalty=1.0, max_new_tokens=budget, num_return_sequences=n,
                                  eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
                                  return_dict_in_generate=True,
                                  **(dict(stop_strings=list(stop), tokenizer=self.tokenizer) if stop else {}))
        new = out.sequences[:, P:]                                             # (B*n, T)
        # the last token's value is still in keep.last; steps generate undid at the end (a deferred stop) are cut
        logp = torch.cat(keep.picked + [keep.last.gather(1, new[:, -1:])], dim=1)[:, :new.shape[1]]  # (B*n, T)
        comps = [self._completion(new[i].tolist(), logp[i].tolist(), stop, budget) for i in range(new.shape[0])]
        return [comps[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _completion(self, ids: list[int], logps: list[float], stop: tuple, budget: int) -> Completion:
        # Cut after the first EOS (pad == EOS in Qwen, so finished rows are padded with it) ...
        end = next((i + 1 for i, t in enumerate(ids) if t in self.stop_ids), None)
        hit, end = end is not None, end or len(ids)
        # ... or after the first token that completes a stop string (binary search: containment is monotone).
        decode = lambda k: self.tokenizer.decode(ids[:k], skip_special_tokens=True)  # noqa: E731
        if stop and any(s in decode(end) for s in stop):
            lo, hi = 1, end
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if any(s in decode(mid) for s in stop) else (mid + 1, hi)
            end, hit = lo, True
        text = decode(end).rstrip("\ufffd")  # as vLLM: a cut-off multi-byte character is not text yet
        if stop and hit:  # vLLM keeps the text up to and including the stop string, not the rest of the token
            cut = min((text.find(s) + len(s) for s in stop if s in text), default=len(text))
            text = text[:cut]
        values, ok = clean_logprobs(logps[:end])
        self.nan_logprobs += ok.count(False)
        return Completion(ids[:end], text, values, ok, truncated=not hit and end >= budget)

    def sleep(self) -> None:
        pass  # the model stays where it is: the fallback is for small runs

    def wake_up(self, named_tensors=None) -> None:
        if named_tensors is not None:
            self.update_weights(named_tensors)

    def reset_prefix_cache(self) -> None:
        pass  # generate keeps no cache between calls

    @torch.no_grad()
    def update_weights(self, named_tensors) -> None:
        params = dict(self.model.named_parameters())  # tied lm_head shares the embedding: one copy updates both
        for name, tensor in named_tensors:
            params[name].copy_(tensor)


def engine_kind(kind: str, cuda: bool, vllm_installed: bool) -> str:
    """The engine ("vllm" or "hf") that make_engine builds for kind "vllm" | "hf" | "auto". "auto" falls back to
    transformers only without CUDA: on a GPU a missing vLLM is an error, never a silently slow run."""
    if kind not in ("auto", "vllm", "hf"):
        raise ValueError(f"unknown engine {kind!r}; choose vllm, hf or auto")
    if kind == "hf" or (kind == "auto" and not cuda and not vllm_installed):
        return "hf"
    if vllm_installed:
        return "vllm"
    raise RuntimeError("vLLM is not installed: run ./setup.sh, or pass --engine hf for the slow transformers engine")


def make_engine(kind: str, model_path: str, **kw):
    """kw go to the engine; HFEngine takes only seed, max_model_len, dtype and device (the rest is vLLM's)."""
    import importlib.util  # find_spec, not import: VLLMEngine sets vLLM's environment before its first import
    if engine_kind(kind, torch.cuda.is_available(), importlib.util.find_spec("vllm") is not None) == "vllm":
        return VLLMEngine(model_path, **kw)
    return HFEngine(model_path, **{k: v for k, v in kw.items() if k in ("seed", "max_model_len", "dtype", "device")})


def fsdp_full_tensors(model):
    """Yield (HF name, full tensor) for every parameter of a (possibly FSDP2-sharded) model, one FSDP module
    at a time, each gathered ONCE (unshard(): one all-gather, not ~12 full_tensor() calls): the root's (embed,
    norm, head) first, then each layer's; no rank holds a second full copy. Tied weights appear once, as in an
    HF checkpoint. Every rank iterates in the same order, to the end. Unsharded models pass through."""
    from torch.distributed.fsdp import FSDPModule
    owner = {}  # parameter name -> (the innermost FSDP module that shards it, the name inside that module)
    for prefix, m in model.named_modules():  # outer modules first; inner ones overwrite their parameters
        if isinstance(m, FSDPModule):
            owner.update({f"{prefix}.{n}" if prefix else n: (m, n) for n, _ in m.named_parameters()})
    current = None
    # names listed up front: unshard() swaps in new parameter objects, which would defeat the tied-weight dedup
    groups = {}  # owning module -> its parameters' names, modules in order of first appearance
    for n, _ in model.named_parameters():
        groups.setdefault(owner.get(n, (None,))[0], []).append(n)
    for name in [n for names in groups.values() for n in names]:
        m, local = owner.get(name, (None, None))
        if m is not current:
            if current is not None:
                current.reshard()
            if m is not None:
                m.unshard()  # the module's parameters are now plain full tensors until reshard()
            current = m
        p = m.get_parameter(local) if m is not None else model.get_parameter(name)
        for prefix in WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        # A copy: reshard() frees the gathered storage, and a consumer may hold a tensor past that (vLLM buffers
        # a layer's pieces). detach, not no_grad: a no_grad block would leak into the caller between yields.
        yield name, p.detach().clone()
    if current is not None:
        current.reshard()


def logprob_mismatch(sampler_logprobs, sampler_ok, trainer_logprobs) -> float:
    """Mean |sampler - trainer| log-prob over sampled tokens whose sampler value is ok (finite); nan when none is (a
    logged metric, never in a loss). Ragged lists, one per response (Completion.logprobs / .logprob_ok and the
    trainer's values for the same tokens), or tensors of one shape, e.g. (N, T) with sampler_ok False on padding."""
    def flat(x, dtype):
        if torch.is_tensor(x):
            return x.detach().reshape(-1).to("cpu", dtype)
        rows = [torch.as_tensor(r, dtype=dtype).reshape(-1) for r in x]
        return torch.cat(rows) if rows else torch.zeros(0, dtype=dtype)
    s, ok, t = flat(sampler_logprobs, torch.float64), flat(sampler_ok, torch.bool), flat(trainer_logprobs,
                                                                                          torch.float64)
    ok = ok & torch.isfinite(s)
    return (s[ok] - t[ok]).abs().mean().item() if ok.any() else float("nan")
