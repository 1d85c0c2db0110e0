"""Merges Pareto result files written by parallel `benchmarks/pareto.py` shards into one file.

When one call runs several pareto.py processes at once (one GPU each, disjoint parts of the spec
grid, each writing its own --out), this joins them:

    python -m benchmarks.merge_pareto --base benchmarks/results/pareto_h200.json \\
        --out benchmarks/results/pareto_h200.json runs/session/pareto_shard*.json

Rules: every shard must have evaluated the same checkpoints (the "models" entries agree on
workdir, step and size), otherwise the merge stops with an error naming the model. Rows, their
details and samples, and the reference by length are unioned (a later shard wins on equal keys).
From --base (the previously committed file) only what the shards do not re-measure is kept:
the long-context study (its timing does not depend on the weights) and, when the base file's
models are the shards' models, its rows. Base rows of other checkpoints are dropped.
"""

from __future__ import annotations

import argparse
import os

from dimba_jax.evaluate import results as results_lib

_MODEL_IDENTITY = ("workdir", "step", "params")


def _identity(models: dict) -> dict:
    """{name: (workdir, step, params)} of a results file's "models" entry."""
    return {name: tuple(info.get(k) for k in _MODEL_IDENTITY) for name, info in (models or {}).items()}


def merge(base: dict, shards: list[dict]) -> dict:
    """Returns `base` updated with every shard (see the module docstring); shards is non-empty."""
    if not shards:
        raise ValueError("merge_pareto: no shard files given")
    ids = _identity(shards[0].get("models"))
    for i, shard in enumerate(shards[1:], start=1):
        other = _identity(shard.get("models"))
        for name in set(ids) & set(other):
            if ids[name] != other[name]:
                raise ValueError(f"merge_pareto: shard {i} evaluated {name} at {other[name]}, "
                                 f"shard 0 at {ids[name]} (workdir, step, params): not mergeable")
    same_models = _identity(base.get("models")) == ids
    out = results_lib.empty_results()
    for key in ("long_context", "long_context_slope", "long_context_model", "long_context_commands"):
        if key in base:
            out[key] = base[key]
    if same_models:
        results_lib.merge_rows(out, base.get("rows", []), base.get("details"))
        out["samples"] = dict(base.get("samples") or {})
        out["reference_by_L"] = dict(base.get("reference_by_L") or {})
        for cmd in base.get("commands", []):
            results_lib.add_command(out, cmd, "")
    for shard in shards:
        results_lib.merge_rows(out, shard.get("rows", []), shard.get("details"))
        out.setdefault("samples", {}).update(shard.get("samples") or {})
        out.setdefault("reference_by_L", {}).update(shard.get("reference_by_L") or {})
        out.setdefault("models", {}).update(shard.get("models") or {})
        for key in ("reference", "pre_split_fast_path"):
            if key in shard:
                out[key] = shard[key]
        for key in ("long_context", "long_context_slope", "long_context_model", "long_context_commands"):
            if shard.get(key):
                out[key] = shard[key]
        for cmd in shard.get("commands", []):
            results_lib.add_command(out, cmd, shard.get("device", ""))
    results_lib.validate(out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="pareto.py --out files of the parallel shards")
    p.add_argument("--base", default="benchmarks/results/pareto_h200.json",
                   help="previous results (long-context rows kept; rows kept only for the same models)")
    p.add_argument("--out", required=True, help="merged results file to write")
    args = p.parse_args(argv)
    missing = [s for s in args.shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"merge_pareto: shard files not found: {missing}")
    base = results_lib.load(args.base)
    merged = merge(base, [results_lib.load(s) for s in args.shards])
    results_lib.save(merged, args.out)
    print(f"merged {len(args.shards)} shard(s): {len(merged['rows'])} rows -> {args.out}")


if __name__ == "__main__":
    main()
