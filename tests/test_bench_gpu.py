"""`bench.py gpu --dry-run`: the one-GPU benchmark's code path on a tiny shape, on CPU, so that the single try on a
GPU machine does not die on a typo. Run as the user runs it: a subprocess, its summary line parsed."""
import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = r"([0-9][0-9,]*(?:\.[0-9]+)?|n/a)"
SUMMARY = re.compile(rf"^bench\.py gpu: (.+) \| update {NUM} tok/s MFU {NUM}%? peak {NUM} GB \| generate {NUM} tok/s "
                     rf"\((\w+)\) \| save {NUM} s \| total {NUM} s$", re.M)


def number(s: str) -> float:
    return float(s.replace(",", ""))


# "hf": the transformers engine, what a GPU machine without vLLM runs; "auto": what is installed (vLLM here).
@pytest.mark.parametrize("engine", ["hf", "auto"])
def test_bench_gpu_dry_run(engine, tmp_path):
    if engine == "auto" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed: auto is the transformers engine, tested above")
    cmd = [sys.executable, "bench.py", "gpu", "--dry-run", "--engine", engine, "--peak-tflops", "1",
           "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = SUMMARY.search(proc.stdout)
    assert m, proc.stdout[-3000:]
    device, upd, mfu, peak, gen, engine_name, save, total = m.groups()
    import torch
    cuda = torch.cuda.is_available()
    assert device == ("CPU" if not cuda else torch.cuda.get_device_name(0))
    for value in (upd, mfu, gen, save, total):  # MFU is a number: --peak-tflops gives the peak on CPU too
        assert math.isfinite(number(value)) and number(value) >= 0, m.group(0)
    assert number(upd) > 0 and number(gen) > 0
    assert (number(peak) > 0) if cuda else (peak == "n/a")  # torch has no CPU peak memory counter
    assert engine_name == ("HFEngine" if engine == "hf" else "VLLMEngine")
    # the save wrote a whole checkpoint: the HF directory and the trainer's sharded state
    step = tmp_path / "ckpt" / "step_000001"
    for name in ("config.json", "model.safetensors", "train_config.json", "trainer/rank0.pt", "trainer/.metadata"):
        assert (step / name).is_file(), sorted(p.name for p in step.rglob("*"))
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))  # committed (renamed), not left half-written
