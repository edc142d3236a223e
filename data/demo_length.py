"""The length-bias demo: the CPU demo's task with a third, long way of being wrong (a sibling of data/demo.py).

    python data/demo_length.py --out data/demo_length     # ~10 min: pretrains its base model (1,200 steps)
    make length-bias                                      # builds it, runs GRPO and Dr. GRPO x 3 seeds, plots

The paper's length bias: GRPO divides each response's summed token loss by its own length |o_i|, so every token
of a long wrong response is pushed down less than a token of a short wrong one. This task gives the base model
two ways of being wrong whose lengths differ, and lets RL choose between them at every step:
  careful: "7 - 3 = 4. The answer is \\boxed{4}."                               (right)
  guess:   "The answer is \\boxed{5}."                                          (wrong, short)
  ramble:  "Hmm, let me think again. " x k (k = 1..12), then a guess            (wrong, 14-80 tokens)
in pretraining proportions 40 / 30 / 30 %. Both the style (the first token) and the ramble's length (one
"continue or answer" decision after every filler sentence) are choices RL can change, so the length of the
incorrect responses is free to move. The README states the prediction that was written before the runs.

Version 2 (2026-12-01) pretrains 1,200 steps instead of 400, nothing else changed: at 400 the careful style was
right only 75 % of the time (sampled at T = 1), so careful answers with a wrong result (19 tokens, as long as
right ones) were all the wrong responses left at the end of v1's runs, and hid the two wrong styles' lengths.
"""
import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.demo import REPO, build, careful_answer, guess_answer, question  # noqa: E402
from templates import render  # noqa: E402

FILLER = "Hmm, let me think again. "


def ramble_answer(p, rng: random.Random) -> str:
    return FILLER * rng.randint(1, 12) + guess_answer(p, rng)


def corpus(probs, seed: int):
    """Pretraining documents: prompt + one answer in a random style (40 % careful, 30 % guess, 30 % ramble)."""
    rng = random.Random(seed + 1)
    for p in probs:
        u = rng.random()
        ans = careful_answer(p) if u < 0.4 else guess_answer(p, rng) if u < 0.7 else ramble_answer(p, rng)
        yield render("qwen_math", question(p)) + ans + "<|im_end|>"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "data", "demo_length"), help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, the corpus and the model init")
    p.add_argument("--steps", type=int, default=1200, help="pretraining steps (v1 of the task: 400)")
    args = p.parse_args()
    torch.set_num_threads(1)  # deterministic, and fastest for a model this small
    t0 = time.time()
    model_dir = build(args.out, args.seed, args.steps, make_corpus=corpus)
    print(f"built {model_dir} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
