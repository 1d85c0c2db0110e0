"""The fused mixer kernels' effect on one GPU, as a figure (runs anywhere, CPU is enough).

    python -m benchmarks.plot_fused [--results-dir benchmarks/results] [--device h100] \\
        [--out docs/fused_kernels_h100.png]

Left: the `configs/base.py` train step (ms, 16 x 1024 tokens) per variant of each
`benchmarks.train_throughput` call in `--train` (files RESULTS_DIR/<name>_<device>.json), one
group of bars per call: bars of one group were timed in the same call, so only they compare
(each group has its all-XLA variant first). Right: batch-1 generation of 1024 tokens per
`benchmarks.latency_levers` variant of `--levers` (one call), DIMBA at each T and the AR
baseline. Each bar is labelled with its milliseconds (and MFU for the train step).
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TRAIN = ("train_throughput_fused", "train_throughput_fused2", "tt_twopass")
LEVERS = "latency_levers_mixer2"
# legend names of the latency_levers variants of LEVERS' call (others: the variant's own name)
LEVER_NAMES = {"base": "XLA conv + norm (\"auto\" before the grid target)",
               "mixer_pallas": "fused forwards, grid target (\"auto\" now)",
               "conv_pallas": "fused conv alone", "norm_pallas": "fused norm alone"}


def _load(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"results file {path!r} not found")
    with open(path) as f:
        return json.load(f)


def train_groups(results_dir: str, names, device: str) -> list[tuple[str, list[tuple]]]:
    """[(call name, [(variant, step ms, MFU), ...]), ...] from train_throughput JSON files."""
    groups = []
    for name in names:
        rows = _load(os.path.join(results_dir, f"{name}_{device}.json"))["rows"]
        groups.append((name, [(r["variant"], float(r["step_ms"]), float(r["mfu"])) for r in rows]))
    return groups


def lever_bars(results_dir: str, name: str, device: str) -> list[tuple[str, str, float]]:
    """[(variant, case, latency ms), ...] from one latency_levers JSON file, in its row order."""
    rows = _load(os.path.join(results_dir, f"{name}_{device}.json"))["rows"]
    return [(r["variant"], r["case"], float(r["latency_ms"])) for r in rows if "latency_ms" in r]


def draw(groups, levers, device: str, out: str) -> str:
    """Writes the two-panel PNG to `out`; returns its path."""
    fig, (ax_t, ax_g) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    x, ticks, labels = 0.0, [], []
    for g, (call, rows) in enumerate(groups):
        for variant, ms, mfu in rows:
            bar = ax_t.bar(x, ms, color=f"C{g}", width=0.8)
            ax_t.bar_label(bar, [f"{ms:.1f}\n{100 * mfu:.1f}%"], fontsize=8)
            ticks.append(x)
            labels.append(variant)
            x += 1
        ax_t.text(x - (len(rows) + 1) / 2, -0.1, call, transform=ax_t.get_xaxis_transform(),
                  ha="center", va="top", fontsize=8, color=f"C{g}")
        x += 0.8
    ax_t.set_xticks(ticks, labels, fontsize=8)
    ax_t.set_ylabel("train step, ms (MFU)")
    ax_t.set_title(f"configs/base.py train step, 16 x 1024 tokens, one {device.upper()}; "
                   "bars of one colour: one call", fontsize=9)
    ax_t.margins(y=0.15)
    cases = list(dict.fromkeys(c for _, c, _ in levers))
    variants = list(dict.fromkeys(v for v, _, _ in levers))
    width = 0.8 / max(1, len(variants))
    for i, variant in enumerate(variants):
        for j, case in enumerate(cases):
            ms = [m for v, c, m in levers if v == variant and c == case]
            if ms:
                bar = ax_g.bar(j + (i - (len(variants) - 1) / 2) * width, ms[0], width,
                               color=f"C{i + 5}",
                               label=LEVER_NAMES.get(variant, variant) if j == 0 else None)
                ax_g.bar_label(bar, [f"{ms[0]:.0f}"], fontsize=8)
    ax_g.set_xticks(range(len(cases)), cases, fontsize=8)
    ax_g.set_ylabel("batch-1 generation of 1024 tokens, ms")
    ax_g.set_title("batch-1 sampling, base configs, one call", fontsize=9)
    ax_g.legend(fontsize=8, loc="upper left")
    ax_g.set_ylim(0, 1.35 * max(m for _, _, m in levers))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default="benchmarks/results")
    p.add_argument("--device", default="h100", help="the files' device suffix")
    p.add_argument("--train", default=",".join(TRAIN), help="train_throughput result names")
    p.add_argument("--levers", default=LEVERS, help="latency_levers result name")
    p.add_argument("--out", default="", help="PNG path (default docs/fused_kernels_<device>.png)")
    a = p.parse_args(argv)
    groups = train_groups(a.results_dir, [n for n in a.train.split(",") if n], a.device)
    levers = lever_bars(a.results_dir, a.levers, a.device)
    path = draw(groups, levers, a.device, a.out or f"docs/fused_kernels_{a.device}.png")
    print(path)
    return path


if __name__ == "__main__":
    main()
