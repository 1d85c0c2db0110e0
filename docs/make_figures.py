"""Draws the README's explanatory figures (PNG) with matplotlib; no model or data needed.

    python docs/make_figures.py            # writes docs/dataflow.png, docs/layouts.png, docs/schedule.png
    python docs/make_figures.py --out DIR  # somewhere else

* ``dataflow.png``: one training / sampling pass of DIMBA: tokens -> normalised embeddings ->
  noise -> bidirectional Mamba-2 denoiser conditioned on the prompt and the timestep -> x0_hat ->
  weight-tied head -> tokens, with the losses and the sampling loop.
* ``layouts.png``: the single [prompt | generation] sequence and its mask channel for the three
  prompt layouts the model is trained on (none, prefix, infill = known prefix + known suffix;
  see ``dimba_jax.diffusion.layout``).
* ``schedule.png``: the cosine schedule alpha_bar(t) and the signal / noise scales, and which
  timesteps a respaced sampler visits for a few step counts.

The schedule formula is written out here (not imported) so the figure script runs even where the
package is not installed; it is the one in ``dimba_jax.diffusion.schedule``.
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

# Colours: data (blue), noise (grey), network (orange), conditioning (green), losses (red).
DATA, NOISE, NET, COND, LOSS = "#dbe9f6", "#e6e6e6", "#fde2c4", "#d9f0d3", "#f8d0d0"


def _box(ax, x, y, w, h, text, color, fontsize=9.5, weight="normal"):
    """Draws a rounded box centred at (x, y) with width w, height h (axes data units)."""
    patch = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                           linewidth=1.2, edgecolor="#333333", facecolor=color)
    ax.add_patch(patch)
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, weight=weight, wrap=True)
    return (x, y, w, h)


def _arrow(ax, start, end, text=None, color="#333333", style="-|>", rad=0.0, text_offset=(0, 0.12),
           fontsize=8.5, ls="-"):
    """Draws an arrow from point `start` to point `end` with an optional label at its middle."""
    arrow = FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=14, linewidth=1.4, color=color,
                            connectionstyle=f"arc3,rad={rad}", linestyle=ls)
    ax.add_patch(arrow)
    if text:
        mx, my = (start[0] + end[0]) / 2 + text_offset[0], (start[1] + end[1]) / 2 + text_offset[1]
        ax.text(mx, my, text, ha="center", va="center", fontsize=fontsize, color=color)


def _right(b):
    return (b[0] + b[2] / 2, b[1])


def _left(b):
    return (b[0] - b[2] / 2, b[1])


def _top(b):
    return (b[0], b[1] + b[3] / 2)


def _bottom(b):
    return (b[0], b[1] - b[3] / 2)


def draw_dataflow(path: str) -> None:
    """Writes the DIMBA data-flow diagram to `path` (PNG)."""
    fig, ax = plt.subplots(figsize=(15, 6.4))
    ax.set_xlim(0, 15)
    ax.set_ylim(0.2, 6.6)
    ax.axis("off")

    y = 3.7
    tokens = _box(ax, 0.95, y, 1.6, 1.1, "tokens $w$ (B, L)\n[prompt | gen]\n+ mask $m$ (B, L)", DATA, fontsize=9)
    embed = _box(ax, 3.0, y, 1.8, 1.1, "embedding $E$\nrows L2-normalised,\nfixed scale", DATA)
    noise = _box(ax, 5.5, y, 2.4, 1.1, "noise where $m=0$\n$X_t=\\sqrt{\\bar\\alpha_t}X_0+\\sqrt{1-\\bar\\alpha_t}\\,\\epsilon$\n(prompt stays clean)",
                 NOISE, fontsize=9)
    denoiser = _box(ax, 8.75, y, 3.0, 1.4,
                    "bidirectional Mamba-2\ndenoiser $\\times N$\n(forward scan + flipped scan)\nFiLM / additive conditioning",
                    NET, weight="bold", fontsize=9)
    x0hat = _box(ax, 11.2, y, 1.2, 1.1, "$\\hat X_0$\n(B, L, d)", DATA)
    head = _box(ax, 12.8, y, 1.45, 1.1, "tied head\nlogits $\\propto\\hat X_0 E^\\top$", NET)
    out = _box(ax, 14.35, y, 1.2, 1.1, "tokens\n(argmax,\ncut at EOS)", DATA)

    _arrow(ax, _right(tokens), _left(embed))
    _arrow(ax, _right(embed), _left(noise), "$X_0$", text_offset=(0, 0.15))
    _arrow(ax, _right(noise), _left(denoiser), "$X_t$", text_offset=(0, 0.15))
    _arrow(ax, _right(denoiser), _left(x0hat))
    _arrow(ax, _right(x0hat), _left(head))
    _arrow(ax, _right(head), _left(out))

    # Conditioning: prompt encoder and timestep embedding below the denoiser.
    prompt = _box(ax, 5.5, 1.45, 2.4, 0.95, "prompt encoder\n(MLP, or frozen Mamba-2)\n$\\to C$ at prompt positions", COND, fontsize=9)
    time = _box(ax, 10.2, 1.45, 2.3, 0.95, "timestep $t$\nsinusoidal + MLP $\\to\\tau(t)$", COND, fontsize=9)
    _arrow(ax, _bottom(tokens), _left(prompt), "prompt tokens", rad=0.3, text_offset=(-0.55, -0.35), color="#2c7a2c")
    _arrow(ax, _right(prompt), (_bottom(denoiser)[0] - 0.5, _bottom(denoiser)[1]),
           "$C$: added at prompt positions;\npooled $C$ joins FiLM", color="#2c7a2c", text_offset=(-0.95, 0.55), rad=0.25)
    _arrow(ax, _top(time), (_bottom(denoiser)[0] + 0.8, _bottom(denoiser)[1]), "FiLM($\\tau(t)$ + pooled $C$)",
           color="#2c7a2c", text_offset=(1.05, 0.05))

    # Losses (training) above the read-out.
    loss = _box(ax, 12.6, 5.75, 4.3, 0.8,
                "training loss on generated positions:\n$\\|\\hat X_0-X_0\\|^2$  +  ce_weight $\\cdot$ CE(head($\\hat X_0$), $w$)",
                LOSS, fontsize=9)
    _arrow(ax, (_top(x0hat)[0] + 0.3, _top(x0hat)[1]), (_bottom(loss)[0] - 1.1, _bottom(loss)[1]), color="#a33")
    _arrow(ax, _top(head), (_bottom(loss)[0] + 0.2, _bottom(loss)[1]), color="#a33")

    # Sampling loop: x0_hat feeds the next reverse step.
    _arrow(ax, (_top(x0hat)[0] - 0.3, _top(x0hat)[1]), _top(noise), rad=0.35, color="#1f4e99", ls="--")
    ax.text(5.2, 5.75, "sampling loop: $X_T\\sim\\mathcal{N}(0,I)$ on generated positions; for $t=T\\ldots1$:\n"
            "clamp $\\hat X_0$ toward $E$ (optional); DDIM/DDPM step $X_t\\to X_{t-1}$; re-impose the prompt;\n"
            "self-conditioning feeds $\\hat X_0$ back in; guidance mixes cond./uncond. $\\hat X_0$",
            ha="center", va="center", fontsize=8.5, color="#1f4e99",
            bbox=dict(facecolor="white", edgecolor="none", alpha=0.9))
    ax.text(7.5, 0.45, "All positions are produced in parallel; fewer steps T = faster, more steps = better. "
            "Shapes: B batch, L = prompt + generated length, d = d_model.",
            ha="center", fontsize=9, style="italic")
    ax.set_title("DIMBA: Gaussian diffusion over token embeddings with a bidirectional Mamba-2 denoiser",
                 fontsize=12.5, weight="bold")
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def draw_layouts(path: str) -> None:
    """Writes the prompt-layout figure (none / prefix / infill) to `path` (PNG)."""
    length = 24
    layouts = {
        "none (unconditional)": np.zeros(length, bool),
        "prefix (prompted)": np.arange(length) < 8,
        "infill (both sides kept)": (np.arange(length) < 6) | (np.arange(length) >= 19),
    }
    fig, ax = plt.subplots(figsize=(10, 2.8))
    for row, (name, known) in enumerate(layouts.items()):
        yy = len(layouts) - 1 - row
        for i, k in enumerate(known):
            ax.add_patch(plt.Rectangle((i, yy + 0.1), 0.92, 0.8, facecolor="#7fbf7f" if k else "#c7c7c7",
                                       edgecolor="white"))
            ax.text(i + 0.46, yy + 0.5, "1" if k else "0", ha="center", va="center", fontsize=7)
        ax.text(-0.4, yy + 0.5, name, ha="right", va="center", fontsize=9.5)
    ax.add_patch(plt.Rectangle((0, 0), 0, 0, facecolor="#7fbf7f", label="clean prompt / context token (mask 1; no loss)"))
    ax.add_patch(plt.Rectangle((0, 0), 0, 0, facecolor="#c7c7c7", label="noised, generated token (mask 0; loss here)"))
    ax.set_xlim(-7.5, length + 0.2)
    ax.set_ylim(-0.45, len(layouts) + 0.1)
    ax.axis("off")
    ax.legend(loc="lower center", ncol=2, fontsize=8.5, frameon=False, bbox_to_anchor=(0.58, -0.08))
    ax.set_title("One sequence, a mask channel: the three layouts DIMBA trains on (sampled per example;\n"
                 "at sampling time the mask is free, e.g. several infill gaps, beyond these layouts)", fontsize=10.5)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def cosine_alpha_bar(t: np.ndarray, timesteps: int, s: float = 0.008) -> np.ndarray:
    """alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2); t float array in [0, T] -> same shape."""
    return np.cos(((t / timesteps + s) / (1 + s)) * np.pi / 2) ** 2


def draw_schedule(path: str, timesteps: int = 1000) -> None:
    """Writes the cosine-schedule figure with respaced sampling steps to `path` (PNG)."""
    t = np.arange(timesteps + 1, dtype=np.float64)
    ab = cosine_alpha_bar(t, timesteps)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.4))
    a1.plot(t, ab, label=r"$\bar\alpha(t)$", color="k")
    a1.plot(t, np.sqrt(ab), label=r"signal scale $\sqrt{\bar\alpha}$", color="#1f77b4")
    a1.plot(t, np.sqrt(1 - ab), label=r"noise scale $\sqrt{1-\bar\alpha}$", color="#d62728")
    a1.set_xlabel("t")
    a1.set_title(f"cosine schedule (T = {timesteps}, s = 0.008)", fontsize=10)
    a1.legend(fontsize=8.5)
    a1.grid(alpha=0.3)
    for row, steps in enumerate((4, 8, 16, 32, 64)):
        visited = np.linspace(timesteps, 1, steps).round()
        a2.scatter(visited, np.full(steps, row), s=9)
    a2.set_yticks(range(5), [f"{s} steps" for s in (4, 8, 16, 32, 64)])
    a2.set_xlabel("t visited by a respaced sampler (evenly spaced, T ... 1)")
    a2.set_title("fewer steps = fewer denoiser calls = lower latency", fontsize=10)
    a2.invert_xaxis()
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, draw in (("dataflow.png", draw_dataflow), ("layouts.png", draw_layouts), ("schedule.png", draw_schedule)):
        path = os.path.join(args.out, name)
        draw(path)
        print("wrote", path)


if __name__ == "__main__":
    main()
