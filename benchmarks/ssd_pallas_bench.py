"""Check and time the Pallas SSD kernels against the XLA chunked SSD on one GPU.

Usage (on the GPU machine, from the repository root):
    python3 -m benchmarks.ssd_pallas_bench --out benchmarks/results

What it does, in one run:
  1. correctness: pallas (every kernel variant) vs the float32 sequential reference, forward
     and all gradients, float32 and bfloat16, fresh random inputs (seqlen not a multiple of the
     chunk); the XLA chunked SSD's bf16 error is printed beside it for scale;
  2. timing at ssd_bench.py's four shapes (130m / 1.3b widths at 2k to 32k tokens; bf16,
     dstate 128, headdim 64, 1 group, chunk 256 for xla): forward and forward+backward (vjp of y
     w.r.t. x, dt, A, B, C, D with dt_bias + softplus), median of >= 50 timed runs after warm-up;
  3. writes ssd_<tag>.json (ssd_bench.py's format, plus variant rows and errors) and
     ssd_<tag>.md, tag = `benchmarks.device_tag` of the device kind ("h200", "h100", ...).

It times our kernels only: ratios to mamba_ssm come from benchmarks/vs_mamba_ssm.py, which times
both in one call.

Timing: each sample is the wall time of `inner` back-to-back calls followed by one
block_until_ready, divided by `inner` (amortises Python dispatch, as a CUDA-graph replay would);
the median over samples is reported. Inputs are regenerated per shape (random normal, never zeros).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import device_tag
from benchmarks.ssd_bench import CHUNK, GROUPS as G, N, P, SHAPES  # name, B, L, H
from dimba_jax.ssd import _common
from dimba_jax.ssd import KernelConfig, pallas_gpu, pallas_mosaic, ssd
from dimba_jax.ssd.chunked import chunked_scan
from dimba_jax.ssd.reference import reference_scan

# The kernel version these numbers belong to (docs/ssd_kernel_notes.md lists the versions).
KERNEL_VERSION = "v6 (Mosaic GPU forward and backward)"


def nominal_flops(b, l, h, p=P, n=N, q=CHUNK):
    """Forward FLOPs of chunked SSD at chunk q (full Q x Q blocks): C B^T, (CB o L) x, chunk
    states and state->output; forward+backward counted as 3x forward."""
    nc = math.ceil(l / q)
    return b * h * nc * (2 * q * q * n + 2 * q * q * p + 4 * q * n * p)


def min_bytes(b, l, h, itemsize=2, p=P, n=N, g=G):
    """Fewest bytes of a forward: read x, B, C, dt once, write y once."""
    return itemsize * (2 * b * l * h * p + 2 * b * l * g * n) + 4 * b * l * h


def xla_ssd(x, dt, A, B, C, D=None, dt_bias=None, chunk_size=CHUNK):
    dtp = _common.process_dt(dt, dt_bias=dt_bias, dt_softplus=True)
    y, _ = chunked_scan(x, dtp, A, B, C, chunk_size)
    return _common.apply_skip_and_gate(y, x, D=D)


def pallas_ssd(block_len, warps_fwd, warps_bwd):
    def fn(x, dt, A, B, C, D=None, dt_bias=None):
        return pallas_gpu.ssd_pallas(x, dt, A, B, C, CHUNK, D=D, dt_bias=dt_bias,
                                     dt_softplus=True, block_len=block_len,
                                     num_warps_fwd=warps_fwd, num_warps_bwd=warps_bwd)
    return fn


def mosaic_ssd(kernels):
    def fn(x, dt, A, B, C, D=None, dt_bias=None):
        return pallas_mosaic.ssd_mosaic_forward(x, dt, A, B, C, CHUNK, D=D, dt_bias=dt_bias,
                                                dt_softplus=True, kernels=kernels)
    return fn


def dispatcher_ssd(x, dt, A, B, C, D=None, dt_bias=None):
    """What `ssd(impl="pallas")` runs with the default KernelConfig."""
    return ssd(x, dt, A, B, C, CHUNK, D=D, dt_bias=dt_bias, dt_softplus=True, impl="pallas")


def parse_variant(spec):
    """"128x4x8" -> Triton (block_len, warps_fwd, warps_bwd);
    "mosaic[:BLOCK[:BACKWARD[:PROLOGUE[:FLAGS]]]]" -> the Mosaic forward at chunk BLOCK
    (default per dtype) with the BACKWARD kernels ("triton", the default here, or "mosaic"), the
    dt PROLOGUE ("xla", the default here, "pallas" or "auto": `KernelConfig.prologue`) and
    FLAGS joined by "+": "wg2" (two consumer warpgroups in the Mosaic chunk backward,
    `KernelConfig.backward_warpgroups`), "owg2" (two in the chunk output,
    `KernelConfig.output_warpgroups`), "persist" (that output as the persistent kernel,
    `KernelConfig.output_persistent`), "fo128" (forward-only calls at chunk 128 instead of 64,
    `KernelConfig.forward_only_block_len`);
    "default" -> ssd(impl="pallas") with the default KernelConfig. Returns (label, fields for
    the row, fn)."""
    if spec == "default":
        return ("pallas_default", {"kernels": repr(KernelConfig())}, dispatcher_ssd)
    if spec.startswith("mosaic"):
        parts = spec.split(":") + ["", "", "", ""]
        block = int(parts[1]) if parts[1] else None
        flags = set(parts[4].split("+")) - {""}
        if flags - {"wg2", "owg2", "persist", "fo128"}:
            raise ValueError(f"variant {spec!r}: the fifth field joins 'wg2', 'owg2', "
                             f"'persist', 'fo128' by '+'")
        kernels = KernelConfig(block_len=block, backward=parts[2] or "triton",
                               prologue=parts[3] or "xla",
                               backward_warpgroups=2 if "wg2" in flags else 1,
                               output_warpgroups=2 if "owg2" in flags else 1,
                               output_persistent="persist" in flags,
                               forward_only_block_len=128 if "fo128" in flags else 64)
        label_block = block or pallas_mosaic.DEFAULT_BLOCK_LEN
        label = f"mosaic_{label_block}_{kernels.backward}_bwd"
        fields = {"block_len": label_block, "backward": kernels.backward}
        if kernels.prologue != "xla":
            label, fields["prologue"] = f"{label}_{kernels.prologue}_prologue", kernels.prologue
        if kernels.backward_warpgroups == 2:
            label, fields["backward_warpgroups"] = f"{label}_wg2", 2
        if kernels.output_warpgroups == 2:
            label, fields["output_warpgroups"] = f"{label}_owg2", 2
        if kernels.output_persistent:
            label, fields["output_persistent"] = f"{label}_persist", True
        if "fo128" in flags:
            label, fields["forward_only_block_len"] = f"{label}_fo128", 128
        return label, fields, mosaic_ssd(kernels)
    var = tuple(int(v) for v in spec.split("x"))
    return (f"pallas_{spec}", dict(zip(("block_len", "warps_fwd", "warps_bwd"), var)),
            pallas_ssd(*var))


def make_inputs(key, b, l, h, dtype, p=P, n=N, g=G):
    ks = jax.random.split(key, 8)
    return dict(
        x=jax.random.normal(ks[0], (b, l, h, p)).astype(dtype),
        dt=jax.random.normal(ks[1], (b, l, h)) - 1.0,
        A=-jnp.exp(jax.random.uniform(ks[2], (h,), minval=-1.0, maxval=1.0)),
        B=jax.random.normal(ks[3], (b, l, g, n)).astype(dtype),
        C=jax.random.normal(ks[4], (b, l, g, n)).astype(dtype),
        D=jax.random.normal(ks[5], (h,)),
        dt_bias=jax.random.normal(ks[6], (h,)) * 0.5,
    ), jax.random.normal(ks[7], (b, l, h, p)).astype(dtype)


ARGS = ("x", "dt", "A", "B", "C", "D", "dt_bias")


def fwd_fn(fn):
    return jax.jit(lambda *a: fn(*a))


def fwdbwd_fn(fn):
    def f(dy, *a):
        y, vjp = jax.vjp(fn, *a)
        return y, vjp(dy)
    return jax.jit(f)


def time_ms(f, args, n, inner):
    jax.block_until_ready(f(*args))
    for _ in range(3):
        jax.block_until_ready(f(*args))
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = f(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(samples), float(np.percentile(samples, 10)), float(np.percentile(samples, 90))


def rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64).ravel()
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64).ravel()
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def reference_ssd(x, dt, A, B, C, D=None, dt_bias=None):
    dtp = _common.process_dt(dt, dt_bias=dt_bias, dt_softplus=True)
    with jax.default_matmul_precision("highest"):
        y, _ = reference_scan(x, dtp, A, B, C)
    return _common.apply_skip_and_gate(y, x, D=D)


def check(fn, dtype, seed, dims):
    b, l, h, p, g, n = dims
    inputs, dy = make_inputs(jax.random.key(seed), b, l, h, dtype, p, n, g)
    args = [inputs[k] for k in ARGS]
    y, grads = fwdbwd_fn(fn)(dy, *args)
    y_ref, grads_ref = fwdbwd_fn(reference_ssd)(dy, *args)
    err = {"y": rel(y, y_ref)}
    for k, gr, gr_ref in zip(ARGS, grads, grads_ref):
        err["d" + k] = rel(gr, gr_ref)
    return err


def write(result, a):
    """Writes ssd_<tag>.json and ssd_<tag>.md under a.out, tag = device_tag(result["device"])
    (called after every shape)."""
    stem = os.path.join(a.out, f"ssd_{device_tag(result['device'])}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    lines = ["| shape | impl | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s |",
             "|---|---|---|---|---|---|"]
    variants = {r["impl"] for r in result["variant_rows"]}
    listed = result["rows"] + (result["variant_rows"] if len(variants) > 1 else [])
    for r in listed:
        if "fwd_ms" not in r:
            lines.append(f"| {r['shape']} | {r['impl']} | error | error | | |")
            continue
        lines.append(
            f"| {r['shape']} | {r['impl']}{' (' + r['variant'] + ')' if 'variant' in r else ''} "
            f"| {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | {r['fwd_tflops']:.0f} "
            f"| {r['fwdbwd_tflops']:.0f} |")
    md = (f"# SSD on {result['device']} (jax {result['jax']})\n\n"
          f"Command: `{result['command']}`\n\nbf16, headdim 64, dstate 128, 1 group; medians of "
          f"{a.runs} samples. TFLOP/s are nominal (chunk-256 SSD FLOPs, fwd+bwd = 3x fwd). "
          f"Ratios to mamba_ssm come only from `benchmarks/vs_mamba_ssm.py`, which times both "
          f"in one call.\n\n" + "\n".join(lines) + "\n")
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--variants", default="default,128x4x8,mosaic:128",
                    help="comma separated kernel variants: Triton block_len x warps_fwd x "
                         "warps_bwd (128x4x8), Mosaic forward mosaic:BLOCK:BACKWARD, or default "
                         "(= ssd(impl='pallas')); the results' 'pallas' row is default when "
                         "timed, else the fastest fwd+bwd variant")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-xla", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    dev = jax.devices()[0]
    print("device:", dev.device_kind, dev.platform, getattr(dev, "compute_capability", ""),
          "jax", jax.__version__, flush=True)
    ok, why = pallas_gpu.supported(x=jnp.zeros((1, 1, 1, P)), dt=None, A=None,
                                   B=jnp.zeros((1, 1, 1, N)), C=None, chunk_size=CHUNK)
    print("supported:", ok, why, flush=True)
    variants = [parse_variant(v) for v in a.variants.split(",")]
    result = {"device": dev.device_kind, "command": " ".join(["python3 -m benchmarks.ssd_pallas_bench"] + sys.argv[1:]),
              "jax": jax.__version__, "code_version": KERNEL_VERSION, "rows": [],
              "variant_rows": [], "errors": {}}

    # ---------------------------------------------------------------- correctness
    if not a.skip_check:
        rng = np.random.default_rng()
        for dims in [(2, 300, 4, 64, 1, 128), (1, 517, 6, 64, 2, 64)]:
            for dtype in (jnp.float32, jnp.bfloat16):
                tag = f"{jnp.dtype(dtype).name}-{'x'.join(map(str, dims))}"
                for label, _, fn in variants:
                    key = f"{label}/{tag}"
                    try:
                        err = check(fn, dtype, int(rng.integers(1 << 30)), dims)
                    except Exception as e:  # report and carry on: one variant may not compile
                        err = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
                    result["errors"][key] = err
                    print(key, json.dumps(err), flush=True)
                err = check(xla_ssd, dtype, int(rng.integers(1 << 30)), dims)
                result["errors"][f"xla/{tag}"] = err
                print(f"xla/{tag}", json.dumps(err), flush=True)

    # ---------------------------------------------------------------- timing
    want = set(a.shapes.split(","))
    for name, b, l, h in SHAPES:
        if name not in want:
            continue
        inputs, dy = make_inputs(jax.random.key(hash(name) % (1 << 30)), b, l, h, jnp.bfloat16)
        args = [inputs[k] for k in ARGS]
        flops = nominal_flops(b, l, h)
        base = {"shape": name, "B": b, "L": l, "H": h, "P": P, "N": N, "chunk": CHUNK,
                "nominal_fwd_gflop": flops / 1e9, "min_fwd_mbytes": min_bytes(b, l, h) / 1e6}
        impls = [] if a.skip_xla else [("xla", None, xla_ssd)]
        impls += variants
        best = default = None
        for label, var, fn in impls:
            row = dict(base, impl=label)
            try:
                row["fwd_ms"], row["fwd_p10"], row["fwd_p90"] = time_ms(fwd_fn(fn), args, a.runs, a.inner)
                row["fwdbwd_ms"], row["fwdbwd_p10"], row["fwdbwd_p90"] = time_ms(
                    fwdbwd_fn(fn), [dy] + args, a.runs, a.inner)
                row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
                row["fwdbwd_tflops"] = 3 * flops / row["fwdbwd_ms"] / 1e9
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            print(json.dumps(row), flush=True)
            if var is None:
                result["rows"].append(row)
            else:
                row.update(var)
                result["variant_rows"].append(row)
                if "fwdbwd_ms" in row and (best is None or row["fwdbwd_ms"] < best["fwdbwd_ms"]):
                    best = row
                if label.startswith("pallas_default") and "fwdbwd_ms" in row:
                    default = row
        chosen = default or best
        if chosen is not None:
            result["rows"].append(dict(chosen, impl="pallas", variant=chosen["impl"]))
        write(result, a)

    write(result, a)


if __name__ == "__main__":
    main()
