"""Shared fixtures: the real data in ../shared/data and real tiny models, built once per test session."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# The real benchmark and training sets; override with R1_SHARED_DATA when the checkout lives elsewhere.
SHARED_DATA = os.environ.get("R1_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.fail(f"real data not found at {SHARED_DATA} (set R1_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised ~0.1M-parameter Qwen2 (2 layers, head_dim 32) + the demo BPE tokenizer."""
    from data.demo import random_model
    return random_model(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """The demo's shipped tiny Qwen2 base model (data/demo_model): it answers in \\boxed{} and is right some of the
    time, so RL sees non-zero advantages. Its directory also holds the demo's train.jsonl and heldout.jsonl."""
    from data.demo import shipped
    return shipped(str(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as an HF directory (data/smollm2.py: from the GGUF that make test installs; the
    conversion runs here if make's step did not), with the README experiment's task files beside it."""
    from data.smollm2 import ensure
    return ensure(os.path.join(REPO, "data", "smollm2"))
