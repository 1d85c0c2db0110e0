"""Plots and the Markdown table from the Pareto results (runs anywhere, CPU is enough).

    python -m benchmarks.plot_pareto \\
        [--results benchmarks/results/pareto_h200.json] [--docs docs] \\
        [--table benchmarks/results/pareto_h200.md]

Writes docs/pareto_ppl_vs_latency.png (judge perplexity vs latency at batch 1, with the AR
point), docs/pareto_quality_vs_steps.png (judge perplexity and entropy vs T) and
docs/long_context_step_time.png (step time vs L, log-log, with the fitted slope), and the
Markdown table of every row. See `dimba_jax.evaluate.plots`.
"""

from __future__ import annotations

import argparse
import os

from dimba_jax.evaluate import plots, results


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results/pareto_h200.json")
    p.add_argument("--docs", default="docs", help="directory for the PNGs")
    p.add_argument("--table", default="", help="Markdown table path (default: --results with .md)")
    args = p.parse_args(argv)
    if not os.path.exists(args.results):
        raise FileNotFoundError(f"results file {args.results!r} not found (run python -m benchmarks.pareto)")
    res = results.load(args.results)
    results.validate(res)
    table = args.table or os.path.splitext(args.results)[0] + ".md"
    paths = plots.make_all(res, args.docs, table)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
