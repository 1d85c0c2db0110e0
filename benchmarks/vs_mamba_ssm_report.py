"""The Markdown table and the plot of a `benchmarks/vs_mamba_ssm.py` results file (runs anywhere).

    python -m benchmarks.vs_mamba_ssm_report \\
        [--results benchmarks/results/vs_mamba_ssm_h200.json] \\
        [--table benchmarks/results/vs_mamba_ssm_h200.md] [--plot docs/vs_mamba_ssm_h200.png]

The file is checked first (`validate`: the schema of every row, and every row stamped with the
file's own call_id, so rows of two calls never meet). Every ratio divides two rows of that one
file: ours beside the peer timed in the same call. The table lists the train step (ms, tokens/s,
MFU, tokens/s over mamba_ssm's), batch-1 generation of 1024 tokens (ms, ms per step, the peer's
decode time over ours), the SSD (ours and the peer's forward and forward+backward, and their
ratios) and the speed targets (MFU, tokens/s, batch-1 latency, SSD ratios) with whether each
is met; a part the file does not hold (a call of `--parts generate` alone) is left out. The plot
has a panel per part: train tokens/s, generation ms (log scale), SSD ours / peer with the 0.5 and
0.4 targets.
"""

from __future__ import annotations

import argparse
import json
import math
import os

SHAPE_NAMES = ("130m-L2k", "130m-L8k", "1.3b-L2k", "130m-L32k")  # the SSD shapes, in table order
SYSTEMS = ("dimba_jax", "mamba_ssm")
MODELS = ("dimba_base", "ar_base", "mamba2_130m")
# what -> {key: allowed types} of the results file's rows
SCHEMA = {
    "train_step": {"system": str, "model": str, "ms": float, "tokens_per_s": float,
                   "mfu": (float, type(None))},
    "generate_1024_b1": {"system": str, "model": str, "steps": int, "ms": float},
    "ssd": {"system": str, "shape": str, "fwd_ms": float, "fwdbwd_ms": float},
}
# the targets each row is held against
MFU_TARGET = 0.25  # DIMBA base train step
AR_TPS_TARGET = 3.0  # AR base tokens/s over the peer's
T64_MS_TARGET = 115.0  # DIMBA base, T = 64, 1024 tokens, batch 1
DECODE_SPEEDUP_TARGET = 10.0  # the peer's decode time over DIMBA base T = 64
SSD_TARGETS = {"fwd_ms": 0.5, "fwdbwd_ms": 0.4}  # ours / the peer's


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _is(value, types_) -> bool:
    types_ = types_ if isinstance(types_, tuple) else (types_,)
    if float in types_ and isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isfinite(value)
    return isinstance(value, types_) and not isinstance(value, bool)


