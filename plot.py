"""metrics.jsonl -> PNG: reward, accuracy and pass@k, lengths of correct vs incorrect responses, self-reflection
keyword rates (and dynamic sampling's dropped groups), over iterations.

    python plot.py runs/cpu_demo/metrics.jsonl                          # -> runs/cpu_demo/metrics.png
    (train.py writes that one itself at the end of a run)
    python plot.py a/metrics.jsonl b/metrics.jsonl --labels grpo drgrpo --out compare.png   # runs side by side
    python plot.py g1/m.jsonl g2/m.jsonl d1/m.jsonl d2/m.jsonl --labels grpo grpo drgrpo drgrpo --out x.png --table
                                   # runs with the same label are seeds: mean line, min-max band; --table per run

The length panel is the paper's key plot: under GRPO the incorrect responses grow longer (its 1/|o| normaliser
penalises long wrong answers less); Dr. GRPO removes that bias.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read(path: str):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in rows if "reward" in r], [r for r in rows if "eval_accuracy" in r]


def band(ax, runs: list, key: str, color, label: str, style: str = "-"):
    """Mean over runs (seeds) at each iteration they share, with their min-max as a band."""
    its = sorted(set.intersection(*[{r["iteration"] for r in run if key in r} for run in runs]))
    if not its:  # a metric these runs did not log (e.g. pass@k with --eval-n 1)
        return
    vals = np.array([[next(r[key] for r in run if r["iteration"] == i) for i in its] for run in runs])  # (runs, its)
    ax.plot(its, vals.mean(0), style, color=color, label=label + (f" (mean of {len(runs)})" if len(runs) > 1 else ""))
    if len(runs) > 1:
        ax.fill_between(its, vals.min(0), vals.max(0), color=color, alpha=0.2)


def plot(paths: list, labels: list, out: str) -> str:
    """One figure of the runs' curves, written to out (PNG); runs with the same label are drawn as one band."""
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    groups = {label: [read(p) for p, lab in zip(paths, labels) if lab == label] for label in dict.fromkeys(labels)}
    for (label, runs), color in zip(groups.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        band(axes[0], [t for t, _ in runs], "reward", color, f"{label} train reward")
        band(axes[0], [e for _, e in runs], "eval_accuracy", color, f"{label} held-out accuracy", "o--")
        band(axes[0], [t for t, _ in runs], "format_rate", color, f"{label} train format rate", ":")
        band(axes[0], [e for _, e in runs], "eval_format_rate", color, f"{label} held-out format rate", "x-.")
        band(axes[1], [t for t, _ in runs], "len_mean", color, label)
        band(axes[2], [t for t, _ in runs], "len_correct", color, f"{label} correct")
        band(axes[2], [t for t, _ in runs], "len_incorrect", color, f"{label} incorrect", "--")
        k = max((int(key[10:]) for _, e in runs for r in e for key in r if key.startswith("eval_pass@")), default=0)
        if k > 1:
            band(axes[0], [e for _, e in runs], f"eval_pass@{k}", color, f"{label} held-out pass@{k}", "s:")
        band(axes[3], [t for t, _ in runs], "reflection_correct", color, f"{label} correct")
        band(axes[3], [t for t, _ in runs], "reflection_incorrect", color, f"{label} incorrect", "--")
        band(axes[3], [t for t, _ in runs], "dropped_group_frac", color, f"{label} groups dropped", ":")
    for ax, title in zip(axes, ["reward / accuracy", "mean response length (tokens)",
                                "response length: correct vs incorrect",
                                "self-reflection keyword rate; groups dropped"]):
        ax.set_title(title)
        ax.set_xlabel("policy iteration")
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run(metrics_path: str) -> str:
    """One run's curves as a PNG beside its metrics.jsonl (train.py calls this at the end of a run)."""
    name = os.path.basename(os.path.dirname(os.path.abspath(metrics_path)))
    return plot([metrics_path], [name], metrics_path.rsplit(".", 1)[0] + ".png")


def summary(path: str, last: int = 20) -> dict:
    """The length-bias figures of one run: the mean length of the responses graded wrong over the last `last`
    iterations, weighted by how many were wrong in each (1 - accuracy of a fixed-size batch), and the final
    held-out accuracy."""
    train, evals = read(path)
    tail = train[-last:]
    wrong = [1 - r["accuracy"] for r in tail]
    return {"len_incorrect": sum(w * r["len_incorrect"] for w, r in zip(wrong, tail)) / max(sum(wrong), 1e-9),
            "len_correct": sum((1 - w) * r["len_correct"] for w, r in zip(wrong, tail))
            / max(len(tail) - sum(wrong), 1e-9),
            "eval_accuracy": evals[-1]["eval_accuracy"] if evals else float("nan")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics", nargs="+", help="metrics.jsonl of one or more runs")
    p.add_argument("--labels", nargs="*", help="one label per run (default: the file paths)")
    p.add_argument("--out", help="PNG path (default: beside the first metrics file)")
    p.add_argument("--table", action="store_true", help="print each run's last-20-iteration lengths and accuracy")
    args = p.parse_args(argv)
    labels = args.labels or args.metrics
    if len(labels) != len(args.metrics):
        raise SystemExit("plot.py: --labels needs one label per metrics file")
    out = plot(args.metrics, labels, args.out or args.metrics[0].rsplit(".", 1)[0] + ".png")
    print(f"wrote {out}")
    if args.table:
        print(f"{'run':<40} {'label':<8} {'incorrect len':>13} {'correct len':>11} {'held-out acc':>12}")
        for path, label in zip(args.metrics, labels):
            s = summary(path)
            print(f"{path:<40} {label:<8} {s['len_incorrect']:13.1f} {s['len_correct']:11.1f} "
                  f"{100 * s['eval_accuracy']:11.1f}%")


if __name__ == "__main__":
    main()
