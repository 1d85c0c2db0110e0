"""Times every available SSD implementation, forward and forward+backward, and checks the
chunked XLA scan against the sequential reference on the current device.

Usage (repository root):
    python3 -m benchmarks.ssd_bench --out benchmarks/results           # accelerator
    python3 -m benchmarks.ssd_bench --quick --out /tmp/ssd_bench       # tiny, CPU

Shapes (docs/ssd_reference.md): bf16, chunk 256, dstate N = 128, headdim P = 64, 1 group,
(name, batch B, seqlen L, nheads H) = 130m-L2k (8, 2048, 24), 130m-L8k (2, 8192, 24),
1.3b-L2k (8, 2048, 64), 130m-L32k (1, 32768, 24). Inputs: x, B, C ~ N(0, 1); dt = softplus of
N(0,1) - 4 (passed as dt with dt_softplus=False, as in the minimal listing); A = -U(1, 16); no D,
no z. `--quick` uses tiny shapes instead.

Timing: jit-compiled functions, `--warmup` untimed calls, then `--iters` (>= 50) calls, each
followed by `jax.block_until_ready`; the median wall time is reported. forward = y = ssd(...);
forward+backward = the gradient of sum(y) (float32) w.r.t. x, dt, A, B, C.

FLOP count (matmul FLOPs of the chunked algorithm as executed, full Q x Q blocks, 2 per
multiply-add), with Q = min(chunk, L), G groups:
    fwd = 2*B*L*Q*G*N      (C B^T per chunk and group)
        + 2*B*L*Q*H*P      ((C B^T o decay) x per chunk and head)
        + 2*B*L*H*P*N      (chunk states)
        + 2*B*L*H*P*N      (state -> output)
    fwd+bwd = 3 * fwd      (the backward of each matmul is two matmuls of the same size)
TFLOP/s = FLOPs / median time. The same formula is used for every impl, so the column compares
times, not the work each impl really does.

"reference" (the sequential lax.scan over time) is timed only with --quick: at the benchmark
shapes it takes seqlen sequential steps and is far too slow to be interesting; it is still the
oracle for `--check`.

Outputs: a Markdown table on stdout, and under --out: ssd_<tag>.json
{"device", "command", "jax", "rows": [{"shape", "B", "L", "H", "P", "N", "chunk", "impl",
"fwd_ms", "fwdbwd_ms", "fwd_tflops", "fwdbwd_tflops"}], "check": ..., "breakdown": ...} and
ssd_<tag>.md. The JSON is rewritten after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import device_tag
from dimba_jax.ssd import _common, resolve_impl, ssd
from dimba_jax.ssd import chunked as chunked_module

SHAPES = [  # name, batch, seqlen, nheads
    ("130m-L2k", 8, 2048, 24),
    ("130m-L8k", 2, 8192, 24),
    ("1.3b-L2k", 8, 2048, 64),
    ("130m-L32k", 1, 32768, 24),
]
QUICK_SHAPES = [("tiny-L256", 2, 256, 4), ("tiny-L1000", 1, 1000, 4)]
P, N, GROUPS, CHUNK = 64, 128, 1, 256
QUICK_P, QUICK_N, QUICK_CHUNK = 16, 32, 64

def flops_fwd(b, l, h, p, n, chunk, g=GROUPS):
    """Forward matmul FLOPs of the chunked SSD (see the module docstring)."""
    q = min(chunk, l)
    return 2 * b * l * q * g * n + 2 * b * l * q * h * p + 4 * b * l * h * p * n


def make_inputs(b, l, h, p, n, g=GROUPS, dtype=jnp.bfloat16, seed=0):
    """Random benchmark inputs (x, dt, A, B, C); dt is already positive."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(keys[0], (b, l, h, p), jnp.float32).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(keys[1], (b, l, h), jnp.float32) - 4.0).astype(dtype)
    A = -jax.random.uniform(keys[2], (h,), jnp.float32, 1.0, 16.0)
    B = jax.random.normal(keys[3], (b, l, g, n), jnp.float32).astype(dtype)
    C = jax.random.normal(keys[4], (b, l, g, n), jnp.float32).astype(dtype)
    return x, dt, A, B, C


