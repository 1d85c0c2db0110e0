"""The speed targets of the comparison with mamba_ssm across its results files, over time.

    python -m benchmarks.vs_mamba_ssm_progress \\
        [--results 'benchmarks/results/vs_mamba_ssm_*.json'] \\
        [--table benchmarks/results/vs_mamba_ssm_progress.md] [--plot docs/vs_mamba_ssm_progress.png]

Every file is one call of `benchmarks/vs_mamba_ssm.py` (checked by `vs_mamba_ssm_report.validate`;
smoke runs are left out), and every value is `vs_mamba_ssm_report.targets` of one file: a ratio
divides two rows of the same call, never rows of two calls. A call that measured only some parts
(`--parts generate`) gives only those targets. The table has a row per call in time order (device,
start, each target's value, * where met); the plot a panel per target kind (train MFU, AR tokens/s
over the peer's, T = 64 latency, decode speed-up, SSD forward and forward+backward ratios per
shape) with each call as a point at its start time, the marker naming the device, and the goal as
a dashed line.
"""

from __future__ import annotations

import argparse
import glob
import os
from datetime import datetime

from benchmarks import vs_mamba_ssm_report as report

# Panels: (title, goal, the targets' names (`report.targets`) drawn in it, log y)
PANELS = (
    ("DIMBA base train MFU", report.MFU_TARGET, ["DIMBA base train step MFU"]),
    ("AR base tokens/s / mamba_ssm's", report.AR_TPS_TARGET,
     ["AR base train tokens/s / mamba_ssm 130M's"]),
    ("DIMBA base T=64 ms (1024 tokens, batch 1)", report.T64_MS_TARGET,
     ["DIMBA base T=64, 1024 tokens, batch 1 (ms)"]),
    ("mamba_ssm decode ms / DIMBA T=64 ms", report.DECODE_SPEEDUP_TARGET,
     ["mamba_ssm decode ms / DIMBA base T=64 ms"]),
    ("SSD fwd: ours / mamba_ssm", report.SSD_TARGETS["fwd_ms"],
     [f"SSD {s} fwd: ours / mamba_ssm" for s in report.SHAPE_NAMES]),
    ("SSD fwd+bwd: ours / mamba_ssm", report.SSD_TARGETS["fwdbwd_ms"],
     [f"SSD {s} fwd+bwd: ours / mamba_ssm" for s in report.SHAPE_NAMES]),
)


def calls(paths: list[str]) -> list[dict]:
    """One entry per valid, non-smoke results file, by start time: {"file", "device",
    "started", "targets": {name: value or None}}. ValueError (one line, naming the file) for a
    file that fails validation; no file at all is an error too."""
    if not paths:
        raise ValueError("no results files given")
    out = []
    for path in paths:
        doc = report.load(path)
        try:
            report.validate(doc)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if doc.get("smoke"):
            continue
        out.append({"file": os.path.basename(path), "device": doc["device"],
                    "started": doc.get("started_utc") or "",
                    "targets": {t["target"]: t["value"] for t in report.targets(doc)}})
    return sorted(out, key=lambda c: c["started"])


def _met(name: str, value: float) -> bool:
    goal = next(g for _, g, names in PANELS if name in names)
    return value <= goal if ("SSD" in name or "(ms)" in name) else value >= goal


def to_markdown(entries: list[dict], command: str) -> str:
    names = [n for _, _, ns in PANELS for n in ns]
    short = ["MFU", "AR x", "T64 ms", "decode x"] + [
        f"{s} {k}" for k in ("fwd", "f+b") for s in report.SHAPE_NAMES]
    lines = ["# The speed targets beside mamba_ssm, call by call", "",
             f"Command: `{command}`", "",
             "Each row is one call of `benchmarks/vs_mamba_ssm.py` (ratios within that call); "
             "* = target met; — = not measured in that call. Goals: MFU >= "
             f"{report.MFU_TARGET}, AR >= {report.AR_TPS_TARGET:.0f}x, T64 <= "
             f"{report.T64_MS_TARGET:.0f} ms, decode >= {report.DECODE_SPEEDUP_TARGET:.0f}x, SSD fwd "
             f"<= {report.SSD_TARGETS['fwd_ms']}, fwd+bwd <= {report.SSD_TARGETS['fwdbwd_ms']}.", "",
             "| file | device | started (UTC) | " + " | ".join(short) + " |",
             "|---|---|---|" + "---|" * len(short)]
    for e in entries:
        cells = []
        for n in names:
            v = e["targets"].get(n)
            cells.append("—" if v is None else f"{v:.3g}" + ("*" if _met(n, v) else ""))
        lines.append(f"| {e['file']} | {e['device']} | {e['started'][:16]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(entries: list[dict], path: str) -> str:
    """Writes the PNG (a panel per PANELS entry) to `path`; returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    markers = {}
    for ax, (title, goal, names) in zip(axes.flat, PANELS):
        for j, name in enumerate(names):
            pts = [(datetime.fromisoformat(e["started"]), e["targets"][name], e["device"])
                   for e in entries if e["started"] and e["targets"].get(name) is not None]
            if not pts:
                continue
            label = name.split(" ")[1] if name.startswith("SSD") else None
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=f"C{j}", lw=1, label=label)
            for t, v, dev in pts:
                m = markers.setdefault(dev, "os^D"[len(markers) % 4])
                ax.plot([t], [v], m, color=f"C{j}", ms=5)
        ax.axhline(goal, color="k", ls="--", lw=1)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
        if len(names) > 1:
            ax.legend(fontsize=7)
    key = ", ".join(f"{m} {d}" for d, m in markers.items())
    fig.suptitle(f"dimba_jax beside mamba_ssm, each point one call (dashed: the goal; markers: {key})",
                 fontsize=10)
    return report.save_figure(fig, path, dpi=100)


def main(argv=None) -> tuple[str, str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results/vs_mamba_ssm_*.json",
                   help="glob of results files")
    p.add_argument("--table", default="benchmarks/results/vs_mamba_ssm_progress.md")
    p.add_argument("--plot", default="docs/vs_mamba_ssm_progress.png")
    args = p.parse_args(argv)
    entries = calls(sorted(glob.glob(args.results)))
    command = ("python -m benchmarks.vs_mamba_ssm_progress " + " ".join(argv)).strip() if argv else (
        "python -m benchmarks.vs_mamba_ssm_progress")
    with open(args.table, "w") as f:
        f.write(to_markdown(entries, command))
    plot(entries, args.plot)
    print(args.table)
    print(args.plot)
    return args.table, args.plot


if __name__ == "__main__":
    main()
