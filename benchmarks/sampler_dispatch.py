"""The batch-1 sampler's host dispatch: one DIMBA sampling call timed five ways in one process.

* `packed`: `make_sample_fn` (`sampler.bound_program`: graph, state layout and settings bound;
  the state's small arrays packed into one array per dtype), its inputs device arrays made once;
* `bound`: `bound_program(..., pack_max=-1)`, every state array its own argument;
* `unbound`: `sampler.sample_program` with the graph as a static argument, which jit hashes and
  compares at every call;
* `host_args`: `packed` given numpy tokens, mask and key (`generators.prng_key`), as the
  harness's generator passes them: what the transfers cost;
* `generator`: `DimbaGenerator.generate`, the harness's whole call (what
  benchmarks/vs_mamba_ssm.py times): the rest of its host work.

Each way is called in turn `--repeats` times (interleaved, so drifts of the device's clocks hit
all alike); per call the wall time until the call returns (the host's dispatch) and until its
result is ready. All give the same tokens (checked). Random weights (timing does not depend on
them); unprompted, guidance 1, the config's other sample settings; DDIM at `--steps` steps over
`--length` positions.

GPU command (one H100, ~40 s):

    python -m benchmarks.sampler_dispatch --config configs/base.py --out $OUT/sampler_dispatch

writes OUT.json and OUT.md. CPU smoke (tests): --config configs/tiny.py --steps 2 --length 32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

WAYS = ("packed", "bound", "unbound", "host_args", "generator")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/base.py")
    p.add_argument("--steps", type=int, default=64, help="DDIM steps T")
    p.add_argument("--length", type=int, default=1024, help="generated positions (batch 1)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per way (median)")
    p.add_argument("--out", default="", help="write OUT.json and OUT.md")
    return p.parse_args(argv)


def callers(cfg, steps: int, length: int) -> dict:
    """way -> a no-argument function running one sampling call (see the module docstring)."""
    from dimba_jax.diffusion import sampler as sampling
    from dimba_jax.diffusion.schedule import schedule_from_config
    from dimba_jax.evaluate import loading
    from dimba_jax.evaluate.generators import DimbaGenerator, prng_key
    from dimba_jax.evaluate.harness import RunSpec

    model, _, tok = loading.fresh_model(cfg, seed=0)
    schedule = schedule_from_config(cfg.diffusion)
    gen, spec = DimbaGenerator(model, cfg, tok), RunSpec("dimba", "ddim", steps, length, False)
    options = gen.options(spec)  # the generator's settings, so every way runs one program
    host = (np.zeros((1, length), np.int32), np.zeros((1, length), bool))
    tokens, known = jnp.asarray(host[0]), jnp.asarray(host[1])
    rng = jax.random.PRNGKey(0)
    parts = sampling.sampler_parts(model, schedule, steps=steps, sampler="ddim", **options)
    graphdef, state = nnx.split(model)
    bound, params = sampling.bound_program(graphdef, state, options["gemm"], pack_max=-1, **parts.static)
    unbound = sampling.sample_program(options["gemm"])
    rest = (tokens, known, rng) + parts.consts
    return {"packed": lambda: parts.run(parts.params, *rest),
            "bound": lambda: bound(params, *rest),
            "unbound": lambda: unbound(graphdef, state, *rest, **parts.static),
            "host_args": lambda: parts.run(parts.params, *host, prng_key(0), *parts.consts),
            "generator": lambda: (gen.generate(spec, None, 1, 0),)}


def measure(calls: dict, repeats: int) -> dict:
    """Compiles and checks every way, then times them interleaved: way -> {"dispatch_ms",
    "call_ms"} medians and the samples."""
    ids = {w: jax.block_until_ready(f())[0] for w, f in calls.items()}
    first = next(iter(ids.values()))
    for w, x in ids.items():
        if not bool((x == first).all()):
            raise RuntimeError(f"sampler_dispatch: way {w} gave other tokens than {WAYS[0]}")
    samples = {w: {"dispatch_ms": [], "call_ms": []} for w in calls}
    for _ in range(repeats):
        for w, f in calls.items():
            t0 = time.perf_counter()
            out = f()
            t1 = time.perf_counter()
            jax.block_until_ready(out)
            t2 = time.perf_counter()
            samples[w]["dispatch_ms"].append((t1 - t0) * 1e3)
            samples[w]["call_ms"].append((t2 - t0) * 1e3)
    return {w: {k: statistics.median(v) for k, v in s.items()} | {"samples": s}
            for w, s in samples.items()}


def markdown(doc: dict) -> str:
    lines = [f"# Batch-1 sampler dispatch on {doc['device']}", "",
             f"Command: `{doc['command']}`  ",
             f"jax {doc['jax']}; DDIM T = {doc['steps']}, {doc['length']} positions, batch 1; "
             f"median of {doc['repeats']} interleaved calls per way.", "",
             "| way | host dispatch ms | call ms (until ready) |", "|---|---|---|"]
    for w, r in doc["ways"].items():
        lines.append(f"| {w} | {r['dispatch_ms']:.3f} | {r['call_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from dimba_jax.train import overrides as ov

    args = parse_args(argv)
    cfg = ov.load_config_file(args.config)
    ways = measure(callers(cfg, args.steps, args.length), args.repeats)
    doc = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "command": "python -m benchmarks.sampler_dispatch " + " ".join(sys.argv[1:] if argv is None
                                                                           else argv),
           "steps": args.steps, "length": args.length, "repeats": args.repeats, "ways": ways}
    for w, r in ways.items():
        print(f"[dispatch] {w:9s} dispatch {r['dispatch_ms']:.3f} ms  call {r['call_ms']:.3f} ms",
              flush=True)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(doc, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(doc))


if __name__ == "__main__":
    main()
