"""Figures and a Markdown table from a results dict (``pareto_h200.json``).

* ``ppl_vs_latency.png``: judge perplexity against latency per sequence (batch 1, log x),
  DIMBA points labelled by their step count T, one line per sampler, the AR baseline as a star
  and real text's judge perplexity as a dashed line; one panel per (L_gen, prompted).
* ``quality_vs_steps.png``: judge perplexity and entropy against T (log2 x) for each sampler,
  with the AR baseline and the real-text reference as horizontal lines.
* ``step_time_vs_L.png``: denoiser step time against L on log-log axes with the fitted slope and
  a slope-1 guide through the first point.
`markdown_table` renders every row (and the long-context rows) as GitHub Markdown.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from dimba_jax.evaluate import long_context


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_ticks(ax, x: bool = True, y: bool = True) -> None:
    """Plain numbers (not 2.5x10^2) on log axes; minor ticks labelled when under one decade.

    Call after the data and the scales are set (it reads the axis limits).
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    for on, axis, lim in ((x, ax.xaxis, ax.get_xlim()), (y, ax.yaxis, ax.get_ylim())):
        if not on:
            continue
        axis.set_major_formatter(fmt)
        narrow = lim[0] > 0 and lim[1] / lim[0] < 10
        axis.set_minor_formatter(fmt if narrow else NullFormatter())


def _default_rows(rows: Sequence[dict], **match) -> list[dict]:
    """Rows of the default variant matching all `match` items."""
    return [r for r in rows if not r.get("variant") and all(r.get(k) == v for k, v in match.items())]


def _panels(rows: Sequence[dict]) -> list[tuple[int, bool]]:
    keys = sorted({(r["L_gen"], r["prompted"]) for r in rows}, key=lambda k: (-k[0], k[1]))
    return keys


_SAMPLER_MARKERS = (("ddim", "o"), ("ddpm", "s"))


def _reference(results: dict, L: int) -> dict:
    """Real text's judge ppl / entropy at generation length L (else the overall reference), or {}."""
    return results.get("reference_by_L", {}).get(str(L)) or results.get("reference") or {}


def _panel_title(L: int, prompted: bool) -> str:
    return f"L_gen={L}, {'prompted' if prompted else 'unconditional'}"


def _finish_axes(ax, title: str, legend_size: float = 7, **title_kw) -> None:
    """Title (matplotlib `set_title` keywords in title_kw), grid at both tick levels, legend."""
    ax.set_title(title, **title_kw)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)