def validate(doc: dict) -> None:
    """Raises ValueError unless `doc` is one call's results file in the schema of the module
    docstring of benchmarks/vs_mamba_ssm.py: top-level device, command and call_id strings;
    every row of a known `what` with its keys and types, a known system / model / shape,
    positive times, the file's call_id, and no two rows of the same case."""
    for key in ("device", "command", "call_id"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise ValueError(f"results file: {key!r} missing or empty")
    if not isinstance(doc.get("rows"), list):
        raise ValueError("results file: 'rows' is not a list")
    seen = set()
    for i, row in enumerate(doc["rows"]):
        what = row.get("what")
        if what not in SCHEMA:
            raise ValueError(f"row {i}: unknown what {what!r}")
        if row.get("call_id") != doc["call_id"]:
            raise ValueError(f"row {i}: call_id {row.get('call_id')!r} is not this file's "
                             f"{doc['call_id']!r}: rows of another call are never merged")
        for key, types_ in SCHEMA[what].items():
            if key not in row or not _is(row[key], types_):
                raise ValueError(f"row {i} ({what}): {key!r} missing or not {types_}: {row.get(key)!r}")
        if row["system"] not in SYSTEMS:
            raise ValueError(f"row {i}: unknown system {row['system']!r}")
        if "model" in SCHEMA[what] and row["model"] not in MODELS:
            raise ValueError(f"row {i}: unknown model {row['model']!r}")
        if what == "ssd" and row["shape"] not in SHAPE_NAMES:
            raise ValueError(f"row {i}: unknown shape {row['shape']!r}")
        for key in ("ms", "fwd_ms", "fwdbwd_ms", "tokens_per_s"):
            if key in SCHEMA[what] and not row[key] > 0:
                raise ValueError(f"row {i}: {key} = {row[key]!r} is not positive")
        case = (what, row["system"], row.get("model"), row.get("shape"), row.get("steps"))
        if case in seen:
            raise ValueError(f"row {i}: a second row of {case}")
        seen.add(case)


def _find(doc: dict, what: str, **match) -> dict | None:
    for row in doc["rows"]:
        if row["what"] == what and all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(doc: dict) -> list[dict]:
    """The speed targets, each {"target", "value", "goal", "met"} from this file's rows (value
    None and met None where a row is missing)."""
    peer_train = _find(doc, "train_step", system="mamba_ssm", model="mamba2_130m")
    dimba_train = _find(doc, "train_step", system="dimba_jax", model="dimba_base")
    ar_train = _find(doc, "train_step", system="dimba_jax", model="ar_base")
    t64 = _find(doc, "generate_1024_b1", system="dimba_jax", model="dimba_base", steps=64)
    decode = _find(doc, "generate_1024_b1", system="mamba_ssm", model="mamba2_130m")
    out = [
        ("DIMBA base train step MFU", dimba_train and dimba_train["mfu"], f">= {MFU_TARGET:.2f}",
         lambda v: v >= MFU_TARGET),
        ("AR base train tokens/s / mamba_ssm 130M's",
         _ratio(ar_train and ar_train["tokens_per_s"], peer_train and peer_train["tokens_per_s"]),
         f">= {AR_TPS_TARGET:.0f}", lambda v: v >= AR_TPS_TARGET),
        ("DIMBA base T=64, 1024 tokens, batch 1 (ms)", t64 and t64["ms"], f"<= {T64_MS_TARGET:.0f}",
         lambda v: v <= T64_MS_TARGET),
        ("mamba_ssm decode ms / DIMBA base T=64 ms", _ratio(decode and decode["ms"], t64 and t64["ms"]),
         f">= {DECODE_SPEEDUP_TARGET:.0f}", lambda v: v >= DECODE_SPEEDUP_TARGET),
    ]
    for shape in SHAPE_NAMES:
        ours = _find(doc, "ssd", system="dimba_jax", shape=shape)
        peer = _find(doc, "ssd", system="mamba_ssm", shape=shape)
        for col, goal in SSD_TARGETS.items():
            label = "fwd" if col == "fwd_ms" else "fwd+bwd"
            out.append((f"SSD {shape} {label}: ours / mamba_ssm",
                        _ratio(ours and ours[col], peer and peer[col]), f"<= {goal}",
                        lambda v, goal=goal: v <= goal))
    return [{"target": name, "value": value, "goal": goal,
             "met": None if value is None else bool(check(value))}
            for name, value, goal, check in out]


def ordered(doc: dict, what: str) -> list[dict]:
    """The rows of `what`, by model (MODELS order), system, shape and most steps first."""
    rows = [r for r in doc["rows"] if r["what"] == what]
    return sorted(rows, key=lambda r: (MODELS.index(r["model"]) if "model" in r else 0,
                                       SYSTEMS.index(r["system"]),
                                       SHAPE_NAMES.index(r["shape"]) if "shape" in r else 0,
                                       -r.get("steps", 0)))


def _fmt(v, spec=".2f", none="—") -> str:
    return none if v is None else format(v, spec)


def to_markdown(doc: dict) -> str:
    """The report of one results file (see the module docstring)."""
    lines = [f"# dimba_jax beside mamba_ssm on {doc['device']}, timed in one call", ""]
    if doc.get("smoke"):
        lines += ["**SMOKE RUN: CPU, tiny shapes and models, a stand-in peer. Not a measurement.**", ""]
    pv = doc.get("peer_versions") or {}
    peer = (f"; mamba_ssm with torch {pv['torch']}, triton {pv['triton']}" if "torch" in pv else "")
    lines += [f"Call `{doc['call_id']}`, started {doc.get('started_utc')}, {doc.get('elapsed_s')} s, "
              f"jax {doc.get('jax')}{peer}.  ", f"Command: `{doc['command']}`", "",
              "Every ratio below divides two rows of this file (both systems timed in the same "
              "call). mamba_ssm runs from source (Triton kernels, no causal_conv1d build; its "
              "train step is eager PyTorch: a lower bound for the peer).", ""]

    lines += train_section(doc) + generate_section(doc) + ssd_section(doc)
    rows, absent = [], []
    for t in targets(doc):
        if t["met"] is None:
            absent.append(t["target"])
            continue
        rows.append(f"| {t['target']} | {_fmt(t['value'], '.3f')} | {t['goal']} | {'yes' if t['met'] else 'no'} |")
    lines += ["## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"] + rows
    if absent:
        lines += ["", "Not measured in this call (no rows): " + "; ".join(absent) + "."]
    for key, title in (("skipped", "Skipped (budget)"), ("failed", "Failed")):
        if doc.get(key):
            lines += ["", f"{title}:", ""] + [f"- {e['item']}: {e.get('why') or e.get('error')}"
                                              for e in doc[key]]
    if doc.get("peer_runs"):
        lines += ["", "Peer scripts:", ""] + [
            f"- {p['script']}: {p['stopped']} after {p['wall_s']} s ({p['records']} records)"
            for p in doc["peer_runs"]]
    return "\n".join(lines) + "\n"


def train_section(doc: dict) -> list[str]:
    """The train-step table's lines ([] without train-step rows)."""
    if not ordered(doc, "train_step"):
        return []
    peer_train = _find(doc, "train_step", system="mamba_ssm", model="mamba2_130m")
    lines = ["## Train step", "",
              "| model | system | sequences x tokens | params | ms | tokens/s | MFU | tokens/s / mamba_ssm's |",
              "|---|---|---|---|---|---|---|---|"]
    for r in ordered(doc, "train_step"):
        d = r.get("detail", {})
        shape = (f"{d['global_batch']} x {d['seq_len']}" if "global_batch" in d
                 else f"{d.get('batch', '?')} x {d.get('L', '?')}")
        params = d.get("params") or (d.get("params_m", 0) * 1e6) or None
        lines.append(f"| {r['model']} | {r['system']} | {shape} | {_fmt(params and params / 1e6, '.1f')}M "
                     f"| {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {_fmt(r['mfu'], '.1%')} "
                     f"| {_fmt(_ratio(r['tokens_per_s'], peer_train and peer_train['tokens_per_s']))} |")
    lines += ["", "MFU: tokens/s x training FLOPs per token (dimba_jax.models.flops; for mamba_ssm "
              "its 130M architecture with its 50,280-row vocabulary) / the device's bf16 peak.", ""]
    return lines


def generate_section(doc: dict) -> list[str]:
    """The batch-1 generation table's lines ([] without generation rows)."""
    if not ordered(doc, "generate_1024_b1"):
        return []
    decode = _find(doc, "generate_1024_b1", system="mamba_ssm", model="mamba2_130m")
    lines = ["## Batch-1 generation of 1024 tokens", "",
              "| model | system | steps | ms | ms per step | mamba_ssm decode ms / this |",
              "|---|---|---|---|---|---|"]
    for r in ordered(doc, "generate_1024_b1"):
        lines.append(f"| {r['model']} | {r['system']} | {r['steps']} | {r['ms']:.1f} | "
                     f"{r['ms'] / r['steps']:.3f} | {_fmt(_ratio(decode and decode['ms'], r['ms']))} |")
    lines += ["", "DIMBA: DDIM with T steps over 1024 positions, unprompted; AR (ours): 1024 "
              "recurrent steps from one EOS token; mamba_ssm: its CUDA-graph generate() after a "
              "32-token prompt.", ""]
    return lines


def ssd_section(doc: dict) -> list[str]:
    """The SSD table's lines ([] without SSD rows)."""
    if not ordered(doc, "ssd"):
        return []
    lines = ["## SSD (bf16, headdim 64, d_state 128, one group, chunk 256)", "",
              "| shape | ours fwd ms | mamba_ssm fwd ms | ours / peer | ours fwd+bwd ms | "
              "mamba_ssm fwd+bwd ms | ours / peer |", "|---|---|---|---|---|---|---|"]
    for shape in SHAPE_NAMES:
        ours = _find(doc, "ssd", system="dimba_jax", shape=shape)
        peer = _find(doc, "ssd", system="mamba_ssm", shape=shape)
        if not ours and not peer:
            continue
        cells = [shape]
        for col in ("fwd_ms", "fwdbwd_ms"):
            a, b = ours and ours[col], peer and peer[col]
            cells += [_fmt(a, ".3f"), _fmt(b, ".3f"), _fmt(_ratio(a, b))]
        lines.append("| " + " | ".join(cells) + " |")
    peer_time = next((r["detail"].get("time") for r in doc["rows"]
                      if r["what"] == "ssd" and r["system"] == "mamba_ssm" and "detail" in r), None)
    lines += ["", "Ours: wall time of back-to-back calls + one sync, median. mamba_ssm: "
              f"`{peer_time or '—'}` of its two timings (do_bench: triton's GPU time with L2 "
              "flushed; wall5: the method of ours; best: the smaller of the two).", ""]
    return lines


def _train_panel(ax, doc: dict, colours: dict) -> None:
    train = ordered(doc, "train_step")
    ax.bar(range(len(train)), [r["tokens_per_s"] / 1e3 for r in train],
           color=[colours[r["system"]] for r in train])
    ax.set_xticks(range(len(train)), [f"{r['model']}\n{r['system']}" for r in train], fontsize=8)
    ax.set_ylabel("train tokens/s (thousands)")
    ax.set_title("Train step")


def _generate_panel(ax, doc: dict, colours: dict) -> None:
    gen = ordered(doc, "generate_1024_b1")
    ax.bar(range(len(gen)), [r["ms"] for r in gen], color=[colours[r["system"]] for r in gen])
    ax.set_xticks(range(len(gen)), [f"{r['model']}\n{r['system']}\n{r['steps']} steps" for r in gen],
                  fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale)")
    ax.set_title("1024 tokens at batch 1")


def _ssd_panel(ax, doc: dict, colours: dict) -> None:
    shapes = [s for s in SHAPE_NAMES if _find(doc, "ssd", system="dimba_jax", shape=s)
              and _find(doc, "ssd", system="mamba_ssm", shape=s)]
    width, top = 0.38, 1.3
    for j, (col, goal) in enumerate(SSD_TARGETS.items()):
        ratios = [_find(doc, "ssd", system="dimba_jax", shape=s)[col]
                  / _find(doc, "ssd", system="mamba_ssm", shape=s)[col] for s in shapes]
        top = max([top] + [1.15 * v for v in ratios])
        xs = [i + (j - 0.5) * width for i in range(len(shapes))]
        ax.bar(xs, ratios, width, color=["#1e88e5", "#0d47a1"][j],
               label="fwd" if col == "fwd_ms" else "fwd+bwd")
        for x in xs:
            ax.plot([x - width / 2, x + width / 2], [goal, goal], "k--", lw=1)
    ax.axhline(1.0, color=colours["mamba_ssm"], lw=1, label="mamba_ssm (same call)")
    ax.set_xticks(range(len(shapes)), shapes, fontsize=8)
    ax.set_ylim(0, top)
    ax.set_ylabel("ours / mamba_ssm (time)")
    ax.set_title("SSD (dashed: targets 0.5 / 0.4)")
    ax.legend(fontsize=8, loc="upper right")


def plot(doc: dict, path: str) -> str:
    """Writes the PNG (see the module docstring; one panel per part the file holds) to `path`;
    returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"dimba_jax": "#0d47a1", "mamba_ssm": "#ef6c00"}
    panels = [draw for what, draw in (("train_step", _train_panel), ("generate_1024_b1", _generate_panel),
                                      ("ssd", _ssd_panel)) if ordered(doc, what)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(max(7.5, 5 * len(panels)), 4.6), squeeze=False)
    for ax, draw in zip(axes[0], panels):
        draw(ax, doc, colours)
    title = f"dimba_jax beside mamba_ssm, {doc['device']}, one call ({doc['call_id'][:8]})"
    fig.suptitle(("SMOKE (not a measurement): " if doc.get("smoke") else "") + title, fontsize=10)
    return save_figure(fig, path, dpi=110)


def save_figure(fig, path: str, dpi: int) -> str:
    """Lays out `fig`, writes it to `path` (its folder made) as PNG and closes it; returns path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def main(argv=None) -> tuple[str, str]:
    """Validates the results file and writes the table and the plot; returns their paths."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results/vs_mamba_ssm_h200.json")
    p.add_argument("--table", default="", help="Markdown path (default: --results with .md)")
    p.add_argument("--plot", default="docs/vs_mamba_ssm_h200.png")
    args = p.parse_args(argv)
    doc = load(args.results)
    validate(doc)
    table = args.table or os.path.splitext(args.results)[0] + ".md"
    with open(table, "w") as f:
        f.write(to_markdown(doc))
    plot(doc, args.plot)
    print(table)
    print(args.plot)
    return table, args.plot


if __name__ == "__main__":
    main()
