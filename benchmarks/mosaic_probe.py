"""Probe the Mosaic GPU SSD forward (`dimba_jax/ssd/pallas_mosaic.py`) on one Hopper GPU.

Usage (GPU machine, repository root):
    export PYTHONUNBUFFERED=1
    timeout 280 python3 -m benchmarks.mosaic_probe --out $OUT --budget-s 240 --quick
The fused dout chunk-state + reverse state-pass kernel alone (`pallas_mosaic_rev`) vs the two
Triton kernels it replaces (130m-L2k, 1.3b-L2k, 130m-L32k, q 128; only these cases; with
--lower-only or without a GPU it lowers them for cuda):
    timeout 280 python3 -m benchmarks.mosaic_probe --out $OUT --budget-s 240 --rev
The Mosaic chunk-backward stage alone (`pallas_mosaic_bwd.chunk_bwd_mosaic` vs pallas_gpu's
Triton `_chunk_bwd_call`, 130m-L2k, bf16, q 128 and 64; only these cases):
    timeout 280 python3 -m benchmarks.mosaic_probe --out $OUT --budget-s 240 --chunk-bwd
Any machine (no GPU needed; jax 0.11 CPU reproduces the GPU's lowering, layout inference
included):
    python3 -m benchmarks.mosaic_probe --lower-only --out mosaic_lower_out

The Mosaic forward is one Mosaic kernel for chunk states + state pass, then the chunk-output
kernel (`pallas_mosaic_fwd`). For each case, in order (each in try/except, announced by a START line, printed
when done and written incrementally to $OUT/mosaic_probe.json and $OUT/mosaic_probe.md):
  1. the chunk-output stage alone at 130m-L2k, block 128, vs pallas_gpu's Triton output kernel
     on the same inputs (error and time), in Lane and then Warpgroup lowering semantics; the
     first that passes is used for the rest (or --semantics); then the fused chunk-state +
     state-pass kernel vs Triton chunk states + state pass (hprev and final-state errors,
     times, GB/s);
  2. correctness on small random shapes (seqlen not a multiple of the chunk included; bf16, f16,
     f32 = tf32 products, and one f32 case at block 128 that must be refused): the mosaic
     forward and its gradients (custom_vjp's Triton backward) vs impl="reference", relative L2;
  3. timing at the four benchmark shapes (bf16, P 64, N 128, 1 group, chunk 256): mosaic at
     block 128 and 64, impl="xla" and impl="pallas", forward and forward+backward, median of
     >= 50 device-synchronised runs after warm-up; mosaic vs xla relative L2 error; before each
     shape after the first, the two kernels alone at block 128 and 64.
--budget-s bounds the total time (cases that would start after it are recorded as skipped).
--quick: the first timing shape only (kernels at q128 and q64, the checks, 4 timings).
--chunk-bwd: only the chunk-backward stage cases (see `stage_bwd_case`): both semantics unless
--semantics; without a GPU it lowers them for cuda (and with --cpu-interpret runs a tiny case
in the interpreters).
--lower-only: lower for cuda at the four shapes (bf16 block 128 and 64, f32 block 64; the two
kernels alone, fwd and fwd+bwd; both semantics unless --semantics),
report, exit 1 if any fails.
On a machine without a GPU (and no --lower-only) it says "no GPU", checks that the mosaic kernels
lower for cuda on a tiny shape, and exits 0 (--cpu-interpret: then runs tiny cases in the
Mosaic GPU interpreter, a self-test of this script).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from dimba_jax.ssd import KernelConfig, hopper, pallas_mosaic, pallas_mosaic_fwd, ssd

# The four benchmark shapes (name, B, L, H), their P / N / groups / chunk and the relative-error
# helper are ssd_pallas_bench's.
from benchmarks.ssd_pallas_bench import CHUNK, G, N, P, SHAPES, rel

SMALL = [  # (B, L, H, P, G, N, dtype, block_len, options)
    (2, 300, 4, 64, 1, 128, "bfloat16", 128, "D+bias+h0"),
    (1, 200, 8, 64, 2, 64, "bfloat16", 64, "D(h,p)+z"),
    (2, 256, 4, 128, 1, 128, "float16", 128, "D"),
    (2, 300, 4, 64, 1, 128, "float32", 64, "D+bias+h0"),
    (2, 300, 4, 64, 1, 128, "float32", 128, "D"),  # must be refused: tiles exceed SMEM
]
T0 = time.perf_counter()
INTERPRET = False  # --cpu-interpret: run the mosaic kernel in its interpreter (probe self-test)
SEMANTICS = hopper.DEFAULT_SEMANTICS  # Mosaic lowering semantics of the full-SSD cases


def elapsed():
    return time.perf_counter() - T0


def short_tb(limit=60):
    lines = traceback.format_exc().rstrip().splitlines()
    if len(lines) > limit:
        lines = lines[:20] + [f"... ({len(lines) - limit} lines cut) ..."] + lines[-(limit - 20):]
    return "\n".join(lines)


def make_inputs(seed, b, l, h, p, g, n, dtype, options):
    """Random inputs (never all zero) for a case; options picks D / dt_bias / h0 / z."""
    ks = jax.random.split(jax.random.key(seed), 10)
    kw = dict(dt_softplus=True)
    args = dict(
        x=jax.random.normal(ks[0], (b, l, h, p)).astype(dtype),
        dt=jax.random.normal(ks[1], (b, l, h)) - 1.0,
        A=-jnp.exp(jax.random.uniform(ks[2], (h,), minval=-1.0, maxval=1.0)),
        B=jax.random.normal(ks[3], (b, l, g, n)).astype(dtype),
        C=jax.random.normal(ks[4], (b, l, g, n)).astype(dtype),
    )
    if "D(h,p)" in options:
        kw["D"] = jax.random.normal(ks[5], (h, p))
    elif "D" in options:
        kw["D"] = jax.random.normal(ks[5], (h,))
    if "bias" in options:
        kw["dt_bias"] = jax.random.normal(ks[6], (h,)) * 0.5
    if "h0" in options:
        kw["initial_states"] = jax.random.normal(ks[7], (b, h, p, n))
    if "z" in options:
        kw["z"] = jax.random.normal(ks[8], (b, l, h, p)).astype(dtype)
    dy = jax.random.normal(ks[9], (b, l, h, p)).astype(dtype)
    return args, kw, dy


def impl_fn(impl, kw, block_len=None, final=False):
    """f(x, dt, A, B, C) -> y (and final states if `final`) for impl in mosaic|xla|pallas|reference
    (mosaic: the Mosaic forward at chunk block_len with Triton's backward)."""
    def f(x, dt, A, B, C):
        if impl == "mosaic":
            return pallas_mosaic.ssd_mosaic_forward(
                x, dt, A, B, C, CHUNK, return_final_states=final, interpret=INTERPRET,
                semantics=SEMANTICS, kernels=KernelConfig(block_len=block_len, backward="triton"),
                **kw)
        if impl == "reference":
            with jax.default_matmul_precision("highest"):
                return ssd(x, dt, A, B, C, CHUNK, impl="reference", return_final_states=final, **kw)
        return ssd(x, dt, A, B, C, CHUNK, impl=impl, return_final_states=final, **kw)
    return f


def fwdbwd(f):
    def g(dy, x, dt, A, B, C):
        y, vjp = jax.vjp(f, x, dt, A, B, C)
        return y, vjp(dy)
    return jax.jit(g)


def time_ms(f, args, runs, deadline):
    """Median (and p10/p90) ms of `runs` device-synchronised calls after compile + warm-up."""
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    compile_s = time.perf_counter() - t
    for _ in range(3):
        jax.block_until_ready(f(*args))
    samples = []
    for i in range(runs):
        if i >= 10 and time.perf_counter() > deadline:
            break
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        samples.append((time.perf_counter() - t) * 1e3)
    return dict(ms=statistics.median(samples), p10=float(np.percentile(samples, 10)),
                p90=float(np.percentile(samples, 90)), n=len(samples), compile_s=round(compile_s, 2))


class Recorder:
    def __init__(self, out, command):
        self.out = out
        os.makedirs(out, exist_ok=True)
        dev = jax.devices()[0]
        self.data = {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
                     "jax": jax.__version__, "command": command, "cases": []}

    def add(self, case):
        case["t_s"] = round(elapsed(), 1)
        self.data["cases"].append(case)
        print("RESULT " + json.dumps(case), flush=True)
        if case.get("traceback"):
            print(case["traceback"], flush=True)
        self.write()

    def write(self):
        with open(os.path.join(self.out, "mosaic_probe.json"), "w") as f:
            json.dump(self.data, f, indent=1)
        lines = [f"# Mosaic GPU SSD probe on {self.data['device']} (jax {self.data['jax']})", "",
                 f"Command: `{self.data['command']}`", "",
                 "| case | impl | status | fwd ms | fwd+bwd ms | rel err (y / worst grad) | note |",
                 "|---|---|---|---|---|---|---|"]
        for c in self.data["cases"]:
            errs = c.get("errors", {})
            err = ""
            if errs:
                grads = [v for k, v in errs.items() if k.startswith("d")]
                err = f"{errs.get('y', errs.get('states', float('nan'))):.2e}"
                if grads:
                    err += f" / {max(grads):.2e}"
            fwd = c.get("fwd", {}).get("ms")
            fb = c.get("fwdbwd", {}).get("ms")
            note = c.get("reason", "") or (c.get("error", "")[:80])
            if "triton" in c:
                note = (f"triton {c['triton']['ms']:.3f} ms; {c['mosaic_GBps']} vs "
                        f"{c['triton_GBps']} GB/s")
                if "kernel" in c:
                    note += f"; mosaic kernel alone {c['kernel']['ms']:.3f} ms"
            if "whole" in c:  # --out-slab: slab kernel (fwd) vs the whole-chunk kernel
                note = (f"whole {c['whole']['ms']:.3f} ms (whole / slab {c['speedup']}); "
                        f"{c['slab_GBps']} vs {c['whole_GBps']} GB/s; smem {c['smem_bytes']} B")
            lines.append(f"| {c['case']} | {c.get('impl', '')} | {c['status']} | "
                         f"{'' if fwd is None else f'{fwd:.3f}'} | {'' if fb is None else f'{fb:.3f}'} | "
                         f"{err} | {note} |")
        with open(os.path.join(self.out, "mosaic_probe.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


def correctness_case(rec, spec, seed, with_grads=True):
    b, l, h, p, g, n, dtype, q, options = spec
    name = f"check {dtype} {b}x{l}x{h}x{p} g{g} n{n} q{q} {options} [{SEMANTICS}]"
    args, kw, dy = make_inputs(seed, b, l, h, p, g, n, jnp.dtype(dtype), options)
    ok, why = pallas_mosaic.supported(x=args["x"], B=args["B"], block_len=q,
                                      check_device=not INTERPRET)
    if not ok:  # an unsupported option must be refused with a clear error, never a wrong answer
        try:
            pallas_mosaic.ssd_mosaic_forward(*args.values(), CHUNK, interpret=INTERPRET,
                                             kernels=KernelConfig(block_len=q), **kw)
            rec.add(dict(case=name, impl="mosaic", status="FAIL",
                         error=f"unsupported ({why}) but no error raised"))
        except ValueError as e:
            rec.add(dict(case=name, impl="mosaic", status="unsupported", reason=str(e)))
        return
    order = ("x", "dt", "A", "B", "C")
    a = [args[k] for k in order]
    t = time.perf_counter()
    y, fin = jax.jit(impl_fn("mosaic", kw, q, final=True))(*a)
    y_ref, fin_ref = jax.jit(impl_fn("reference", kw, final=True))(*a)
    errors = {"y": rel(y, y_ref), "final_states": rel(fin, fin_ref)}
    if with_grads:
        _, grads = fwdbwd(impl_fn("mosaic", kw, q))(dy, *a)
        _, grads_ref = fwdbwd(impl_fn("reference", kw))(dy, *a)
        for k, gr, gr_ref in zip(order, grads, grads_ref):
            errors["d" + k] = rel(gr, gr_ref)
    tol = 1.5e-2 if dtype in ("bfloat16", "float16") else 2.5e-3
    worst = max(errors.values())
    status = "ok" if worst <= tol else "FAIL"
    if not math.isfinite(worst):
        status = "FAIL"
    rec.add(dict(case=name, impl="mosaic", status=status, errors=errors, tol=tol,
                 seconds=round(time.perf_counter() - t, 1)))


def timing_case(rec, shape, impl, q, runs, deadline, do_bwd, y_xla=None):
    name, b, l, h = shape
    args, kw, dy = make_inputs(1234, b, l, h, P, G, N, jnp.bfloat16, "D+bias")
    a = [args[k] for k in ("x", "dt", "A", "B", "C")]
    label = impl if impl != "mosaic" else f"mosaic q{q} {SEMANTICS}"
    f = jax.jit(impl_fn(impl, kw, q))
    case = dict(case=f"time {name}", shape=name, B=b, L=l, H=h, P=P, N=N, chunk=CHUNK, impl=label,
                status="ok")
    case["fwd"] = time_ms(f, a, runs, deadline)
    y = f(*a)
    if y_xla is not None:
        case["errors"] = {"y": rel(y, y_xla)}
        case["error_vs"] = "xla"
    if do_bwd and time.perf_counter() < deadline:
        case["fwdbwd"] = time_ms(fwdbwd(impl_fn(impl, kw, q)), [dy] + a, runs,
                                 deadline)
    flops = 2 * b * h * math.ceil(l / CHUNK) * (CHUNK * CHUNK * (N + P) + 2 * CHUNK * N * P)
    case["fwd_tflops_nominal"] = round(flops / case["fwd"]["ms"] / 1e9, 1)
    rec.add(case)
    return y


def stage_case(rec, shape, q, runs, deadline, semantics):
    """The chunk-output stage alone: Mosaic kernel vs pallas_gpu's Triton kernel, same inputs."""
    from dimba_jax.ssd import pallas_gpu  # pylint: disable=import-outside-toplevel
    name, b, l, h = shape
    ks = jax.random.split(jax.random.key(7), 8)
    nc = l // q
    x = jax.random.normal(ks[0], (b, l, h, P), jnp.bfloat16)
    bm = jax.random.normal(ks[1], (b, l, G, N), jnp.bfloat16)
    cm = jax.random.normal(ks[2], (b, l, G, N), jnp.bfloat16)
    dt = jax.nn.softplus(jax.random.normal(ks[3], (b, h, l)) - 1.0)
    s = jnp.cumsum((-0.5 * dt).reshape(b, h, nc, q), axis=-1).reshape(b, h, l)
    hprev = (0.1 * jax.random.normal(ks[4], (b, h, nc, P, N))).astype(jnp.bfloat16)
    d = jax.random.normal(ks[5], (h, P))
    args = (x, bm, cm, dt, s, hprev, d)
    mosaic = jax.jit(lambda *a: pallas_mosaic_fwd.chunk_out_mosaic(*a, q=q, hpg=h // G,
                                                                semantics=semantics))
    triton = jax.jit(lambda *a: pallas_gpu._chunk_out_call(*a, None, q=q, hpg=h // G,
                                                           num_warps=4, interpret=False))
    case = dict(case=f"stage chunk_out {name}", shape=name,
                impl=f"mosaic q{q} {semantics} vs triton q{q}", status="ok")
    case["fwd"] = time_ms(mosaic, args, runs, deadline)
    case["triton"] = time_ms(triton, args, runs, deadline)
    case["errors"] = {"y": rel(mosaic(*args), triton(*args))}
    if not case["errors"]["y"] < 1e-2:  # both bf16 outputs of the same math
        case["status"] = "FAIL"
    case["error_vs"] = "triton chunk_out"
    bytes_moved = 2 * (2 * b * l * h * P + 2 * b * l * h * N + b * h * nc * P * N) + 8 * b * h * l
    case["mosaic_GBps"] = round(bytes_moved / case["fwd"]["ms"] / 1e6, 1)
    case["triton_GBps"] = round(bytes_moved / case["triton"]["ms"] / 1e6, 1)
    rec.add(case)


def stage_state_case(rec, shape, q, runs, deadline, semantics):
    """The fused chunk-state + state-pass stage alone (`stage_statepass`) on fresh inputs."""
    name, b, l, h = shape
    ks = jax.random.split(jax.random.key(11), 5)
    nc = l // q
    x = jax.random.normal(ks[0], (b, l, h, P), jnp.bfloat16)
    bm = jax.random.normal(ks[1], (b, l, G, N), jnp.bfloat16)
    dt = jax.nn.softplus(jax.random.normal(ks[2], (b, h, l)) - 1.0)
    s = jnp.cumsum((-0.5 * dt).reshape(b, h, nc, q), axis=-1).reshape(b, h, l)
    stage_statepass(rec, name, (x, bm, dt, s, jax.random.normal(ks[4], (b, h, P, N))), q,
                    runs, deadline, semantics)


def stage_statepass(rec, name, args, q, runs, deadline, semantics):
    """Body of stage_state_case: hprev (bf16) and final states of the fused Mosaic
    kernel vs Triton chunk states + Triton state pass."""
    from dimba_jax.ssd import pallas_gpu  # pylint: disable=import-outside-toplevel
    x, bm, dt, s, h0 = args
    b, l, h, _ = x.shape
    hpg, nc = h // G, l // q

    def dec_rows(s_):
        dec = pallas_gpu._chunk_end_decay(s_, None, q)
        return jnp.broadcast_to(dec[..., None], dec.shape + (P,))

    def mosaic_fn(x_, b_, dt_, s_, h0_):
        return pallas_mosaic_fwd.chunk_statepass_mosaic(
            x_, b_, pallas_mosaic_fwd.state_weights(dt_, s_, q), dec_rows(s_), h0_, q=q, hpg=hpg,
            hprev_dtype=x_.dtype, semantics=semantics)

    def triton_fn(x_, b_, dt_, s_, h0_):
        st = pallas_gpu._chunk_state_call(x_, b_, dt_, s_, None, q=q, hpg=hpg, mode="state",
                                          num_warps=4, interpret=False)
        return pallas_gpu._state_pass_fwd_call(st, pallas_gpu._chunk_end_decay(s_, None, q), h0_,
                                               hprev_dtype=x_.dtype, interpret=False)

    mosaic, triton = jax.jit(mosaic_fn), jax.jit(triton_fn)
    w, dr = jax.block_until_ready((pallas_mosaic_fwd.state_weights(dt, s, q), dec_rows(s)))
    kernel = jax.jit(lambda x_, b_, w_, d_, h0_: pallas_mosaic_fwd.chunk_statepass_mosaic(
        x_, b_, w_, d_, h0_, q=q, hpg=hpg, hprev_dtype=x_.dtype, semantics=semantics))
    nb = pallas_mosaic_fwd.statepass_block_cols(q, P, N, 2, b * h)
    case = dict(case=f"stage chunk_state+state_pass {name}", shape=name,
                impl=f"mosaic q{q} {semantics} (dstate block {nb}) vs triton q{q}", status="ok")
    case["fwd"] = time_ms(mosaic, args, runs, deadline)
    case["kernel"] = time_ms(kernel, (x, bm, w, dr, h0), runs, deadline)
    case["triton"] = time_ms(triton, args, runs, deadline)
    (hp_m, fin_m), (hp_t, fin_t) = mosaic(*args), triton(*args)
    case["errors"] = {"states": rel(hp_m, hp_t), "final_states": rel(fin_m, fin_t)}
    if not max(case["errors"].values()) < 1e-2:
        case["status"] = "FAIL"
    case["error_vs"] = "triton chunk_state + state_pass"
    # Mosaic: read x, B, h0, w, decay rows; write hprev (bf16) and the final state.
    bytes_moved = (2 * (b * l * h * P + b * l * G * N + b * h * nc * P * N)
                   + 8 * b * h * P * N + 4 * b * h * l + 4 * b * h * nc * P)
    case["mosaic_GBps"] = round(bytes_moved / case["fwd"]["ms"] / 1e6, 1)
    case["triton_GBps"] = round(bytes_moved / case["triton"]["ms"] / 1e6, 1)
    case["bytes_note"] = "GB/s of the fused kernel's bytes (Triton also writes and reads f32 S_c)"
    rec.add(case)


BWD_NAMES = ("dx", "db", "dc", "ddt", "ds", "dd")


def bwd_stage_inputs(b, l, h, q, p=P, n=N, g=G, dtype=jnp.bfloat16, seed=11):
    """Random operands of the chunk-backward stage (never zero): x, B, C, dt, s, dy, hprev,
    dstates (float32, as the reverse state pass writes them), D."""
    ks = jax.random.split(jax.random.key(seed), 9)
    nc = l // q
    dt = jax.nn.softplus(jax.random.normal(ks[3], (b, h, l)) - 1.0)
    return (jax.random.normal(ks[0], (b, l, h, p)).astype(dtype),
            jax.random.normal(ks[1], (b, l, g, n)).astype(dtype),
            jax.random.normal(ks[2], (b, l, g, n)).astype(dtype),
            dt, jnp.cumsum((-0.5 * dt).reshape(b, h, nc, q), axis=-1).reshape(b, h, l),
            jax.random.normal(ks[4], (b, l, h, p)).astype(dtype),
            (0.1 * jax.random.normal(ks[5], (b, h, nc, p, n))).astype(dtype),
            0.1 * jax.random.normal(ks[6], (b, h, nc, p, n)),
            jax.random.normal(ks[7], (h, p)))


def stage_bwd_case(rec, shape, q, runs, deadline, semantics, interpret=False):
    """The chunk-backward stage alone: the Mosaic kernel (`pallas_mosaic_bwd`) vs pallas_gpu's
    Triton `_chunk_bwd_call` (8 warps, as `_core_bwd` runs it), same inputs.

    "fwd" times the Mosaic kernel with float32 dstates (what the reverse state pass writes
    today: converted in the kernel or, where the plan says so, in XLA), "bf16_dstates" with dstates
    already in x.dtype (the wiring plan: the state pass writes them in x.dtype), "triton" the
    Triton kernel. errors: relative L2 of each output vs Triton (< 1e-2 required).
    """
    from dimba_jax.ssd import pallas_gpu, pallas_mosaic_bwd  # pylint: disable=import-outside-toplevel
    name, b, l, h = shape
    args = bwd_stage_inputs(b, l, h, q)
    hpg = h // G
    ok, why = pallas_mosaic_bwd.supported_bwd(x=args[0], b=args[1], q=q)
    label = f"mosaic q{q} {semantics} vs triton q{q}"
    if not ok:
        rec.add(dict(case=f"stage chunk_bwd {name}", shape=name, impl=label,
                     status="unsupported", reason=why))
        return
    mosaic = jax.jit(lambda *a: pallas_mosaic_bwd.chunk_bwd_mosaic(
        *a, q=q, hpg=hpg, interpret=interpret, semantics=semantics))
    triton = jax.jit(lambda *a: pallas_gpu._chunk_bwd_call(*a, None, q=q, hpg=hpg, num_warps=8,
                                                           interpret=interpret))
    args16 = args[:7] + (args[7].astype(args[0].dtype),) + args[8:]
    convert, share, smem = pallas_mosaic_bwd.smem_plan(q, P, N, 2, True)
    case = dict(case=f"stage chunk_bwd {name}", shape=name, impl=label, status="ok",
                plan=dict(convert_dstates_in_kernel=convert, share_staging=share,
                          smem_bytes=smem, smem_bytes_bf16_dstates=pallas_mosaic_bwd.smem_plan(
                              q, P, N, 2, False)[2]))
    case["fwd"] = time_ms(mosaic, args, runs, deadline)
    case["bf16_dstates"] = time_ms(mosaic, args16, runs, deadline)
    case["triton"] = time_ms(triton, args, runs, deadline)
    outs, outs16, tri = mosaic(*args), mosaic(*args16), triton(*args)
    case["errors"] = {k: rel(o, t) for k, o, t in zip(BWD_NAMES, outs, tri)}
    case["errors_bf16_dstates"] = {k: rel(o, t) for k, o, t in zip(BWD_NAMES, outs16, tri)}
    worst = max(list(case["errors"].values()) + list(case["errors_bf16_dstates"].values()))
    if not worst < 1e-2:
        case["status"] = "FAIL"
    case["error_vs"] = "triton chunk_bwd"
    nc = l // q
    # Read x, dy, hprev (bf16), dstates (f32), B, C once per group, dt, s (+ e_end for Mosaic);
    # write dx, per-head dB, dC (bf16), ddt, ds (f32), dD partial sums.
    bytes_moved = (2 * (2 * b * l * h * P + b * h * nc * P * N + 2 * b * l * G * N)
                   + 4 * b * h * nc * P * N + 8 * b * h * l
                   + 2 * (b * l * h * P + 2 * b * l * h * N) + 8 * b * h * l + 4 * b * h * nc * P)
    case["mosaic_GBps"] = round(bytes_moved / case["fwd"]["ms"] / 1e6, 1)
    case["triton_GBps"] = round(bytes_moved / case["triton"]["ms"] / 1e6, 1)
    rec.add(case)


def record_lowering(rec, label, fn, fargs):
    """Lowers jit(fn) for cuda on this machine (no GPU needed) and records ok / the error under
    `label`; fails the case when the module has no Mosaic GPU kernel."""
    t = time.perf_counter()
    try:
        with hopper.cuda_lowering_context():
            text = jax.jit(fn).trace(*fargs).lower(lowering_platforms=("cuda",)).as_text()
        if "mosaic_gpu" not in text:
            raise AssertionError("no Mosaic GPU kernel in the lowered module")
        rec.add(dict(case=label, impl="mosaic", status="ok",
                     seconds=round(time.perf_counter() - t, 2)))
    except Exception as e:  # report, keep going
        rec.add(dict(case=label, impl="mosaic", status="error",
                     seconds=round(time.perf_counter() - t, 2),
                     error=f"{type(e).__name__}: {e}"[:300], traceback=short_tb(30)))


def chunk_bwd_lowering(rec, semantics):
    """Lower the chunk-backward stage for cuda (no device needed) at 130m-L2k, q 128 and 64,
    float32 and bf16 dstates."""
    from dimba_jax.ssd import pallas_mosaic_bwd  # pylint: disable=import-outside-toplevel
    s = jax.ShapeDtypeStruct
    name, b, l, h = SHAPES[0]
    for q in (128, 64):
        for dst_dtype in ("float32", "bfloat16"):
            nc = l // q
            bf = jnp.bfloat16
            fargs = (s((b, l, h, P), bf), s((b, l, G, N), bf), s((b, l, G, N), bf),
                     s((b, h, l), jnp.float32), s((b, h, l), jnp.float32), s((b, l, h, P), bf),
                     s((b, h, nc, P, N), bf), s((b, h, nc, P, N), jnp.dtype(dst_dtype)),
                     s((h, P), jnp.float32))
            label = f"lower {semantics} {name} chunk_bwd q{q} dstates {dst_dtype}"
            record_lowering(rec, label, lambda *a, q=q: pallas_mosaic_bwd.chunk_bwd_mosaic(
                *a, q=q, hpg=h // G, semantics=semantics), fargs)


def run_chunk_bwd(rec, a, deadline):
    """--chunk-bwd: the chunk-backward stage cases only; returns the exit status."""
    dev = jax.devices()[0]
    sems = [a.semantics] if a.semantics else ["lane", "warpgroup"]
    if dev.platform != "gpu":
        for sem in sems:
            chunk_bwd_lowering(rec, sem)
        if a.cpu_interpret:  # a self-test of the case on a tiny shape, in the interpreters
            try:
                stage_bwd_case(rec, ("tiny", 1, 128, 2), 64, 2, deadline, sems[0],
                               interpret=True)
            except Exception as e:  # report, keep going
                rec.add(dict(case="stage chunk_bwd tiny", status="error",
                             error=f"{type(e).__name__}: {e}"[:500], traceback=short_tb()))
    else:
        for sem in sems:
            for q in (128, 64):
                if time.perf_counter() > deadline:
                    rec.add(dict(case=f"stage chunk_bwd q{q} {sem}", status="skipped",
                                 reason="budget"))
                    continue
                print(f"START stage chunk_bwd q{q} {sem} at {elapsed():.1f} s", flush=True)
                try:
                    stage_bwd_case(rec, SHAPES[0], q, a.runs, deadline, sem)
                except Exception as e:  # one failure must not stop the rest
                    rec.add(dict(case=f"stage chunk_bwd q{q} {sem}", status="error",
                                 error=f"{type(e).__name__}: {e}"[:500], traceback=short_tb()))
    bad = [c["case"] for c in rec.data["cases"] if c["status"] not in ("ok", "unsupported")]
    print(f"chunk_bwd: {len(rec.data['cases']) - len(bad)} ok, {len(bad)} failed "
          f"in {elapsed():.0f} s", flush=True)
    return 1 if bad else 0


REV_SHAPES = ("130m-L2k", "1.3b-L2k", "130m-L32k")
# (label, kwargs of _dout_statepass_mosaic): default ring, the same without overlapping the
# dS / dsend stores with the wgmma, deepest ring that fits, 64-wide column blocks with four
# slots (variants resolving to the same configuration are timed once).
REV_VARIANTS = (("pf2", {}), ("pf2-serial", dict(overlap=False)),
                ("pf-max", dict(prefetch=None)), ("nb64-pf4", dict(block_cols=64, prefetch=4)))


def rev_stage_inputs(b, l, h, q, seed=13):
    """dy, C, dt, s, hprev (bf16), dfin (float32) for the reverse stage (never zero)."""
    ks = jax.random.split(jax.random.key(seed), 6)
    dt = jax.nn.softplus(jax.random.normal(ks[2], (b, h, l)) - 1.0)
    return (jax.random.normal(ks[0], (b, l, h, P)).astype(jnp.bfloat16),
            jax.random.normal(ks[1], (b, l, G, N)).astype(jnp.bfloat16), dt,
            jnp.cumsum((-0.5 * dt).reshape(b, h, l // q, q), axis=-1).reshape(b, h, l),
            (0.1 * jax.random.normal(ks[3], (b, h, l // q, P, N))).astype(jnp.bfloat16),
            jax.random.normal(ks[4], (b, h, P, N)))


def rev_stage_case(rec, shape, q, runs, deadline, semantics, interpret=False):
    """The fused dout chunk-state + reverse state-pass kernel (`pallas_mosaic_rev`) vs the
    Triton pair (`_chunk_state_call(mode="dout")` + `_state_pass_bwd_call`, as core_backward
    runs them), same inputs; each REV_VARIANTS entry timed, errors vs Triton (< 1e-2)."""
    from dimba_jax.ssd import pallas_gpu, pallas_mosaic_rev  # pylint: disable=import-outside-toplevel
    name, b, l, h = shape
    args = rev_stage_inputs(b, l, h, q)
    hpg, nc = h // G, l // q

    def triton_fn(dy, c, dt, s, hp, dfin):
        dhp = pallas_gpu._chunk_state_call(dy, c, dt, s, None, q=q, hpg=hpg, mode="dout",
                                           num_warps=8, interpret=interpret)
        dst, dsend, dh0 = pallas_gpu._state_pass_bwd_call(
            dhp, hp, pallas_gpu._chunk_end_decay(s, None, q), dfin, interpret=interpret)
        return dst, dsend.sum(axis=2), dh0

    triton = jax.jit(triton_fn)
    t_tri, tri, seen = None, None, set()
    for label, kw in REV_VARIANTS:
        pf = kw.get("prefetch", pallas_mosaic_rev.DEFAULT_PREFETCH)
        nb = kw.get("block_cols") or pallas_mosaic_rev.rev_block_cols(q, P, N, 2, b * h, pf or 2)
        if pf is None:
            pf = pallas_mosaic_rev.deepest_prefetch(q, P, nb)
        overlap = kw.get("overlap", True)
        if (nb, pf, overlap) in seen:
            continue
        seen.add((nb, pf, overlap))
        case = dict(case=f"stage rev {name} q{q} {label}", shape=name, status="ok",
                    impl=(f"mosaic rev {semantics} nb {nb} prefetch {pf} overlap {overlap} "
                          f"vs triton pair"),
                    smem_bytes=pallas_mosaic_rev.smem_bytes(q, P, nb, 2, pf))
        if time.perf_counter() > deadline:
            rec.add(dict(case=case["case"], status="skipped", reason="budget"))
            continue
        print(f"START {case['case']} at {elapsed():.1f} s", flush=True)
        try:
            fused = jax.jit(lambda dy, c, dt, s, hp, dfin, nb=nb, pf=pf, ov=overlap: (
                lambda o: (o[0], o[1].sum(axis=2), o[2]))(
                    pallas_mosaic_rev._dout_statepass_mosaic(
                        dy, c, jnp.exp(s), pallas_gpu._chunk_end_decay(s, None, q), hp, dfin,
                        q=q, hpg=hpg, block_cols=nb, prefetch=pf, overlap=ov,
                        interpret=interpret, semantics=semantics)))
            case["fwd"] = time_ms(fused, args, runs, deadline)
            if tri is None:
                t_tri, tri = time_ms(triton, args, runs, deadline), triton(*args)
            case["triton"] = t_tri
            case["errors"] = {k: rel(o, t) for k, o, t in
                              zip(("dstates", "dsend", "dh0"), fused(*args), tri)}
            if not max(case["errors"].values()) < 1e-2:
                case["status"] = "FAIL"
            # Fused: read dy, C (once per head and column block), hprev (bf16), w, dfin; write
            # dS (bf16), dsend rows, dh0. Triton also writes + reads dhprev and writes dS in f32.
            fused_bytes = (2 * (b * l * h * P + b * l * h * N + 2 * b * h * nc * P * N)
                           + 8 * b * h * P * N)
            tri_bytes = fused_bytes + (4 + 4 + 4 - 2) * b * h * nc * P * N
            case["mosaic_GBps"] = round(fused_bytes / case["fwd"]["ms"] / 1e6, 1)
            case["triton_GBps"] = round(tri_bytes / t_tri["ms"] / 1e6, 1)
            rec.add(case)
        except Exception as e:  # one failure must not stop the rest
            rec.add(dict(case=case["case"], status="error",
                         error=f"{type(e).__name__}: {e}"[:500], traceback=short_tb()))


def run_rev(rec, a, deadline):
    """--rev: the fused reverse-stage cases only (REV_SHAPES, q 128); without a GPU, or with
    --lower-only, lowering for cuda (+ --cpu-interpret: a tiny case in the interpreters)."""
    from dimba_jax.ssd import pallas_mosaic_rev  # pylint: disable=import-outside-toplevel
    sems = [a.semantics] if a.semantics else ["lane", "warpgroup"]
    shapes = [s for s in SHAPES if s[0] in REV_SHAPES]
    q = 128
    if jax.devices()[0].platform != "gpu" or a.lower_only:
        sds, f32, bf = jax.ShapeDtypeStruct, jnp.float32, jnp.bfloat16
        for sem in sems:
            for name, b, l, h in shapes:
                for label, kw in REV_VARIANTS:
                    nc = l // q
                    fargs = (sds((b, l, h, P), bf), sds((b, l, G, N), bf), sds((b, h, l), f32),
                             sds((b, h, nc), f32), sds((b, h, nc, P, N), bf),
                             sds((b, h, P, N), f32))
                    record_lowering(rec, f"lower {sem} {name} rev q{q} {label}",
                                    lambda *x, h=h, kw=kw, sem=sem: (
                                        pallas_mosaic_rev._dout_statepass_mosaic(
                                            *x, q=q, hpg=h // G, semantics=sem, **kw)), fargs)
        if a.cpu_interpret and not a.lower_only:
            rev_stage_case(rec, ("tiny", 1, 256, 2), 64, 2, deadline, sems[0], interpret=True)
    else:
        for sem in sems:
            for shape in shapes:
                rev_stage_case(rec, shape, q, a.runs, deadline, sem)
    bad = [c["case"] for c in rec.data["cases"] if c["status"] not in ("ok", "skipped")]
    print(f"rev: {len(rec.data['cases']) - len(bad)} ok/skipped, {len(bad)} failed "
          f"in {elapsed():.0f} s", flush=True)
    return 1 if bad else 0


LOWER_CONFIGS = [("bfloat16", 128), ("bfloat16", 64), ("float32", 64)]  # (dtype, block_len)


def lowering_check(rec, shapes, semantics="lane"):
    """Lower for cuda (no device needed) at `shapes`: the chunk-output and fused chunk-state +
    state-pass kernels alone, and the forward and forward+backward, for every (dtype,
    block_len) of LOWER_CONFIGS.

    This runs all of Mosaic GPU's Python-side lowering (for Warpgroup semantics: its layout
    inference), i.e. everything that failed on the GPU with "Layout inference failed", but not
    the device compile (PTX / ptxas), which needs the GPU.
    """
    s = jax.ShapeDtypeStruct
    for name, b, l, h in shapes:
        for dtype, q in LOWER_CONFIGS:
            dt = jnp.dtype(dtype)
            lp = -(-l // q) * q
            x_stage = s((b, h, P, lp) if dt == jnp.float32 else (b, lp, h, P), dt)
            stage_args = (x_stage, s((b, lp, G, N), dt), s((b, lp, G, N), dt),
                          s((b, h, lp), jnp.float32), s((b, h, lp), jnp.float32),
                          s((b, h, lp // q, P, N), dt), s((h, P), jnp.float32))
            state_args = (x_stage, s((b, G, N, lp) if dt == jnp.float32 else (b, lp, G, N), dt),
                          s((b, h, lp), jnp.float32))
            statepass_args = state_args + (s((b, h, lp // q, P), jnp.float32),
                                           s((b, h, P, N), jnp.float32))
            args = (s((b, l, h, P), dt), s((b, l, h), jnp.float32), s((h,), jnp.float32),
                    s((b, l, G, N), dt), s((b, l, G, N), dt), s((h,), jnp.float32))

            def stage(*a, q=q, h=h):
                return pallas_mosaic_fwd.chunk_out_mosaic(*a, q=q, hpg=h // G, semantics=semantics)

            def statepass_stage(*a, q=q, h=h, dt=dt):
                return pallas_mosaic_fwd.chunk_statepass_mosaic(*a, q=q, hpg=h // G, hprev_dtype=dt,
                                                             semantics=semantics)

            def fwd(x, dt_, A, B, C, D, q=q):
                return pallas_mosaic.ssd_mosaic_forward(
                    x, dt_, A, B, C, CHUNK, D=D, dt_softplus=True, semantics=semantics,
                    kernels=KernelConfig(block_len=q, backward="triton"))

            def fwdbwd_(x, dt_, A, B, C, D, fwd=fwd):
                y, vjp = jax.vjp(fwd, x, dt_, A, B, C, D)
                return y, vjp(y)

            todo = [("stage out", stage, stage_args),
                    ("stage statepass", statepass_stage, statepass_args),
                    ("fwd", fwd, args), ("fwd+bwd", fwdbwd_, args)]
            for tag, fn, fargs in todo:
                label = f"lower {semantics} {name} {dtype} q{q} {tag}"
                record_lowering(rec, label, fn, fargs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "mosaic_probe_out"))
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-bwd", action="store_true", help="skip forward+backward timings")
    ap.add_argument("--cpu-interpret", action="store_true",
                    help="without a GPU: exercise this script on tiny cases in the interpreter")
    ap.add_argument("--chunk-bwd", action="store_true",
                    help="only the Mosaic chunk-backward stage vs Triton (130m-L2k, bf16, "
                         "q 128 and 64); without a GPU: lowering (+ --cpu-interpret self-test)")
    ap.add_argument("--rev", action="store_true",
                    help="only the fused Mosaic dout chunk-state + reverse state-pass kernel "
                         "vs the Triton pair (130m-L2k, 1.3b-L2k, 130m-L32k, q 128); without a "
                         "GPU or with --lower-only: lowering (+ --cpu-interpret self-test)")
    ap.add_argument("--lower-only", action="store_true",
                    help="only lower for cuda (any machine): all four shapes, bf16 q128/q64 and "
                         "f32 q64; stage, fwd, fwd+bwd; exit 1 if any fails")
    ap.add_argument("--semantics", default=None, choices=("lane", "warpgroup"),
                    help="Mosaic lowering semantics for the full-SSD cases (default: on a GPU, "
                         "the first whose stage check passes; else DEFAULT_SEMANTICS); "
                         "--lower-only checks both unless this is given")
    a = ap.parse_args()
    global INTERPRET, SEMANTICS
    deadline = T0 + a.budget_s
    rec = Recorder(a.out, " ".join(["python3 -m benchmarks.mosaic_probe"] + sys.argv[1:]))
    dev = jax.devices()[0]
    print(f"device: {rec.data['device']} platform {dev.platform} cc "
          f"{getattr(dev, 'compute_capability', '')} jax {jax.__version__}", flush=True)
    # --quick: the bf16 and the f32 check and the first timing shape only.
    small = [SMALL[0], SMALL[3]] if a.quick else SMALL
    shapes = SHAPES[:1] if a.quick else SHAPES
    # (impl, block_len): the Mosaic forward at both block lengths, xla, impl="pallas".
    impls = [("mosaic", 128), ("mosaic", 64), ("xla", None), ("pallas", None)]
    both = ("lane", "warpgroup")
    if a.chunk_bwd:
        return run_chunk_bwd(rec, a, deadline)
    if a.rev:
        return run_rev(rec, a, deadline)
    if a.lower_only:
        for sem in ([a.semantics] if a.semantics else both):
            lowering_check(rec, SHAPES, semantics=sem)
        bad = [c["case"] for c in rec.data["cases"] if c["status"] != "ok"]
        print(f"lowering: {len(rec.data['cases']) - len(bad)} ok, {len(bad)} failed "
              f"in {elapsed():.0f} s", flush=True)
        return 1 if bad else 0
    if dev.platform != "gpu":
        print("no GPU: checking that the Mosaic GPU kernel lowers for cuda", flush=True)
        for sem in both:
            lowering_check(rec, [("tiny", 1, 200, 2)], semantics=sem)
        if not a.cpu_interpret:
            return 0
        INTERPRET = True  # tiny cases, interpreter: checks this script, not the GPU kernel
        small = [(1, 150, 2, 64, 1, 64, "bfloat16", 64, "D+bias+h0"),
                 (1, 70, 2, 64, 1, 64, "float32", 64, "D"),
                 (1, 70, 2, 64, 1, 128, "float32", 128, "D")]
        shapes = [("tiny", 1, 128, 2)]
        impls = [("mosaic", 64), ("xla", None)]
        a.runs = 3
    else:
        ok, why = pallas_mosaic.supported(x=jnp.zeros((1, 1, 1, P), jnp.bfloat16),
                                          B=jnp.zeros((1, 1, 1, N), jnp.bfloat16))
        print("mosaic supported on this device:", ok, why, flush=True)

    rng = np.random.default_rng()

    def run(label, fn, *args, **kw):
        if time.perf_counter() > deadline:
            rec.add(dict(case=label, status="skipped", reason="budget"))
            return None
        print(f"START {label} at {elapsed():.1f} s", flush=True)  # names the case if one hangs
        try:
            return fn(*args, **kw)
        except Exception as e:  # one failure must not stop the rest
            rec.add(dict(case=label, status="error", error=f"{type(e).__name__}: {e}"[:500],
                         traceback=short_tb()))
            return None

    # 1. The output stage alone (the Mosaic kernel) at the first shape, q128, in both lowering
    #    semantics: it compiles in seconds and says which semantics works on this GPU.
    if not INTERPRET:
        for sem in ((a.semantics,) if a.semantics else both):
            n_before = len(rec.data["cases"])
            run(f"stage {shapes[0][0]} q128 {sem}", stage_case, rec, shapes[0], 128, a.runs,
                deadline, sem)
            new = rec.data["cases"][n_before:]
            if new and new[-1]["status"] == "ok" and not a.semantics:
                SEMANTICS = sem  # the first semantics whose stage check passed
                break
    SEMANTICS = a.semantics or SEMANTICS
    print(f"full-SSD cases use {SEMANTICS} semantics", flush=True)
    # 1b. The fused chunk-state + state-pass kernel alone, same shape, q128.
    if not INTERPRET:
        run(f"stage chunk_state+state_pass {shapes[0][0]} q128 {SEMANTICS}", stage_state_case,
            rec, shapes[0], 128, a.runs, deadline, SEMANTICS)
    # 2. Correctness (bf16 q128, then f32 q64), the first timing shape, then everything else.
    first = [s for s in small if s[6] == "bfloat16"][:1] + [s for s in small if s[6] == "float32"][:1]
    checks = [("check", s) for s in first]
    plan = (checks + [("time", shapes[0])]
            + [("check", s) for s in small if s not in first] + [("time", s) for s in shapes[1:]])
    for kind, spec in plan:
        if kind == "check":
            run(f"check {spec}", correctness_case, rec, spec, int(rng.integers(1 << 30)))
            continue
        if not INTERPRET:  # the kernels alone, Mosaic vs Triton
            for q in (128, 64):
                if spec is shapes[0] and q == 128:
                    continue  # done in step 1
                run(f"stage {spec[0]} q{q}", stage_case, rec, spec, q, a.runs, deadline,
                    SEMANTICS)
                run(f"stage chunk_state+state_pass {spec[0]} q{q}", stage_state_case, rec, spec,
                    q, a.runs, deadline, SEMANTICS)
        y_xla = None
        ordered = [i for i in impls if i[0] == "xla"] + [i for i in impls if i[0] != "xla"]
        for impl, q in ordered:  # xla first: its y is the yardstick for the others
            y = run(f"time {spec[0]} {impl} {q or ''}".rstrip(), timing_case, rec, spec,
                    impl, q, a.runs, deadline, not a.no_bwd, y_xla)
            if impl == "xla":
                y_xla = y
    print(f"done in {elapsed():.0f} s; wrote {os.path.join(a.out, 'mosaic_probe.json')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
