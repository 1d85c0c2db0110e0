"""Does the noise decide the tokens? Token agreement of DIMBA samples that share their noise.

For the models given (workdirs or one-file exports of runs on the same tokenizer), draws
unprompted samples from one seed and reports the fraction of positions where two of them hold
the same token: between each pair of models at the same seed (they share the initial noise and,
with DDPM, every step's noise), for one model between two seeds (the chance level of "same
text"), and for one model with and without a prompt of random tokens at the same seed (all
positions after the prompt, and the first four). High agreement across models and across
prompts means the initial noise, read through the embedding table, fixes the text, and the
denoiser's own contribution (context) is small.

    python -m benchmarks.noise_agreement --models dimba=runs/tiny_study/dimba,l2r=runs/tiny_study/l2r \\
        --out benchmarks/results/noise_agreement_tiny_cpu.json

Writes the JSON (and a Markdown table beside it): {"device", "command", "settings", "rows":
[{"what", "a", "b", "sampler", "agreement"}]}. Sampler settings: the first model's config.sample
(`sampling.sampler_options`; the prior weight unless --prior-weight), DDIM and DDPM, T = --steps.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys

import numpy as np


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of equal entries of two int arrays of one shape."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"agreement needs equal shapes, got {a.shape} and {b.shape}")
    return float(np.mean(a == b))


def to_markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [f"# Token agreement of DIMBA samples that share their noise — {doc['device']}", "",
             "Made by `benchmarks/noise_agreement.py`:", "", f"    {doc['command']}", "",
             f"{s['batch']} unprompted samples of {s['length']} tokens per model, T = {s['steps']}, grid "
             f"{s['grid']}, score temperature {s['score_temperature']} -> {s['score_temperature_final'] or s['score_temperature']}, "
             f"prior weight {s.get('prior_weight', 1.0)}; "
             f"prompts: {s['prompt_len']} random tokens. Agreement = fraction of positions with the same token.", "",
             "| what | a | b | sampler | agreement |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['what']} | {r['a']} | {r['b']} | {r['sampler']} | {r['agreement']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="NAME=WORKDIR_OR_EXPORT, comma-separated")
    p.add_argument("--out", required=True, help="results JSON (the .md is written beside it)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--prior-weight", type=float, default=None,
                   help="sample.prior_weight of every draw (default: the first model's config)")
    args = p.parse_args(argv)
    from dimba_jax.evaluate import results as results_lib
    models = results_lib.parse_named_paths(args.models)

    import jax
    import jax.numpy as jnp

    from dimba_jax.diffusion import sampler as sampling
    from dimba_jax.train.inference import load_run

    runs = {name: load_run(path) for name, path in models.items()}
    first = next(iter(runs.values()))
    kw = {k: v for k, v in sampling.sampler_options(first.config.sample).items() if k != "sampler"}
    kw["steps"] = args.steps
    if args.prior_weight is not None:
        kw["prior_weight"] = float(args.prior_weight)
    b, length, plen = args.batch, args.length, args.prompt_len

    def draw(run, sampler, seed, tokens, known):
        return np.asarray(sampling.sample(run.model, run.task.schedule, jnp.asarray(tokens), jnp.asarray(known),
                                          jax.random.key(seed), sampler=sampler, **kw))

    blank = np.zeros((b, length), np.int32), np.zeros((b, length), bool)
    rows = []
    for sampler in ("ddim", "ddpm"):
        ids = {n: draw(r, sampler, 0, *blank) for n, r in runs.items()}
        for a, c in itertools.combinations(runs, 2):
            rows.append({"what": "two models, one seed", "a": a, "b": c, "sampler": sampler,
                         "agreement": agreement(ids[a], ids[c])})
        name = next(iter(runs))
        rows.append({"what": "one model, two seeds", "a": f"{name} seed 0", "b": f"{name} seed 1",
                     "sampler": sampler, "agreement": agreement(ids[name], draw(runs[name], sampler, 1, *blank))})
        vocab = runs[name].task.tokenizer.vocab_size
        prompt = np.random.default_rng(0).integers(0, vocab, (b, plen)).astype(np.int32)
        tokens = np.zeros((b, plen + length), np.int32)
        tokens[:, :plen] = prompt
        known = np.zeros((b, plen + length), bool)
        known[:, :plen] = True
        with_p = draw(runs[name], sampler, 0, tokens, known)[:, plen:]
        without = draw(runs[name], sampler, 0, np.zeros_like(tokens), np.zeros_like(known))[:, plen:]
        rows.append({"what": "with / without a prompt, one seed (all positions after it)", "a": name, "b": name,
                     "sampler": sampler, "agreement": agreement(with_p, without)})
        rows.append({"what": "with / without a prompt, one seed (first 4 after it)", "a": name, "b": name,
                     "sampler": sampler, "agreement": agreement(with_p[:, :4], without[:, :4])})
    doc = {"device": results_lib.device_label(),
           "command": "python -m benchmarks.noise_agreement " + " ".join(
               shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
           "settings": dict(kw, batch=b, length=length, prompt_len=plen, models=models), "rows": rows}
    results_lib.write_with_markdown(doc, args.out, to_markdown(doc))
    print(to_markdown(doc))
    return doc


if __name__ == "__main__":
    main()
