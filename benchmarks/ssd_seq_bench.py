"""The sampler's SSD forward: the one-launch sequential kernel beside the two Mosaic kernels.

    python -m benchmarks.ssd_seq_bench --config configs/base.py --out $OUT/ssd_seq_h100

At one denoiser SSD call of `--config` (a bidirectional mixer's heads of both directions,
headdim, d_state, ngroups per direction, data.seq_len; bf16; `--batch`, default 1) it times
the forward-only `pallas_mosaic.ssd_mosaic_forward` (what `ssd(impl="pallas")` runs on Hopper;
dt bias + softplus, D) with `KernelConfig(forward_only_kernel="mosaic")` (the models'
forward_only_block_len and prologue) and "sequential" (`pallas_seq` at its defaults), then the
sequential kernel alone on prepared chunk inputs over `--chunks` x `--block-p` x `--warps` x
`--stages`.
Each time is n calls in one jitted loop (`fused_bench.loop_fn`, as the sampler's scan runs
them; us per call). Every row's y is checked against the float32 sequential recurrence
(relative L2 error). Off GPU the kernels run in their interpreters (tests only; the times mean
nothing there).

Output: PREFIX.json ({"device", "jax", "command", "shape", "rows"}) and PREFIX.md, rewritten
after every row; `--budget-s` stops starting rows once spent.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shlex
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks.fused_bench import load_mixer, loop_fn
from benchmarks.ssd_pallas_bench import rel, time_ms
from dimba_jax.ssd import KernelConfig, _common, pallas_gpu, pallas_mosaic, pallas_seq
from dimba_jax.ssd.reference import reference_scan


def inputs(shape: dict, key):
    """(x, dt, A, B, C, D, dt_bias) of one SSD call: bf16 x, B, C; float32 dt (pre-bias), A, D
    (nheads,), dt_bias (nheads,)."""
    b, l, h, p, g, n = (shape[k] for k in ("batch", "L", "nheads", "headdim", "ngroups",
                                           "d_state"))
    ks = jax.random.split(key, 7)
    bf16 = jnp.bfloat16
    return (jax.random.normal(ks[0], (b, l, h, p)).astype(bf16),
            jax.random.normal(ks[1], (b, l, h)) - 1.0,
            -jnp.exp(jax.random.uniform(ks[2], (h,), minval=-1.0, maxval=1.0)),
            jax.random.normal(ks[3], (b, l, g, n)).astype(bf16),
            jax.random.normal(ks[4], (b, l, g, n)).astype(bf16),
            jax.random.normal(ks[5], (h,)),
            0.5 * jax.random.normal(ks[6], (h,)))


def reference(x, dt, A, B, C, D, dt_bias):
    """y of the float32 sequential recurrence, with the D skip."""
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    dts = _common.process_dt(dt, dt_bias=dt_bias, dt_softplus=True)
    with jax.default_matmul_precision("highest"):
        y, _ = reference_scan(f32(x), dts, A, f32(B), f32(C))
    return y + D[None, None, :, None] * f32(x)


def write(result, prefix):
    with open(prefix + ".json", "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# Forward-only SSD at batch {result['shape']['batch']} on {result['device']} "
             f"(jax {result['jax']})", "", f"Command: `{result['command']}`", "",
             f"Shape: {result['shape']} (bf16). us per call = one jitted loop of "
             f"{result['loop']} calls / {result['loop']}; median of the timed windows.", "",
             "| impl | q x block_p x warps x stages | us per call | rel err vs recurrence |",
             "|---|---|---|---|"]
    for r in result["rows"]:
        tiles = (f"{r['q']} x {r['block_p']} x {r['num_warps']} x {r['num_stages']}"
                 if "block_p" in r else "")
        us = f"{r['us']:.1f}" if "us" in r else r.get("error", "")
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        lines.append(f"| {r['impl']} | {tiles} | {us} | {err} |")
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/base.py")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=0, help="override data.seq_len (0: the config's)")
    p.add_argument("--loop", type=int, default=64, help="calls per jitted loop")
    p.add_argument("--chunks", default="64", help="chunk lengths q of the kernel sweep")
    p.add_argument("--block-p", default="16,32,64")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--inner", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=200.0)
    p.add_argument("--out", required=True, help="output prefix (PREFIX.json, PREFIX.md)")
    a = p.parse_args(argv)
    config, dims = load_mixer(a.config, a.seq_len)
    shape = dict(batch=a.batch, L=dims["L"], nheads=dims["nheads"] * dims["directions"],
                 headdim=dims["headdim"], ngroups=dims["ngroups"] * dims["directions"],
                 d_state=dims["d_state"])
    interpret = jax.default_backend() != "gpu"
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
              "command": "python -m benchmarks.ssd_seq_bench " + shlex.join(sys.argv[1:]
                                                                            if argv is None
                                                                            else argv),
              "shape": shape, "loop": a.loop, "rows": []}
    args = inputs(shape, jax.random.key(0))
    want = reference(*args)
    t0 = time.time()

    def timed(f, call_args, check, **row):
        if time.time() - t0 > a.budget_s:
            return
        try:
            row["rel_err"] = rel(check(jax.jit(f)(*call_args)), want)
            row["us"] = time_ms(loop_fn(f, a.loop), call_args, a.runs, a.inner)[0] / a.loop * 1e3
        except Exception as e:  # noqa: BLE001 (a configuration the compiler rejects is a result)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        result["rows"].append(row)
        write(result, a.out)
        print(json.dumps(row), flush=True)

    base = KernelConfig.from_config(config.model)
    x, dt, A, B, C, D, dt_bias = args
    for kernel in ("mosaic", "sequential"):
        cfg = dataclasses.replace(base, forward_only_kernel=kernel)

        def ssd_call(x, dt, A, B, C, D, dt_bias, cfg=cfg):
            return pallas_mosaic.ssd_mosaic_forward(
                x, dt, A, B, C, int(config.model.chunk_size), D=D, dt_bias=dt_bias,
                dt_softplus=True, kernels=cfg, interpret=interpret)

        timed(ssd_call, args, lambda y: y, impl=f"ssd_mosaic_forward ({kernel})")

    d = jnp.broadcast_to(D[:, None], (shape["nheads"], shape["headdim"])).astype(jnp.float32)
    hpg = shape["nheads"] // shape["ngroups"]
    sweep = [(int(q), int(bp), int(w), int(st)) for q in a.chunks.split(",")
             for bp in a.block_p.split(",") for w in a.warps.split(",")
             for st in a.stages.split(",")]
    for q, bp, w, st in sweep:
        xk, bk, ck, dtk, _, h0 = pallas_gpu.prepare_chunks(x, dt, A, B, C, q, jnp.bfloat16,
                                                            dt_bias=dt_bias, dt_softplus=True)
        f = functools.partial(pallas_seq.ssd_seq_forward, q=q, hpg=hpg, block_p=bp,
                              num_warps=w, num_stages=st, interpret=interpret)
        timed(lambda *c, f=f: f(*c)[0], (xk, bk, ck, dtk, A, h0, d),
              lambda y: y[:, :shape["L"]], impl="pallas_seq kernel", q=q, block_p=bp,
              num_warps=w, num_stages=st)
    return result


if __name__ == "__main__":
    main()