# ------------------------------------------------------------------ impls under test
def _xla_variant(remat_intra):
    """The xla path with a non-default private option of `chunked_scan` (for --variants)."""
    def run(x, dt, A, B, C, chunk):
        dt_eff = _common.process_dt(dt)
        y, _ = chunked_module.chunked_scan(x, dt_eff, A, B, C, chunk, remat_intra=remat_intra)
        return _common.apply_skip_and_gate(y, x)
    return run


def impl_fn(impl):
    """(x, dt, A, B, C, chunk) -> y for an impl name (public impls, or 'xla:...' variants)."""
    if impl == "xla:no-remat":
        return _xla_variant(remat_intra=False)
    return lambda x, dt, A, B, C, chunk: ssd(x, dt, A, B, C, chunk, impl=impl)


def available_impls(quick):
    """Impls that run here: xla always; pallas only where the kernel itself would be used."""
    impls = ["xla"]
    probe = make_inputs(1, 16, 2, P, N)
    chosen, reason = resolve_impl("pallas", x=probe[0], dt=probe[1], A=probe[2], B=probe[3],
                                  C=probe[4], chunk_size=CHUNK)
    if chosen == "pallas":
        impls.append("pallas")
    else:
        print(f"# pallas not timed: {reason}", file=sys.stderr)
    if quick:
        impls.append("reference")
    return impls


