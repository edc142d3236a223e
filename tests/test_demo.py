"""data/demo.py: the tokenizer, the tiny model's shape, and a deterministic build."""
import json
import os

import torch

from conftest import SHARED_DATA


def test_build_is_deterministic_for_a_seed(tmp_path):
    from data.demo import build
    torch.set_num_threads(1)
    a, b = (build(str(tmp_path / name), seed=5, steps=3, batch=8, log_every=1000) for name in ("a", "b"))
    c = build(str(tmp_path / "c"), seed=6, steps=3, batch=8, log_every=1000)
    read = lambda d, f: open(os.path.join(d, f), "rb").read()  # noqa: E731
    assert read(a, "model.safetensors") == read(b, "model.safetensors")
    assert read(a, "tokenizer.json") == read(b, "tokenizer.json")
    assert read(a, "model.safetensors") != read(c, "model.safetensors")
    assert read(os.path.dirname(a), "heldout.jsonl") == read(os.path.dirname(b), "heldout.jsonl")


def test_shipped_base_model(tmp_path):
    """make demo copies the committed seed-0 base model instead of pretraining it: the copy is the recorded one,
    and a changed file is refused with one line."""
    from data import demo
    model = demo.shipped(str(tmp_path / "demo"))
    assert demo.sha256(os.path.join(model, "model.safetensors")) == demo.SHIPPED_SHA256
    assert os.path.isfile(os.path.join(tmp_path, "demo", "heldout.jsonl"))


def test_tokenizer_and_model_shape(demo_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(special)) == special
        assert tok.tokenize(special) == [special]  # one token, never split into bytes
    # byte-level BPE: real MATH text (LaTeX, unicode) round-trips exactly
    rows = [json.loads(line) for line in open(os.path.join(SHARED_DATA, "train", "math12k.jsonl"))][:200]
    for r in rows:
        assert tok.decode(tok(r["solution"])["input_ids"]) == r["solution"]
    assert tok.tokenize("123") == ["1", "2", "3"]  # digits split one by one, as in Qwen's tokenizer
    cfg = AutoModelForCausalLM.from_pretrained(demo_model_dir).config
    assert cfg.head_dim >= 32 and cfg.max_position_embeddings >= 2048 and cfg.model_type == "qwen2"
    held = [json.loads(line) for line in open(os.path.join(os.path.dirname(demo_model_dir), "heldout.jsonl"))]
    train = [json.loads(line) for line in open(os.path.join(os.path.dirname(demo_model_dir), "train.jsonl"))]
    assert len(held) >= 512 and not {r["problem"] for r in held} & {r["problem"] for r in train}


def test_length_bias_task_end_to_end(tmp_path):
    """data/demo_length.py's task, briefly built, through the cpu_length recipe under real torchrun (2 ranks),
    then plot.py's per-seed table on it: the short version of `make length-bias`."""
    import subprocess
    import sys

    from conftest import REPO
    from data import demo_length
    from data.demo import build
    docs = list(demo_length.corpus([(n, "cups", 5, "-", 2) for n in ("Ann", "Ben", "Cara", "Dan")] * 10, seed=0))
    assert sum(demo_length.FILLER in d for d in docs) > 0 and any("= 3." in d for d in docs)
    model = build(str(tmp_path / "task"), seed=0, steps=3, batch=8, log_every=1000, make_corpus=demo_length.corpus)
    out = str(tmp_path / "run")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(REPO, "train.py"), "--recipe", "cpu_length", "--model", model,
                        "--questions", str(tmp_path / "task" / "train.jsonl"),
                        "--eval-file", str(tmp_path / "task" / "heldout.jsonl"), "--eval-limit", "8", "--eval-n", "2",
                        "--rollout-batch", "4", "--group-size", "4", "--train-batch", "16", "--iterations", "2",
                        "--out-dir", out], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["iteration"] for r in recs] == [0, 1, 2] and all("len_incorrect" in r for r in recs[1:])
    cfg = json.load(open(os.path.join(out, "step_000002", "train_config.json")))
    assert cfg["max_new_tokens"] == 96 and cfg["lr"] == 1e-4  # the recipe's own settings
    metrics = os.path.join(out, "metrics.jsonl")
    t = subprocess.run([sys.executable, os.path.join(REPO, "plot.py"), metrics, metrics, "--labels", "a", "a",
                        "--out", str(tmp_path / "x.png"), "--table"], capture_output=True, text=True, timeout=120)
    assert t.returncode == 0 and os.path.isfile(tmp_path / "x.png") and t.stdout.count(metrics) == 2, t.stderr
