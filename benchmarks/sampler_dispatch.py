"""The batch-1 sampler's host dispatch: one DIMBA sampling call timed three ways in one process.

* `packed`: `make_sample_fn` (`sampler.bound_program`: graph, state layout and settings bound;
  the state's small arrays packed into one array per dtype);
* `bound`: `bound_program(..., pack_max=-1)`, every state array its own argument;
* `unbound`: `sampler.sample_program` with the graph as a static argument, which jit hashes and
  compares at every call.

Each way is called in turn `--repeats` times (interleaved, so drifts of the device's clocks hit
all three alike); per call the wall time until the call returns (the host's dispatch) and
until its result is ready. All three give the same tokens (checked). Random weights (timing
does not depend on them); unprompted; DDIM at `--steps` steps over `--length` positions.

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
from flax import nnx

WAYS = ("packed", "bound", "unbound")


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

    model, _, _ = loading.fresh_model(cfg, seed=0)
    schedule = schedule_from_config(cfg.diffusion)
    grid, gemm = str(cfg.sample.grid), str(cfg.sample.gemm)
    tokens, known = jnp.zeros((1, length), jnp.int32), jnp.zeros((1, length), bool)
    rng = jax.random.PRNGKey(0)
    parts = sampling.sampler_parts(model, schedule, steps=steps, sampler="ddim", clamp=False,
                                   grid=grid, gemm=gemm)  # what make_sample_fn calls
    graphdef, state = nnx.split(model)
    bound, params = sampling.bound_program(graphdef, state, gemm, pack_max=-1, **parts.static)
    unbound = sampling.sample_program(gemm)
    rest = (tokens, known, rng) + parts.consts
    return {"packed": lambda: parts.run(parts.params, *rest),
            "bound": lambda: bound(params, *rest),
            "unbound": lambda: unbound(graphdef, state, *rest, **parts.static)}


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
        print(f"[dispatch] {w:8s} dispatch {r['dispatch_ms']:.3f} ms  call {r['call_ms']:.3f} ms",
              flush=True)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(doc, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(doc))


if __name__ == "__main__":
    main()