def time_fn(fn, args, warmup, iters):
    """Median wall milliseconds of fn(*args) over iters calls (each block_until_ready)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_row(name, b, l, h, p, n, chunk, impl, warmup, iters):
    """One JSON row: forward and forward+backward median times for one (shape, impl)."""
    inputs = make_inputs(b, l, h, p, n)
    run = impl_fn(impl)
    fwd = jax.jit(lambda x, dt, A, B, C: run(x, dt, A, B, C, chunk))

    def loss(x, dt, A, B, C):
        return jnp.sum(run(x, dt, A, B, C, chunk).astype(jnp.float32))

    fwdbwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    fwd_ms = time_fn(fwd, inputs, warmup, iters)
    fwdbwd_ms = time_fn(fwdbwd, inputs, warmup, iters)
    f = flops_fwd(b, l, h, p, n, chunk)
    return dict(shape=name, B=b, L=l, H=h, P=p, N=n, chunk=chunk, impl=impl,
                fwd_ms=round(fwd_ms, 4), fwdbwd_ms=round(fwdbwd_ms, 4),
                fwd_tflops=round(f / fwd_ms / 1e9, 2), fwdbwd_tflops=round(3 * f / fwdbwd_ms / 1e9, 2))


# ------------------------------------------------------------------ numerical check
def check_against_reference(quick):
    """xla vs reference at one moderate shape with every option on; float32 and bf16.

    Returns a dict of max relative errors (max |a - b| / max |b|) for y, final states and the
    gradients of a random projection of (y, final_states) w.r.t. every input.
    """
    b, l, h, p, n, g, chunk = (2, 200, 4, 16, 32, 2, 64) if quick else (2, 1000, 8, 64, 128, 2, 256)
    rng = np.random.default_rng(7)
    f32 = jnp.float32
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), f32)  # noqa: E731
    x, z = normal(b, l, h, p), normal(b, l, h, p)
    dt, Bm, Cm = normal(b, l, h) - 2.0, normal(b, l, g, n), normal(b, l, g, n)
    A = -jnp.asarray(rng.uniform(1.0, 16.0, h), f32)
    D, dt_bias, h0 = normal(h, p), 0.5 * normal(h), normal(b, h, p, n)
    seq_idx = jnp.asarray(np.repeat(np.array([[0, 1, 2], [0, 0, 5]]), [l // 3, l // 3, l - 2 * (l // 3)], axis=1),
                          jnp.int32)
    y_w, f_w = normal(b, l, h, p), normal(b, h, p, n)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]

    def loss(impl, dtype, *args):
        xx, dd, AA, BB, CC, DD, zz, bb, hh = args
        y, fin = ssd(xx.astype(dtype), dd.astype(dtype), AA, BB.astype(dtype), CC.astype(dtype), chunk,
                     D=DD, z=zz.astype(dtype), dt_bias=bb, dt_softplus=True, initial_states=hh,
                     seq_idx=seq_idx, return_final_states=True, impl=impl)
        return jnp.sum(y.astype(f32) * y_w) + jnp.sum(fin * f_w), (y, fin)

    def rel(a, r):
        a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
        return float(np.max(np.abs(a - r)) / max(np.max(np.abs(r)), 1e-30))

    args = (x, dt, A, Bm, Cm, D, z, dt_bias, h0)
    out = {"shape": dict(B=b, L=l, H=h, P=p, N=n, G=g, chunk=chunk),
           "options": "seq_idx (3 segments), initial_states, D per channel, z, dt_bias, softplus"}
    with jax.default_matmul_precision("highest"):
        grad = lambda impl, dtype: jax.jit(jax.value_and_grad(  # noqa: E731
            functools.partial(loss, impl, dtype), argnums=tuple(range(9)), has_aux=True))(*args)
        (_, (y_r, f_r)), g_r = grad("reference", f32)
        (_, (y_x, f_x)), g_x = grad("xla", f32)
        (_, (y_b, f_b)), g_b = grad("xla", jnp.bfloat16)
    out["float32"] = {"y": rel(y_x, y_r), "final_states": rel(f_x, f_r),
                      **{f"grad_{k}": rel(a, r) for k, a, r in zip(names, g_x, g_r)}}
    out["bfloat16"] = {"y": rel(y_b, y_r), "final_states": rel(f_b, f_r),
                       **{f"grad_{k}": rel(a, r) for k, a, r in zip(names, g_b, g_r)},
                       "grads_finite": bool(all(np.all(np.isfinite(np.asarray(v, np.float32))) for v in g_b))}
    return out


# ------------------------------------------------------------------ stage breakdown (xla)
def stage_breakdown(b, l, h, p, n, chunk, warmup, iters):
    """Forward time of each stage of the chunked scan in isolation (ms), bf16."""
    x, dt, A, B, C = make_inputs(b, l, h, p, n)
    c, q, g, r = l // chunk, chunk, GROUPS, h // GROUPS
    xc = x.reshape(b, c, q, g, r, p)
    Bc, Cc = B.reshape(b, c, q, g, n), C.reshape(b, c, q, g, n)
    dtc = dt.astype(jnp.float32).reshape(b, c, q, g, r)
    Acs = jnp.cumsum(dtc * A.reshape(g, r), axis=2)
    mask = jnp.tril(jnp.ones((q, q), bool))
    states = jax.random.normal(jax.random.PRNGKey(1), (b, c, g, r, p, n), jnp.float32)
    decay = jnp.exp(Acs[:, :, -1])
    stages = {
        "intra (CB, decay, (CB o decay) x)": (
            lambda Cc, Bc, xc, Acs, dtc: chunked_module._intra_chunk(
                Cc, Bc, xc, jnp.moveaxis(Acs, 2, -1), jnp.moveaxis(dtc, 2, -1), mask),
            (Cc, Bc, xc, Acs, dtc)),
        "chunk states": (
            lambda xc, Bc, Acs, dtc: chunked_module._matmul(
                "bckgrp,bckgn->bcgrpn",
                (xc * (jnp.exp(Acs[:, :, -1:] - Acs) * dtc)[..., None]).astype(xc.dtype), Bc),
            (xc, Bc, Acs, dtc)),
        "state passing (associative_scan)": (
            lambda a, s: jax.lax.associative_scan(chunked_module._combine_chunks, (a, s), axis=1)[1],
            (decay, states)),
        "state -> output": (
            lambda Cc, s, Acs: chunked_module._matmul("bcqgn,bcgrpn->bcqgrp", Cc, s.astype(Cc.dtype))
            * jnp.exp(Acs)[..., None],
            (Cc, states, Acs)),
    }
    times = {k: round(time_fn(jax.jit(f), a, warmup, iters), 4) for k, (f, a) in stages.items()}
    intra, intra_args = stages["intra (CB, decay, (CB o decay) x)"]
    intra_grad = jax.jit(jax.grad(lambda *a: jnp.sum(intra(*a)), argnums=(0, 1, 2, 3, 4)))
    times["intra fwd+bwd (grad of sum)"] = round(time_fn(intra_grad, intra_args, warmup, iters), 4)
    return times


# ------------------------------------------------------------------ reporting
def markdown(result):
    lines = [f"SSD benchmark on {result['device']} (jax {result['jax']})", "",
             f"Command: `{result['command']}`", "",
             "| shape | B | L | H | impl | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['shape']} | {row['B']} | {row['L']} | {row['H']} | {row['impl']} | "
                     f"{row['fwd_ms']:.3f} | {row['fwdbwd_ms']:.3f} | {row['fwd_tflops']} | "
                     f"{row['fwdbwd_tflops']} |")
    if result.get("check"):
        lines += ["", "Numerical check, xla vs sequential reference (max |err| / max |ref|):", "",
                  "```", json.dumps(result["check"], indent=1), "```"]
    if result.get("breakdown"):
        lines += ["", "xla forward stages in isolation (ms), shape " + result["breakdown_shape"] + ":", ""]
        lines += [f"- {k}: {v}" for k, v in result["breakdown"].items()]
    if result.get("errors"):
        lines += ["", "Errors:", ""] + [f"- {e}" for e in result["errors"]]
    lines += ["", "FLOPs: fwd = 2BLQGN + 2BLQHP + 4BLHPN (chunked matmuls as executed, Q = chunk), "
              "fwd+bwd = 3 fwd. Ratios to mamba_ssm: benchmarks/vs_mamba_ssm.py "
              "(both timed in one call)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON and .md")
    parser.add_argument("--tag", default=None,
                        help="file stem suffix: ssd_<tag>.json (default: xla_ + "
                             "benchmarks.device_tag of the device, e.g. xla_h100)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--impls", default=None, help="comma list (default: every available impl)")
    parser.add_argument("--shapes", default=None, help="comma list of shape names (default: all)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--check", action="store_true", help="also check xla vs reference here")
    parser.add_argument("--breakdown", action="store_true", help="also time xla stages at the first shape")
    parser.add_argument("--variants", action="store_true", help="also time private xla variants")
    args = parser.parse_args(argv)
    if args.iters < 50 and not args.quick:
        parser.error("--iters must be >= 50 (median of at least 50 timed runs)")

    device = jax.devices()[0]
    device_name = f"{device.platform}: {getattr(device, 'device_kind', device)}"
    tag = args.tag or ("quick_" if args.quick else "") + "xla_" + device_tag(
        getattr(device, "device_kind", "") or device.platform)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"ssd_{tag}.json")
    md_path = os.path.join(args.out, f"ssd_{tag}.md")
    result = {"device": device_name, "command": " ".join(["python3 -m benchmarks.ssd_bench"] + sys.argv[1:]),
              "jax": jax.__version__, "python": platform.python_version(), "rows": [], "errors": []}

    def save():
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        with open(md_path, "w") as f:
            f.write(markdown(result))

    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        wanted = args.shapes.split(",")
        shapes = [s for s in shapes if s[0] in wanted]
    p, n, chunk = (QUICK_P, QUICK_N, QUICK_CHUNK) if args.quick else (P, N, CHUNK)
    impls = args.impls.split(",") if args.impls else available_impls(args.quick)
    if args.variants:
        impls = impls + ["xla:no-remat"]
    iters = args.iters if not args.quick else min(args.iters, 10)

    if args.check:
        t0 = time.perf_counter()
        try:
            result["check"] = check_against_reference(args.quick)
        except Exception as e:  # report, keep benchmarking
            result["errors"].append(f"check: {type(e).__name__}: {e}")
        print(f"# check took {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        save()
    for name, b, l, h in shapes:
        for impl in impls:
            t0 = time.perf_counter()
            try:
                row = bench_row(name, b, l, h, p, n, chunk, impl, args.warmup, iters)
            except Exception as e:  # one impl failing must not lose the others
                result["errors"].append(f"{name} {impl}: {type(e).__name__}: {e}")
                print(f"# {name} {impl} failed: {e}", file=sys.stderr)
                save()
                continue
            result["rows"].append(row)
            print(f"# {name} {impl}: fwd {row['fwd_ms']:.3f} ms, fwd+bwd {row['fwdbwd_ms']:.3f} ms "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
            save()
    if args.breakdown and shapes:
        name, b, l, h = shapes[0]
        result["breakdown_shape"] = name
        try:
            result["breakdown"] = stage_breakdown(b, l, h, p, n, chunk, args.warmup, iters)
        except Exception as e:
            result["errors"].append(f"breakdown: {type(e).__name__}: {e}")
        save()
    if not result["errors"]:
        del result["errors"]
    save()
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