def _save(fig, path: str) -> str:
    """Lays out `fig`, writes it to `path` (PNG, 120 dpi) and closes it; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def _fmt(v, spec=".3g") -> str:
    return "—" if v is None else format(v, spec)


def plot_ppl_vs_latency(results: dict, path: str, batch: int = 1) -> str:
    """Judge ppl vs latency at `batch` (see module docstring); returns the written path."""
    plt = _plt()
    rows = [r for r in results["rows"] if r["batch"] == batch and r.get("judge_ppl") is not None]
    panels = _panels(rows) or [(0, False)]
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.8 * ncols, 4.4 * nrows), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    for ax, (L, prompted) in zip(axes.ravel(), panels):
        for sampler, marker in _SAMPLER_MARKERS:
            pts = sorted(_default_rows(rows, model="dimba", sampler=sampler, L_gen=L,
                                       prompted=prompted), key=lambda r: r["steps"])
            if pts:
                ax.plot([r["latency_ms"] for r in pts], [r["judge_ppl"] for r in pts],
                        marker=marker, label=f"DIMBA {sampler.upper()}")
                for r in pts:
                    ax.annotate(f"T={r['steps']}", (r["latency_ms"], r["judge_ppl"]),
                                textcoords="offset points", xytext=(4, 4), fontsize=7)
        variants = [r for r in rows if r.get("variant") and r["L_gen"] == L
                    and r["prompted"] == prompted]
        for r in variants:
            ax.scatter([r["latency_ms"]], [r["judge_ppl"]], marker="x", color="gray")
            ax.annotate(f"{r['variant']} T={r['steps']}", (r["latency_ms"], r["judge_ppl"]),
                        textcoords="offset points", xytext=(4, -9), fontsize=6, color="gray")
        for r in _default_rows(rows, model="ar", L_gen=L, prompted=prompted):
            ax.scatter([r["latency_ms"]], [r["judge_ppl"]], marker="*", s=180, color="red",
                       label="AR baseline", zorder=5)
        ref = _reference(results, L)
        if ref.get("judge_ppl"):
            ax.axhline(ref["judge_ppl"], ls="--", color="green", label="real text")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_ticks(ax)
        ax.set_xlabel(f"latency per call at batch {batch} (ms)")
        ax.set_ylabel("judge perplexity")
        _finish_axes(ax, _panel_title(L, prompted))
    fig.suptitle(f"Speed vs quality — {results.get('device', '')}", fontsize=10)
    return _save(fig, path)


def plot_quality_vs_steps(results: dict, path: str) -> str:
    """Judge ppl and entropy vs T per sampler and panel; returns the written path."""
    plt = _plt()
    rows = [r for r in results["rows"] if r.get("judge_ppl") is not None]
    panels = _panels(rows) or [(0, False)]
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 7), squeeze=False)
    for col, (L, prompted) in enumerate(panels):
        ref = _reference(results, L)
        for row_i, metric in enumerate(("judge_ppl", "entropy")):
            ax = axes[row_i][col]
            for sampler, marker in _SAMPLER_MARKERS:
                pts = {r["steps"]: r for r in _default_rows(rows, model="dimba", sampler=sampler,
                                                           L_gen=L, prompted=prompted)}
                xs = sorted(pts)
                if xs:
                    ax.plot(xs, [pts[x][metric] for x in xs], marker=marker,
                            label=f"DIMBA {sampler.upper()}")
            for r in _default_rows(rows, model="ar", L_gen=L, prompted=prompted)[:1]:
                ax.axhline(r[metric], color="red", label="AR baseline")
            if ref.get(metric):
                ax.axhline(ref[metric], ls="--", color="green", label="real text")
            ax.set_xscale("log", base=2)
            if metric == "judge_ppl":
                ax.set_yscale("log")
            _plain_ticks(ax, y=metric == "judge_ppl")
            ax.set_xlabel("denoising steps T")
            ax.set_ylabel("judge perplexity" if metric == "judge_ppl" else "entropy (bits/token)")
            _finish_axes(ax, _panel_title(L, prompted), fontsize=9)
    return _save(fig, path)


def plot_step_time_vs_length(results: dict, path: str) -> str:
    """Log-log denoiser step time vs L with the fitted slope; returns the written path."""
    plt = _plt()
    lc = [r for r in results.get("long_context", []) if r.get("step_ms")]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    if lc:
        xs = [r["L"] for r in lc]
        ys = [r["step_ms"] for r in lc]
        slope = long_context.slope_of(lc)
        ax.plot(xs, ys, marker="o", label="denoiser forward, batch 1"
                + (f" (slope {slope:.2f})" if slope is not None else ""))
        ax.plot(xs, [ys[0] * x / xs[0] for x in xs], ls=":", color="gray", label="slope 1 (linear)")
        for r in lc:
            if r.get("peak_gib") is not None:
                ax.annotate(f"{r['peak_gib']:.2f} GiB", (r["L"], r["step_ms"]),
                            textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _plain_ticks(ax)
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("step time (ms)")
    _finish_axes(ax, f"Long context — {results.get('device', '')}", legend_size=8, fontsize=9)
    return _save(fig, path)


def markdown_table(results: dict) -> str:
    """All rows and long-context rows of `results` as GitHub Markdown (with the command)."""
    ref = results.get("reference") or {}
    lines = [f"# Speed / quality results — {results.get('device', '')}", "",
             "Made by `benchmarks/plot_pareto.py` from the results JSON of the same name.", "",
             "Command(s) that produced the numbers:", ""]
    for c in results.get("commands") or [results.get("command", "")]:
        lines.append(f"    {c}")
    lines += ["", f"Real held-out text (judge, L={ref.get('L', '?')}): judge ppl "
              f"{_fmt(ref.get('judge_ppl'))}, entropy {_fmt(ref.get('entropy'))} bits/token.", ""]
    for L, r in sorted((results.get("reference_by_L") or {}).items(), key=lambda kv: int(kv[0])):
        lines.append(f"- reference at L={L}: judge ppl {_fmt(r.get('judge_ppl'))}, "
                     f"entropy {_fmt(r.get('entropy'))}")
    models = results.get("models") or {}
    if models:
        lines += ["", "| role | workdir | step | parameters | tokens seen | d_model x layers |",
                  "|---|---|---|---|---|---|"]
        for name, m in models.items():
            lines.append(f"| {name} | {m.get('workdir') or '—'} | {m.get('step', '—')} | "
                         f"{_fmt(m.get('params'), ',')} | {_fmt(m.get('tokens_seen'), ',')} | "
                         f"{m.get('d_model', '—')} x {m.get('n_layers', '—')} |")
    lines += ["", "`bits/token`: the model's likelihood of held-out text (DIMBA: the variational bound; "
              "AR: the exact NLL), the same for all rows of one model.", "",
              "| model | sampler | variant | T | L_gen | batch | prompted | latency (ms) | "
              "tokens/s | judge ppl | entropy | bits/token |", "|" + "---|" * 12]
    order = sorted(results["rows"], key=lambda r: (r["L_gen"], r["prompted"], r["model"] != "ar",
                                                   r.get("variant", ""), r["sampler"], r["steps"],
                                                   r["batch"]))
    for r in order:
        lines.append(f"| {r['model']} | {r['sampler']} | {r.get('variant') or 'default'} | "
                     f"{r['steps']} | {r['L_gen']} | {r['batch']} | {'yes' if r['prompted'] else 'no'} | "
                     f"{_fmt(r['latency_ms'], '.1f')} | {_fmt(r['tokens_per_s'], '.0f')} | "
                     f"{_fmt(r['judge_ppl'], '.2f')} | {_fmt(r['entropy'], '.3f')} | "
                     f"{_fmt(r.get('nll_bits'), '.2f')} |")
    lc = results.get("long_context") or []
    if lc:
        slope = long_context.slope_of(lc)
        lines += ["", f"Long context (denoiser forward, batch 1; log-log slope "
                  f"{_fmt(slope, '.3f')}):", "", "| L | step (ms) | peak (GiB) |", "|---|---|---|"]
        for r in lc:
            lines.append(f"| {r['L']} | {_fmt(r['step_ms'], '.3f')} | {_fmt(r.get('peak_gib'), '.2f')} |")
    return "\n".join(lines) + "\n"


def make_all(results: dict, docs_dir: str, table_path: str | None = None) -> list[str]:
    """Writes the three PNGs into `docs_dir` and the Markdown table; returns the paths written."""
    os.makedirs(docs_dir, exist_ok=True)
    paths = [plot_ppl_vs_latency(results, os.path.join(docs_dir, "pareto_ppl_vs_latency.png")),
             plot_quality_vs_steps(results, os.path.join(docs_dir, "pareto_quality_vs_steps.png")),
             plot_step_time_vs_length(results, os.path.join(docs_dir, "long_context_step_time.png"))]
    if table_path:
        os.makedirs(os.path.dirname(os.path.abspath(table_path)), exist_ok=True)
        with open(table_path, "w") as f:
            f.write(markdown_table(results))
        paths.append(table_path)
    return paths
