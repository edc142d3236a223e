"""metrics.jsonl -> PNG: reward and accuracy, and the lengths of correct vs incorrect responses, over iterations.

    python plot.py runs/cpu_demo/metrics.jsonl                          # -> runs/cpu_demo/metrics.png
    (train.py writes that one itself at the end of a run)
    python plot.py a/metrics.jsonl b/metrics.jsonl --labels grpo drgrpo --out compare.png   # runs side by side

The length panel is the paper's key plot: under GRPO the incorrect responses grow longer (its 1/|o| normaliser
penalises long wrong answers less); Dr. GRPO removes that bias.
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def read(path: str):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in rows if "reward" in r], [r for r in rows if "eval_accuracy" in r]


def plot(paths: list, labels: list, out: str) -> str:
    """One figure of the runs' curves, written to out (PNG); returns out."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for path, label, color in zip(paths, labels, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        train, evals = read(path)
        it = [r["iteration"] for r in train]
        axes[0].plot(it, [r["reward"] for r in train], color=color, label=f"{label} train reward")
        axes[0].plot([r["iteration"] for r in evals], [r["eval_accuracy"] for r in evals], "o--", color=color,
                     label=f"{label} held-out accuracy")
        axes[1].plot(it, [r["len_mean"] for r in train], color=color, label=label)
        axes[2].plot(it, [r["len_correct"] for r in train], color=color, label=f"{label} correct")
        axes[2].plot(it, [r["len_incorrect"] for r in train], "--", color=color, label=f"{label} incorrect")
    for ax, title in zip(axes, ["reward / accuracy", "mean response length (tokens)",
                                "response length: correct vs incorrect"]):
        ax.set_title(title)
        ax.set_xlabel("policy iteration")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics", nargs="+", help="metrics.jsonl of one or more runs")
    p.add_argument("--labels", nargs="*", help="one label per run (default: the file paths)")
    p.add_argument("--out", help="PNG path (default: beside the first metrics file)")
    args = p.parse_args(argv)
    labels = args.labels or args.metrics
    if len(labels) != len(args.metrics):
        raise SystemExit("plot.py: --labels needs one label per metrics file")
    out = plot(args.metrics, labels, args.out or args.metrics[0].rsplit(".", 1)[0] + ".png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
