"""Loss curves of a training run from its metrics.jsonl (PNG).

    python docs/plot_training.py docs/small_run/metrics.jsonl --out docs/small_run/loss.png \
        --title "DIMBA small (32.9M) on one H200"

Plots the total loss and its parts (x0 MSE, rounding cross-entropy) of the train split against
the step, and the head's token accuracy on a second axis, plus eval points where present.
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics.jsonl file (one JSON object per line; blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def running_mean(values: list[float], window: int) -> list[float]:
    """Trailing running mean: out[i] = mean(values[max(0, i-window+1) : i+1])."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", help="metrics.jsonl of a run")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default="")
    p.add_argument("--smooth", type=int, default=1,
                   help="running mean over this many logged points (DIMBA's per-batch loss depends on the "
                        "random t of its examples, so single points are noisy; raw points stay faint)")
    args = p.parse_args(argv)
    rows = read_metrics(args.metrics)
    train = [r for r in rows if r.get("split", "train") == "train"]
    evals = [r for r in rows if r.get("split") == "eval"]
    if not train:
        raise SystemExit(f"{args.metrics}: no train rows")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = [r["step"] for r in train]
    for key, style, color in (("loss", "-", "C0"), ("mse", "--", "C1"), ("ce", ":", "C2")):
        if key in train[0]:
            values = [r[key] for r in train]
            if args.smooth > 1:
                ax.plot(steps, values, style, color=color, alpha=0.2, linewidth=0.8)
                values = running_mean(values, args.smooth)
                label = f"train {key} (mean of {args.smooth})"
            else:
                label = f"train {key}"
            ax.plot(steps, values, style, color=color, label=label)
    for key in ("loss",):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax.plot(*zip(*pts), "o", label=f"eval {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if "acc" in train[0]:
        ax2 = ax.twinx()
        acc = [r["acc"] for r in train]
        ax2.plot(steps, running_mean(acc, args.smooth) if args.smooth > 1 else acc, color="gray",
                 alpha=0.6, label="train token accuracy")
        ax2.set_ylabel("head token accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(args.title or args.metrics)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
