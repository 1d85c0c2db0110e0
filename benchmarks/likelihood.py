"""Likelihoods of several runs on the same validation windows: DIMBA's bound beside AR NLLs.

For each run (a workdir or a one-file export), `dimba_jax.train.inference.evaluate_model` on the
first --batches batches of its validation split (config.train.batch_size windows of
config.data.seq_len tokens each, or --batch-size for every run; runs of one tokenizer, corpus,
window and batch size read the same windows): for DIMBA the variational bound in bits per token (`DimbaTask.nll_bound`, 128 strata
of log-SNR per batch, with its diffusion and reconstruction parts) and beside it the same bound of
the context-free denoiser (`DimbaTask.unigram_bound`: each position's exact posterior under the
training tokens' unigram prior, on the run's embedding table, same strata and noise): the
difference is what the denoiser has learned from context. For the AR model its exact NLL in bits
per token. Per noise level (`--curve-logsnrs`, default -10 to 2 in steps of 0.5) each DIMBA run
also gets its head's cross-entropy beside the context-free posterior's, on the same windows and
noise: where the denoiser learns from context (`benchmarks.quality_report` draws it as
docs/context_gain_tiny.png from the committed files). The bound needs its 128 strata: with 32 (the tiny studies' setting) it
scatters by ~10%.

    python -m benchmarks.likelihood --models dimba=runs/tiny_study/dimba,ar=runs/tiny_study/ar \\
        --out benchmarks/results/likelihood_tiny_cpu.json

Writes the JSON {"device", "command", "batches", "rows": [{"run", "path", "task",
"tokens_seen", "bits"(, "diffusion_bits", "recon_bits", "context_free_bits", "curve": {"logsnr",
"ce_bits", "context_free_ce_bits"})}]} and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def to_markdown(doc: dict) -> str:
    lines = [f"# Likelihoods on the same validation windows — {doc['device']}", "",
             "Made by `benchmarks/likelihood.py`:", "", f"    {doc['command']}", "",
             f"The first {doc['batches']} validation batches of each run"
             + (f" ({doc['batch_size']} windows each, for every run)" if doc.get("batch_size") else "")
             + ". DIMBA: the variational bound "
             "(128 strata of log-SNR per batch); AR: the exact NLL. Bits per token.", ""]
    if doc.get("notes"):
        lines += [doc["notes"], ""]
    lines += ["| run | task | tokens seen | bits/token | diffusion part | reconstruction part | "
              "context-free denoiser | learned from context |",
              "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        part = lambda k: f"{r[k]:.3f}" if k in r else "—"  # noqa: E731
        gain = f"{r['context_free_bits'] - r['bits']:.3f}" if "context_free_bits" in r else "—"
        lines.append(f"| {r['run']} | {r['task']} | {r['tokens_seen']:,} | {r['bits']:.3f} | "
                     f"{part('diffusion_bits')} | {part('recon_bits')} | {part('context_free_bits')} | {gain} |")
    return "\n".join(lines) + "\n"


def parse_levels(text: str) -> list[float]:
    """'START:STOP:STEP' -> the levels START, START + STEP, ... up to STOP (included)."""
    try:
        start, stop, step = (float(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"--curve-logsnrs wants START:STOP:STEP, got {text!r}") from None
    if step <= 0 or stop < start:
        raise ValueError(f"--curve-logsnrs: need STEP > 0 and STOP >= START, got {text!r}")
    return [round(start + i * step, 6) for i in range(int(round((stop - start) / step)) + 1)]


def context_curve(run, num_batches: int, logsnrs: list[float], log_prior) -> dict:
    """A DIMBA run's head cross-entropy and the context-free posterior's under `log_prior`
    (bits per token) at each log-SNR, averaged over the first `num_batches` validation batches
    (unconditional layout, the same noise for both)."""
    import math

    import jax
    import numpy as np

    from dimba_jax.data.pipeline import make_eval_batches
    cfg, task, model = run.config, run.task, run.model
    batches = make_eval_batches(cfg.data, task.tokenizer, int(cfg.train.batch_size), num_batches,
                                int(cfg.data.seq_len))
    table = model.embedding_table()
    ce, free = np.zeros(len(logsnrs)), np.zeros(len(logsnrs))
    for i, batch in enumerate(batches):
        tokens = np.asarray(batch["tokens"])
        noise = jax.random.normal(jax.random.key(1000 + i), (*tokens.shape, model.embed_dim))
        for j, lam in enumerate(logsnrs):
            ce[j] += float(task.terms_at(model, tokens, lam, noise)["ce"])
            free[j] += float(task.context_free_terms(table, tokens, log_prior, lam, noise)["ce"])
    scale = 1.0 / (len(batches) * math.log(2.0))
    return {"logsnr": list(logsnrs), "ce_bits": (ce * scale).tolist(), "context_free_ce_bits": (free * scale).tolist()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="NAME=PATH,... workdirs or .npz exports")
    p.add_argument("--batches", type=int, default=4, help="validation batches per run")
    p.add_argument("--batch-size", type=int, default=0,
                   help="windows per validation batch for every run (0 = each run's train.batch_size); "
                        "set it when the runs trained at different batch sizes, so all read the same windows")
    p.add_argument("--curve-logsnrs", default="-10:2:0.5",
                   help="START:STOP:STEP log-SNR levels of the per-level curve (STOP included; '' = none)")
    p.add_argument("--out", required=True, help="results JSON (the .md is written beside it)")
    args = p.parse_args(argv)
    from dimba_jax.evaluate.results import device_label, parse_named_paths, write_with_markdown
    models = parse_named_paths(args.models)

    from dimba_jax.data.pipeline import unigram_log_prior
    from dimba_jax.train.inference import evaluate_model, load_run

    rows, priors = [], {}  # the unigram prior per data config: runs on one corpus tokenise it once
    for name, path in models.items():
        run = load_run(path)
        tokens = int(run.step) * int(run.config.train.batch_size) * int(run.config.data.seq_len)
        if args.batch_size:
            with run.config.unlocked():
                run.config.train.batch_size = args.batch_size
        dimba = str(run.config.task) == "dimba"
        log_prior = None
        if dimba:
            key = run.config.data.to_json()
            if key not in priors:
                priors[key] = unigram_log_prior(run.config.data, run.task.tokenizer)  # tokenises the training split
            log_prior = priors[key]
        m = evaluate_model(run, args.batches, log_prior=log_prior)
        row = {"run": name, "path": path, "task": str(run.config.task), "tokens_seen": tokens}
        if "bound_bits" in m:
            row.update(bits=m["bound_bits"], diffusion_bits=m["diffusion_bits"], recon_bits=m["recon_bits"],
                       context_free_bits=m["context_free_bits"])
            if args.curve_logsnrs:
                row["curve"] = context_curve(run, args.batches, parse_levels(args.curve_logsnrs), log_prior)
        else:
            row["bits"] = m["nll_bits"]
        rows.append(row)
        print(row, flush=True)
    doc = {"device": device_label(),
           "command": "python -m benchmarks.likelihood " + " ".join(
               shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
           "batches": args.batches, "batch_size": args.batch_size or None, "rows": rows}
    write_with_markdown(doc, args.out, to_markdown(doc))
    print(to_markdown(doc))
    return doc


if __name__ == "__main__":
    main()
