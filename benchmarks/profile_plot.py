"""Where one step's time goes, as a picture: a profile summary (`benchmarks.profile_summary`'s
PREFIX_profile.json: train_throughput's {"profiles": [summary, ...]}, whose first is drawn, or
latency_levers' one summary) drawn as horizontal bars.

    python -m benchmarks.profile_plot \\
        --profile benchmarks/results/train_throughput_prof13_cb_off_h100_profile.json \\
        --title "configs/base.py train step, one H100" --plot docs/train_step_prof13_h100.png

One bar per kernel family of the summary's `top_families` (ms per step, coloured by its
category, largest first), then "other kernels" (the rest of the kernel time) and "idle between
kernels" (the summary's idle time: the step's wall time less the busy time); the title line
under the given title states the step's wall time, kernel time and kernel count.
"""

from __future__ import annotations

import argparse
import json

CATEGORY_COLORS = {"gemm": "tab:blue", "ssd": "tab:red", "elementwise/fusion": "tab:green",
                   "reduction": "tab:orange", "copy/transpose": "tab:purple"}
REST_COLORS = {"other kernels": "tab:gray", "idle between kernels": "lightgray"}


def _short(name: str, width: int = 44) -> str:
    """A kernel family's name cut to `width` characters (cuBLAS names run to 120)."""
    return name if len(name) <= width else name[:width - 3] + "..."


def bars(profile: dict) -> list[tuple[str, float, str]]:
    """(label, ms per step, colour) per bar of one profile summary: its top kernel families
    (with their launches per step), largest first, then the rest of its kernel time and its
    idle time."""
    fams = [(f"{_short(f['family'])} x{round(f['count_per_step'])}", float(f["ms_per_step"]),
             CATEGORY_COLORS.get(f["category"], "black")) for f in profile["top_families"]]
    rest = float(profile["kernel_ms_per_step"]) - sum(ms for _, ms, _ in fams)
    return sorted(fams, key=lambda b: -b[1]) + [
        ("other kernels", max(rest, 0.0), REST_COLORS["other kernels"]),
        ("idle between kernels", float(profile["idle_ms_per_step"]),
         REST_COLORS["idle between kernels"])]


def plot(profile: dict, title: str, path: str) -> str:
    """Draws `bars(profile)` to the PNG `path`; returns path."""
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top

    data = bars(profile)
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(data) + 1.6))
    ys = range(len(data))
    ax.barh(list(ys), [ms for _, ms, _ in data], color=[c for _, _, c in data])
    ax.set_yticks(list(ys), [label for label, _, _ in data], fontsize=8)
    ax.invert_yaxis()
    for y, (_, ms, _) in zip(ys, data):
        ax.text(ms, y, f" {ms:.2f}", va="center", fontsize=7)
    ax.set_xlabel("ms per step")
    ax.set_title(f"{title}\nstep {profile['step_wall_ms']:.1f} ms wall, "
                 f"{profile['kernel_ms_per_step']:.1f} ms of kernels "
                 f"({profile['kernels_per_step']:.0f} kernels per step)", fontsize=9)
    legend = [Patch(color=c, label=k) for k, c in {**CATEGORY_COLORS, **REST_COLORS}.items()]
    ax.legend(handles=legend, fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", required=True, help="a PREFIX_profile.json")
    p.add_argument("--title", default="", help="first title line (default: the file name)")
    p.add_argument("--plot", required=True, help="PNG to write")
    a = p.parse_args(argv)
    with open(a.profile) as f:
        doc = json.load(f)
    profiles = doc.get("profiles") or [doc]  # train_throughput's list, or one summary
    if "top_families" not in profiles[0]:
        raise ValueError(f"{a.profile}: no profile summary with top_families in it")
    return plot(profiles[0], a.title or a.profile, a.plot)


if __name__ == "__main__":
    print(main())
