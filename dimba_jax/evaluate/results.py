"""The results file (``benchmarks/results/pareto_h200.json``): schema, validation, merging.

Format (the fields below, plus documented extras)::

    {"device": str, "command": str,
     "reference": {"judge_ppl": float, "entropy": float},
     "rows": [{"model": "dimba"|"ar", "sampler": "ddim"|"ddpm"|"ar", "steps": int,
               "L_gen": int, "batch": int, "prompted": bool, "latency_ms": float,
               "tokens_per_s": float, "judge_ppl": float, "entropy": float,
               ["variant": str], ["nll_bits": float]}, ...],
     "long_context": [{"L": int, "step_ms": float, "peak_gib": float|null}, ...],
     # extras
     "commands": [every command that contributed rows, oldest first],
     "reference_by_L": {"256": {...}, "1024": {...}},   # reference at each generation length
     "long_context_slope": float, "long_context_model": {...},
     "details": {row key: {compile_s, entropy_words, entropy_pooled, judge_tokens, ...}},
     "models": {"dimba": {...}, "ar": {...}, "judge": {...}}}

"nll_bits": the model's negative log-likelihood on held-out text in bits per token, exact for the
AR baseline and a variational upper bound for DIMBA (`DimbaTask.nll_bound`), on the same tokens.

A row is identified by (model, sampler, steps, L_gen, batch, prompted, variant); merging new
rows into a file replaces rows with the same identity and keeps all others, so results
accumulate over several short GPU runs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any

ROW_KEYS = ("model", "sampler", "steps", "L_gen", "batch", "prompted", "latency_ms",
            "tokens_per_s", "judge_ppl", "entropy")
OPTIONAL_ROW_KEYS = ("variant", "nll_bits")
LONG_CONTEXT_KEYS = ("L", "step_ms", "peak_gib")


def row_key(row: dict) -> str:
    """The identity of a row as a string (also the key of its entry in "details")."""
    return "|".join(str(row.get(k, "")) for k in
                    ("model", "sampler", "steps", "L_gen", "batch", "prompted", "variant"))


def empty_results(device: str = "", command: str = "") -> dict:
    """A results dict with no rows."""
    return {"device": device, "command": command, "commands": [command] if command else [],
            "reference": {"judge_ppl": None, "entropy": None}, "reference_by_L": {},
            "rows": [], "long_context": [], "long_context_slope": None, "details": {},
            "models": {}}


def load(path: str) -> dict:
    """Loads a results file, or returns an empty one if `path` does not exist."""
    if not os.path.exists(path):
        return empty_results()
    with open(path) as f:
        data = json.load(f)
    base = empty_results()
    base.update(data)
    return base


def save(results: dict, path: str) -> None:
    """Writes `results` atomically (temp file + rename) so an interrupted run never corrupts it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(_clean(results), f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def _clean(obj: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), numpy scalars -> Python numbers, recursively."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def merge_rows(results: dict, rows: Sequence[dict], details: dict | None = None) -> dict:
    """Adds `rows` to `results`, replacing rows with the same identity; returns `results`."""
    index = {row_key(r): i for i, r in enumerate(results["rows"])}
    for row in rows:
        validate_row(row)
        key = row_key(row)
        if key in index:
            results["rows"][index[key]] = row
        else:
            index[key] = len(results["rows"])
            results["rows"].append(row)
    if details:
        results.setdefault("details", {}).update(details)
    return results


def merge_long_context(results: dict, rows: Sequence[dict]) -> dict:
    """Adds long-context rows (identity: L), replacing rows of the same L; keeps them sorted."""
    by_len = {r["L"]: r for r in results.get("long_context", [])}
    for r in rows:
        for k in LONG_CONTEXT_KEYS:
            if k not in r:
                raise ValueError(f"long-context row lacks {k!r}: {r}")
        by_len[r["L"]] = dict(r)
    results["long_context"] = [by_len[k] for k in sorted(by_len)]
    return results


def add_command(results: dict, command: str, device: str) -> dict:
    """Records the command and device of a run that contributed to `results`."""
    results.setdefault("commands", [])
    if command and command not in results["commands"]:
        results["commands"].append(command)
    results["command"] = " ; ".join(results["commands"])
    if device:
        results["device"] = device
    return results


def validate_row(row: dict) -> None:
    """Raises ValueError if `row` does not follow the schema (keys and types)."""
    missing = [k for k in ROW_KEYS if k not in row]
    extra = [k for k in row if k not in ROW_KEYS + OPTIONAL_ROW_KEYS]
    if missing or extra:
        raise ValueError(f"row has missing keys {missing} / unknown keys {extra}: {row}")
    if row["model"] not in ("dimba", "ar"):
        raise ValueError(f"row model must be 'dimba' or 'ar', got {row['model']!r}")
    if row["sampler"] not in ("ddim", "ddpm", "ar"):
        raise ValueError(f"row sampler must be ddim/ddpm/ar, got {row['sampler']!r}")
    for k in ("steps", "L_gen", "batch"):
        if not isinstance(row[k], int) or isinstance(row[k], bool) or row[k] < 1:
            raise ValueError(f"row {k} must be a positive int, got {row[k]!r}")
    if not isinstance(row["prompted"], bool):
        raise ValueError(f"row prompted must be a bool, got {row['prompted']!r}")
    for k in ("latency_ms", "tokens_per_s", "judge_ppl", "entropy", "nll_bits"):
        if row.get(k) is not None and not isinstance(row[k], (int, float)):
            raise ValueError(f"row {k} must be a number or null, got {row[k]!r}")


def validate(results: dict) -> None:
    """Raises ValueError if `results` does not follow the file format."""
    for k in ("device", "command", "reference", "rows", "long_context"):
        if k not in results:
            raise ValueError(f"results lack {k!r}")
    for k in ("judge_ppl", "entropy"):
        if k not in results["reference"]:
            raise ValueError(f"reference lacks {k!r}")
    for row in results["rows"]:
        validate_row(row)
    for r in results["long_context"]:
        for k in LONG_CONTEXT_KEYS:
            if k not in r:
                raise ValueError(f"long-context row lacks {k!r}: {r}")


def device_label() -> str:
    """The device results are measured on, as results files name it: "platform:kind xN"."""
    import jax
    dev = jax.devices()[0]
    return f"{dev.platform}:{getattr(dev, 'device_kind', '')} x{jax.device_count()}"


def write_with_markdown(doc: dict, path: str, markdown: str) -> None:
    """Writes `doc` as JSON to `path` and `markdown` beside it (same stem, .md), creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(markdown)


def parse_named_paths(text: str) -> dict[str, str]:
    """A benchmark's --models argument: 'a=path1,b=path2' -> {"a": "path1", "b": "path2"} (at
    least one). ValueError names a malformed item."""
    out = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--models: expected NAME=PATH, got {item!r}")
        out[name] = path
    if not out:
        raise ValueError("--models: give at least one NAME=PATH")
    return out
