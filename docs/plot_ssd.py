"""Draws docs/ssd_h200.png: our SSD kernels' times on the H200, by kernel version.

    python docs/plot_ssd.py    # reads benchmarks/results/ssd_h200.json and history/ssd_h200_v*.json

Two panels (forward, forward + backward), one group of bars per benchmark shape: our `xla`
chunked SSD and the `pallas` kernels by version (v3: Triton; v5: Mosaic GPU forward + Triton
backward; v6: Mosaic GPU both ways, the current `ssd(impl="pallas")`). mamba_ssm is not drawn
here: its times beside ours, both timed in one call, are docs/vs_mamba_ssm_h200.png
(benchmarks/vs_mamba_ssm.py). Every number comes from the JSON files, which carry their
commands and device.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "results")
# (label, file, impl of the row, colour)
SERIES = [
    ("xla (ours)", "ssd_h200.json", "xla", "#9e9e9e"),
    ("pallas v3: Triton", "history/ssd_h200_v3_triton.json", "pallas", "#90caf9"),
    ("pallas v5: Mosaic fwd, Triton bwd", "history/ssd_h200_v5_triton_bwd.json", "pallas", "#42a5f5"),
    ("pallas v6: Mosaic fwd + bwd", "ssd_h200.json", "pallas", "#0d47a1"),
]
PEER_PLOT = "docs/vs_mamba_ssm_h200.png"  # mamba_ssm beside ours, timed in one call


def load_rows(results_dir: str) -> tuple[list[str], dict]:
    """(shape names in order, {(label, shape): row})."""
    rows, shapes = {}, []
    for label, fname, impl, _ in SERIES:
        path = os.path.join(results_dir, fname)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found (run python -m benchmarks.ssd_pallas_bench)")
        with open(path) as f:
            for r in json.load(f)["rows"]:
                if r["impl"] != impl or "fwd_ms" not in r:
                    continue
                rows[(label, r["shape"])] = r
                if r["shape"] not in shapes:
                    shapes.append(r["shape"])
    return shapes, rows


def draw(path: str, results_dir: str = RESULTS) -> None:
    """Writes the two-panel bar chart to `path` (PNG)."""
    shapes, rows = load_rows(results_dir)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.2
    x = np.arange(len(shapes))
    for ax, key, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwdbwd_ms", "forward + backward")):
        for i, (label, _, _, colour) in enumerate(SERIES):
            vals = [rows[(label, s)][key] if (label, s) in rows else np.nan for s in shapes]
            ax.bar(x + (i - (len(SERIES) - 1) / 2) * width, vals, width, color=colour, label=label)
        ax.set_xticks(x, shapes)
        ax.set_ylabel("ms (median of 50)")
        ax.set_title(f"SSD {title}, bf16, H200", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Our SSD kernels by version; mamba_ssm beside them, timed in the same call: "
                 f"{PEER_PLOT}", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(SERIES), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=RESULTS, help="folder with ssd_h200*.json")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "ssd_h200.png"))
    a = parser.parse_args()
    draw(a.out, a.results)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
