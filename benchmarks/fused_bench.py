"""Row blocks and warps of the mixer's fused kernels, beside the XLA path they replace.

    python -m benchmarks.fused_bench --config configs/base.py --batch 16 --batch1 \
        --out $OUT/fused_bench_h100

Times, at one mixer's shapes from `--config` (d_inner = expand * d_model, headdim, d_state,
ngroups, d_conv, data.seq_len; activations in bf16, weights in float32), with
model.bidirectional (DIMBA):
  conv: `fused_conv.bidirectional_conv_pallas` (both convs + SiLU + flip + split + concatenation)
  norm: `fused_norm.bidirectional_gated_norm_pallas` (both gated RMS norms + flip + mean)
or without it (the causal mixer, e.g. configs/ar_base.py): `fused_conv.causal_conv_pallas` and
`fused_norm.gated_norm_pallas` (one direction); and their jnp references (jitted), forward
alone ("fwd") and forward + VJP ("fwdbwd").
The forward kernel is swept over `--rows` x `--warps` (time rows per program, warps per
program), then at the best of those over `--stages` x `--cols` (Triton pipeline stages of the
loops over column tiles; columns per tile, 0 = the natural headdim / d_state), and for the conv
programs of 2, 4, 8 times the best rows walked in steps of those rows (`step_rows`); then the
backward kernels likewise with the forward at `PLAIN`'s tiles (for the conv also `--bwd-sums`:
programs of ROWS rows in steps of STEP whose weight sums are elementwise over the steps,
`sums_bwd="tile"`, with the column tiles split to MIN_PROGRAMS_BWD programs); then the best
forward with the best backward ("tuned"), whose values and gradients are checked
against the reference (largest relative error over all outputs and gradients). Each sweep row
sets the tiles it names and `PLAIN`'s for the rest; the rows "pallas (defaults)" time the
public functions at their own default tiles (what the model runs). `--batch1`
adds the forward sweep at batch 1 (the sampler's denoiser); those rows time one jitted call
each, which at batch 1 is mostly dispatch (tens of us for a few us of kernel), so
`--batch1-loop N` also times the batch-1 forward as N calls inside one jitted loop (as the
sampler's scan runs them; pass "fwd (loop)", ms per call) for the XLA reference, the defaults and
--rows x --warps x --programs (`min_programs`, the forward's grid target). For the conv, the
rows "pallas (mosaic fwd)" time the defaults with the Mosaic GPU forward
(`forward_kernel="mosaic"`, layers/mosaic_conv.py) and "pallas (mosaic fwd+bwd)" also its
backward's first kernel (`backward_kernel="mosaic"`) beside the "pallas (defaults)" rows, where
those kernels take the sizes (`mosaic_takes`). `--norm-passes` times the norm kernels reading
each group's column tiles once (`passes` 1) beside twice (`norm_passes_rows`). Off GPU the kernels
run in the Pallas interpreter (for tests only; the times mean nothing there).

Output: PREFIX.json ({"device", "jax", "command", "dims", "rows": [...]}, one row per timing:
kernel, pass, impl, batch, block_rows, num_warps, num_stages, block_cols, step_rows and their _bwd twins where set, ms, or error) and PREFIX.md (the rows as a table, the failed
configurations after it). Written after every row.
`--budget-s` stops starting new sweeps once it is spent (what is done is kept).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.ssd_pallas_bench import fwd_fn as fwd, fwdbwd_fn as fwdbwd, rel, time_ms
from dimba_jax.config import load_config_file
from dimba_jax.layers import fused_conv, fused_norm, mosaic_conv
from dimba_jax.layers.triton_common import default_interpret

# The sweep's baseline: every tile argument a sweep row does not set (16 rows x 4 warps, one
# pipeline stage, the natural column width, all rows in one step, no grid target), whatever the
# defaults are.
PLAIN = dict(block_rows=16, num_warps=4, num_stages=1, block_cols=0, step_rows=0,
             num_stages_bwd=1, block_cols_bwd=0, step_rows_bwd=0, min_programs=1,
             min_programs_bwd=1, sums_bwd="step", passes=2, passes_bwd=2)
TILE_ARGS = ("block_rows", "num_warps", "num_stages", "block_cols", "step_rows", "min_programs",
             "passes")


def tile_defaults(fn) -> dict:
    """The default tiles of a fused kernel's public function `fn`, every backward one that
    defaults to None (= the forward's) resolved to the forward's value."""
    params = inspect.signature(fn).parameters
    out = {k: params[k].default for k in TILE_ARGS if k in params}
    for k in TILE_ARGS:
        if k + "_bwd" in params:
            v = params[k + "_bwd"].default
            out[k + "_bwd"] = out[k] if v is None else v
    if "sums_bwd" in params:
        out["sums_bwd"] = params["sums_bwd"].default
    return out


def mixer_dims(config) -> dict:
    """One mixer's sizes from a config: L, d_model, d_inner, nheads, headdim, ngroups, d_state,
    d_conv, conv_dim, directions (2 bidirectional, 1 causal)."""
    m = config.model
    d_inner = m.expand * m.d_model
    dims = dict(L=int(config.data.seq_len), d_model=int(m.d_model), d_inner=d_inner,
                nheads=d_inner // m.headdim,
                headdim=int(m.headdim), ngroups=int(m.ngroups), d_state=int(m.d_state),
                d_conv=int(m.d_conv), directions=2 if m.bidirectional else 1)
    dims["conv_dim"] = d_inner + 2 * dims["ngroups"] * dims["d_state"]
    return dims


def mosaic_takes(kernel: str, dims: dict) -> bool:
    """Whether the Mosaic conv forward takes a conv case's sizes (else fused_conv would run
    the Triton forward under that name: no rows)."""
    return kernel == "conv" and not mosaic_conv.size_error(
        dims["L"], dims["d_inner"], dims["ngroups"] * dims["d_state"], 0, 2,
        default_interpret(), dims["d_conv"])


def maker(pallas_fn, kw):
    """make(**tiles) -> the pallas function at those tiles, PLAIN's for the rest."""
    params = inspect.signature(pallas_fn).parameters

    def make(**tiles):
        t = {k: v for k, v in dict(PLAIN, **tiles).items() if k in params}
        return lambda *a: pallas_fn(*a, **kw, interpret=default_interpret(), **t)

    return make


def make_case(kernel: str, dims: dict, batch: int, key):
    """(reference fn, pallas fn maker, args, cotangents, the pallas function's default tiles)
    of one kernel at batch `batch`; make(**tiles) sets the tiles not given to PLAIN's."""
    b, L, h, p = batch, dims["L"], dims["nheads"], dims["headdim"]
    g, n, bidi = dims["ngroups"], dims["d_state"], dims.get("directions", 2) == 2
    ks = jax.random.split(key, 8)
    bf16, f32 = jnp.bfloat16, jnp.float32
    if kernel == "conv":
        c, k = dims["conv_dim"], dims["d_conv"]
        ws = [0.5 * jax.random.normal(ks[2 + i], (k, c), f32) for i in range(1 + bidi)]
        bs = [0.1 * jax.random.normal(ks[4 + i], (c,), f32) for i in range(1 + bidi)]
        args = (jax.random.normal(ks[0], (b, L, c), bf16),
                jax.random.normal(ks[1], (b, L, h), bf16), *ws, *bs)
        kw = dict(ngroups=g, d_state=n, dtype=bf16)
        xla_fn, pallas_fn = ((fused_conv.bidirectional_conv_xla, fused_conv.bidirectional_conv_pallas)
                             if bidi else (fused_conv.causal_conv_xla, fused_conv.causal_conv_pallas))
        ref = lambda *a: xla_fn(*a, **kw)  # noqa: E731
        make = maker(pallas_fn, kw)
    else:
        d = h * p
        args = (jax.random.normal(ks[0], (b, L, (1 + bidi) * h, p), bf16),
                jax.random.normal(ks[1], (b, L, d), bf16),
                *[1.0 + 0.1 * jax.random.normal(ks[2 + i], (d,), f32) for i in range(1 + bidi)])
        kw = dict(ngroups=g, dtype=bf16)
        if bidi:
            xla_fn, pallas_fn = (fused_norm.bidirectional_gated_norm_xla,
                                 fused_norm.bidirectional_gated_norm_pallas)
        else:
            xla_fn, pallas_fn = fused_norm.gated_norm_xla, fused_norm.gated_norm_pallas
        ref = lambda *a: xla_fn(*a, **kw)  # noqa: E731
        make = maker(pallas_fn, kw)
    outs = jax.eval_shape(ref, *args)
    keys = list(jax.random.split(ks[7], len(jax.tree.leaves(outs))))
    cts = jax.tree.map(lambda o, kk: jax.random.normal(kk, o.shape, o.dtype), outs,
                       jax.tree.unflatten(jax.tree.structure(outs), keys))
    return ref, make, args, cts, tile_defaults(pallas_fn)


# HBM bandwidth of the devices the benchmarks run on, bytes/s (vendor figures: H100 SXM HBM3,
# H200 HBM3e), for the tables' "% of HBM" column; other devices get none.
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


def hbm_bytes(kernel: str, pass_: str, dims: dict, batch: int, itemsize: int = 2) -> int:
    """The bytes the fused kernels of one call must move between HBM and the chip if each array
    they read or write crosses once: inputs, outputs and the conv backward's g (written by its
    first kernel, read by its second), activations `itemsize` bytes, dt_cat / ddt_cat float32;
    weights, biases and the conv's weight partial sums left out (small). "fwdbwd" is the
    forward kernel plus the backward kernels; "fwd (loop)" is "fwd". The rows' GB/s divide it
    by their time, for the XLA reference too (the same arrays, so the same floor)."""
    rows, nd, h = batch * dims["L"], dims.get("directions", 2), dims["nheads"]
    act = rows * itemsize
    if kernel == "conv":
        c = dims["conv_dim"]
        fwd = act * (c + h) + nd * act * c + rows * nd * h * 4  # xbc, dt -> x|B|C per direction, dt_cat
        bwd = (act * c + 2 * nd * act * c  # bwd_g: xbc and the cotangents in, g out
               + nd * act * c + rows * nd * h * 4 + act * (c + h))  # bwd_dx: g, ddt_cat in, dxbc, ddt out
    elif kernel == "norm":
        d = h * dims["headdim"]
        fwd = act * d * (nd + 2)  # y (nd directions), z in; out
        bwd = act * d * (nd + 2) + act * d * (nd + 1)  # y, z, dout in; dy, dz out
    else:
        raise ValueError(f"hbm_bytes: unknown kernel {kernel!r}")
    if pass_ == "bwd_g":  # the conv backward's first kernel alone
        return int(act * c + 2 * nd * act * c)
    return int(fwd + bwd) if pass_ == "fwdbwd" else int(fwd)


def loop_fn(fn, n: int):
    """jit of n calls of fn(*args) in one fori_loop. Each call's last argument (a float32 bias
    or norm weight) is nudged by 1e-30 x one element of its output, so no call is hoisted out
    of the loop or merged with another; returns that argument after the loop."""
    def body(_, a):
        first = jax.tree.leaves(fn(*a))[0].reshape(-1)[0].astype(jnp.float32)
        return (*a[:-1], a[-1] + 1e-30 * first)

    return jax.jit(lambda *a: jax.lax.fori_loop(0, n, body, a)[-1])


def sweep_loop(run, kernel: str, dims: dict, rows, warps, programs, n: int):
    """The batch-1 forward as n calls in one jitted loop (`loop_fn`; ms per call): the XLA
    reference, the pallas function at its defaults, then rows x warps x min_programs."""
    ref, make, args, _, defaults = make_case(kernel, dims, 1, jax.random.key(0))
    base = dict(kernel=kernel, batch=1, loop=n, **{"pass": "fwd (loop)"})

    def timed(f, **row):
        return run.time(loop_fn(f, n), args, calls=n, **base, **row)

    timed(ref, impl="xla")
    timed(make(**defaults), impl="pallas (defaults)", **defaults)
    if mosaic_takes(kernel, dims):
        mosaic = dict(defaults, forward_kernel="mosaic")
        timed(make(**mosaic), impl="pallas (mosaic fwd)", **mosaic)
    for r in rows:
        for w in warps:
            for mp in programs:
                if run.out_of_time():
                    return
                timed(make(block_rows=r, num_warps=w, min_programs=mp), impl="pallas",
                      block_rows=r, num_warps=w, min_programs=mp)


def max_rel(a, b) -> float:
    return max(rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class Runner:
    """Times rows, appends them to the result and rewrites the outputs after each."""

    def __init__(self, a, dims):
        self.a, self.t0 = a, time.time()
        self.result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                       "command": "python -m benchmarks.fused_bench "
                                  + " ".join(map(shlex.quote, sys.argv[1:])),
                       "dims": dims, "rows": []}

    def out_of_time(self) -> bool:
        return time.time() - self.t0 > self.a.budget_s

    def time(self, f, args, calls: int = 1, **row):
        """Times f(*args) (ms per call of f's `calls` calls), appends the row, writes."""
        try:
            row["ms"] = time_ms(f, args, self.a.runs, self.a.inner)[0] / calls
            row["gbps"] = hbm_bytes(row["kernel"], row["pass"], self.result["dims"],
                                    row["batch"]) / row["ms"] / 1e6
        except Exception as e:  # noqa: BLE001 (a configuration the compiler rejects is a result)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        self.result["rows"].append(row)
        write(self.result, self.a.out)
        print(json.dumps(row), flush=True)
        return row


def sweep(run: Runner, kernel: str, dims: dict, batch: int, rows, warps, backward: bool,
          stages=(1,), cols=(0,), bwd_sums=()):
    """The XLA reference and the pallas function at its default tiles, the forward sweep
    (rows x warps, then stages x cols at the best of those), then (with `backward`) the same
    for the backward kernels with the forward at PLAIN's tiles, for the conv also its weight
    sums elementwise over row steps (`bwd_sums`: (rows, step, min_programs_bwd) triples with
    sums_bwd "tile" at the best backward warps and columns), and the tuned row (the best
    forward with the best backward). Tiles a row does not name are PLAIN's."""
    ref, make, args, cts, defaults = make_case(kernel, dims, batch, jax.random.key(0))
    base = dict(kernel=kernel, batch=batch)
    run.time(fwd(ref), args, **base, impl="xla", **{"pass": "fwd"})
    run.time(fwd(make(**defaults)), args, **base, impl="pallas (defaults)", **defaults,
             **{"pass": "fwd"})
    mosaic = dict(defaults, forward_kernel="mosaic") if mosaic_takes(kernel, dims) else None
    if mosaic:
        run.time(fwd(make(**mosaic)), args, **base, impl="pallas (mosaic fwd)", **mosaic,
                 **{"pass": "fwd"})
    if backward:
        run.time(fwdbwd(ref), (cts, *args), **base, impl="xla", **{"pass": "fwdbwd"})
        run.time(fwdbwd(make(**defaults)), (cts, *args), **base, impl="pallas (defaults)",
                 **defaults, **{"pass": "fwdbwd"})
        if mosaic:
            run.time(fwdbwd(make(**mosaic)), (cts, *args), **base, impl="pallas (mosaic fwd)",
                     **mosaic, **{"pass": "fwdbwd"})
            both = dict(mosaic, backward_kernel="mosaic")
            run.time(fwdbwd(make(**both)), (cts, *args), **base,
                     impl="pallas (mosaic fwd+bwd)", **both, **{"pass": "fwdbwd"})
    best = {}

    def phase(key, grid, timed):
        """Times `timed(tiles)` over the tile dicts of `grid`; keeps the fastest in best[key]."""
        for tiles in grid:
            if run.out_of_time():
                return False
            row = timed(tiles)
            if "ms" in row and row["ms"] < best.get(key, (np.inf,))[0]:
                best[key] = (row["ms"], tiles)
        return True

    def refine(key, suffix):
        """stages x cols (but the plain 1 x 0) at the best rows x warps of best[key]."""
        _, t = best[key]
        return [dict(t, **{"num_stages" + suffix: st, "block_cols" + suffix: c})
                for st in stages for c in cols if (st, c) != (1, 0)]

    def refine_steps(key, suffix):
        """conv only: programs of 2, 4 and 8 times the best rows, walked in steps of them."""
        _, t = best[key]
        if kernel != "conv":
            return []
        r = t["block_rows" + suffix]
        return [dict(t, **{"block_rows" + suffix: r * m, "step_rows" + suffix: r})
                for m in (2, 4, 8) if r * m <= dims["L"]]

    def refine_sums(key):
        """conv only: the backward's tile sums over column splits at best[key]'s warps / cols."""
        _, t = best[key]
        if kernel != "conv":
            return []
        return [dict(t, block_rows_bwd=r, step_rows_bwd=st, sums_bwd="tile",
                     min_programs_bwd=mp) for r, st, mp in bwd_sums if r <= dims["L"]]

    def timed_fwd(t):
        return run.time(fwd(make(**t)), args, **base, impl="pallas", **t, **{"pass": "fwd"})

    def timed_bwd(t):
        return run.time(fwdbwd(make(**t)), (cts, *args), **base, impl="pallas",
                        block_rows=PLAIN["block_rows"], num_warps=PLAIN["num_warps"], **t,
                        **{"pass": "fwdbwd"})

    grid = [dict(block_rows=r, num_warps=w) for r in rows for w in warps]
    if not phase("fwd", grid, timed_fwd) or "fwd" not in best:
        return
    if not phase("fwd", refine("fwd", ""), timed_fwd):
        return
    if not phase("fwd", refine_steps("fwd", ""), timed_fwd) or not backward:
        return
    grid = [dict(block_rows_bwd=r, num_warps_bwd=w) for r in rows for w in warps]
    if not phase("bwd", grid, timed_bwd) or "bwd" not in best:
        return
    if not phase("bwd", refine("bwd", "_bwd"), timed_bwd):
        return
    if not phase("bwd", refine_steps("bwd", "_bwd"), timed_bwd):
        return
    if not phase("bwd", refine_sums("bwd"), timed_bwd):
        return
    tiles = dict(best["fwd"][1], **best["bwd"][1])
    f = fwdbwd(make(**tiles))
    err = max_rel(f(cts, *args), fwdbwd(ref)(cts, *args))
    row = run.time(f, (cts, *args), **base, impl="pallas (tuned)", **tiles, **{"pass": "fwdbwd"})
    row["max_rel_err_vs_xla"] = err
    write(run.result, run.a.out)


def tile_text(r: dict, suffix: str = "") -> str:
    """'rows x warps' of a row's pass, with ' s<stages>' and ' c<cols>' where not the plain
    1 stage / natural width."""
    text = f"{r['block_rows' + suffix]} x {r['num_warps' + suffix]}"
    if r.get("num_stages" + suffix, 1) != 1:
        text += f" s{r['num_stages' + suffix]}"
    if r.get("block_cols" + suffix, 0):
        text += f" c{r['block_cols' + suffix]}"
    if r.get("step_rows" + suffix, 0):
        text += f" step{r['step_rows' + suffix]}"
    if r.get("sums" + suffix, "step") != "step":
        text += f" sums-{r['sums' + suffix]} p{r['min_programs' + suffix]}"
    if not suffix and r.get("min_programs") not in (None, PLAIN.get("min_programs")):
        text += f" p{r['min_programs']}"
    if r.get("passes" + suffix, 2) == 1:
        text += " 1-pass"
    if not suffix and r.get("forward_kernel", "triton") != "triton":
        text += f" {r['forward_kernel']}"
    if suffix and r.get("backward_kernel", "triton") != "triton":
        text += f" {r['backward_kernel']}"
    return text


def write(result, prefix):
    with open(prefix + ".json", "w") as f:
        json.dump(result, f, indent=1)
    rows = result["rows"]
    peak = next((v for k, v in HBM_BYTES_PER_S.items() if k in result["device"]), None)
    lines = [f"# Fused mixer kernels on {result['device']} (jax {result['jax']})", "",
             f"Command: `{result['command']}`", "", f"Mixer dims: {result['dims']} (bf16 "
             "activations). ms = median of timed windows. \"pallas (defaults)\": the kernels "
             "at the tiles the model runs; the sweep's rows set only the tiles they name, the "
             f"rest are {PLAIN['block_rows']} rows x {PLAIN['num_warps']} warps, one stage, the "
             "natural width, one step; `fwdbwd` sweeps the backward kernel with the forward at "
             "those.", "",
             "GB/s: `hbm_bytes` (each array the kernels read or write crossing HBM once) per "
             "time; % of HBM: of the device's " + (f"{peak / 1e12:.2f} TB/s" if peak else
                                                    "(unknown here)") + ".",
             "", "| kernel | batch | pass | impl | rows x warps (bwd) | ms | x XLA | GB/s "
             "| % of HBM | rel err vs XLA |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" not in r:
            continue
        xla = next((x["ms"] for x in rows if x["impl"] == "xla" and x["kernel"] == r["kernel"]
                    and x["batch"] == r["batch"] and x["pass"] == r["pass"] and "ms" in x), None)
        tiles = tile_text(r) if "block_rows" in r else ""  # xla, the bare Mosaic kernels
        if r.get("block_rows_bwd"):
            tiles += f" ({tile_text(r, '_bwd')})"
        err = f"{r['max_rel_err_vs_xla']:.1e}" if "max_rel_err_vs_xla" in r else ""
        ratio = f"{r['ms'] / xla:.2f}" if xla else ""
        gbps = r.get("gbps")
        share = f"{100 * gbps * 1e9 / peak:.0f}%" if gbps and peak else ""
        lines.append(f"| {r['kernel']} | {r['batch']} | {r['pass']} | {r['impl']} "
                     f"| {tiles} | {r['ms']:.3f} | {ratio} | {gbps or 0:.0f} | {share} | {err} |")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Failed configurations:", ""] + [
            f"- {r['kernel']} b{r['batch']} {r['pass']} "
            f"{tile_text(r) if 'block_rows' in r else ''}"
            f" ({tile_text(r, '_bwd') if 'block_rows_bwd' in r else ''}): {r['error']}"
            for r in failed]
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def mosaic_kernel_rows(run, dims: dict, batch: int, loop: int):
    """The bare Mosaic conv kernels (`mosaic_conv`) at batch `batch`, both directions per
    program and one (`split`): the forward (and, loop > 0, the batch-1 forward as `loop` calls
    in one jitted loop) and the backward's first kernel (pass "bwd_g"), impl
    "mosaic kernel" / "mosaic kernel split"."""
    if not mosaic_takes("conv", dims):
        return
    g, n, nd = dims["ngroups"], dims["d_state"], dims.get("directions", 2)
    kw = dict(ngroups=g, d_state=n, interpret=default_interpret())
    for b, looped in [(batch, False)] + ([(1, True)] if loop else []):
        _, _, args, cts, _ = make_case("conv", dims, b, jax.random.key(0))
        xbc, wb = args[0], args[2:2 + 2 * nd]  # the nd weights, then the nd biases
        douts = tuple(c.reshape(b, dims["L"], -1).astype(xbc.dtype) for c in cts[:3])
        for split in (False, True):
            row = dict(kernel="conv", batch=b,
                       impl="mosaic kernel split" if split else "mosaic kernel")

            def fwd(x, *wb, split=split):
                return mosaic_conv.conv_fwd_mosaic(x, wb[:nd], wb[nd:], split=split,
                                                   **kw)
            if looped:
                run.time(loop_fn(fwd, loop), (xbc, *wb), calls=loop, loop=loop, **row,
                         **{"pass": "fwd (loop)"})
                continue
            run.time(jax.jit(fwd), (xbc, *wb), **row, **{"pass": "fwd"})

            def bwd_g(x, d, *wb, split=split):
                return mosaic_conv.conv_bwd_g_mosaic(x, wb[:nd], wb[nd:], *d, split=split, **kw)
            run.time(jax.jit(bwd_g), (xbc, douts, *wb), **row, **{"pass": "bwd_g"})


def norm_passes_rows(run, dims: dict, batch: int, loop: int, rows, warps):
    """The norm kernels reading a group's column tiles once (passes 1) beside twice (2): at the
    defaults, forward and forward + backward at batch `batch` (and, loop > 0, the batch-1
    forward as `loop` calls in one jitted loop); then with passes 1, the forward over rows x
    warps and the backward over rows x warps (its register need grows with the rows)."""
    ref, make, args, cts, defaults = make_case("norm", dims, batch, jax.random.key(0))
    base = dict(kernel="norm", batch=batch)
    for passes in (2, 1):
        t = dict(defaults, passes=passes, passes_bwd=passes)
        run.time(fwd(make(**t)), args, **base, impl=f"pallas (defaults, {passes} passes)", **t,
                 **{"pass": "fwd"})
        f = fwdbwd(make(**t))
        row = run.time(f, (cts, *args), **base, impl=f"pallas (defaults, {passes} passes)",
                       **t, **{"pass": "fwdbwd"})
        row["max_rel_err_vs_xla"] = max_rel(f(cts, *args), fwdbwd(ref)(cts, *args))
    if loop:
        _, make1, args1, _, defaults1 = make_case("norm", dims, 1, jax.random.key(0))
        for passes in (2, 1):
            t = dict(defaults1, passes=passes, passes_bwd=passes)
            run.time(loop_fn(make1(**t), loop), args1, calls=loop, kernel="norm", batch=1,
                     loop=loop, impl=f"pallas (defaults, {passes} passes)", **t,
                     **{"pass": "fwd (loop)"})
    for r in rows:
        for w in warps:
            if run.out_of_time():
                return
            t = dict(defaults, block_rows=r, num_warps=w, passes=1, passes_bwd=2)
            run.time(fwd(make(**t)), args, **base, impl="pallas", **t, **{"pass": "fwd"})
    for r in rows:
        for w in warps:
            if run.out_of_time():
                return
            t = dict(defaults, block_rows_bwd=r, num_warps_bwd=w, passes=2, passes_bwd=1)
            run.time(fwdbwd(make(**t)), (cts, *args), **base, impl="pallas", **t,
                     **{"pass": "fwdbwd"})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, default=16,
                   help="batch of the forward + backward sweeps (0: none, e.g. with "
                        "--batch1-loop alone)")
    p.add_argument("--seq-len", type=int, default=0, help="override data.seq_len (0: the config's)")
    p.add_argument("--batch1", action="store_true", help="also sweep the forward at batch 1")
    p.add_argument("--batch1-loop", type=int, default=0,
                   help="N > 0: also time the batch-1 forward as N calls in one jitted loop")
    p.add_argument("--programs", default="1,256,1024,4096",
                   help="min_programs values of the --batch1-loop sweep")
    p.add_argument("--kernels", default="conv,norm", help="of conv, norm")
    p.add_argument("--rows", default="4,8,16,32")
    p.add_argument("--warps", default="1,2,4,8")
    p.add_argument("--stages", default="1,2,3",
                   help="Triton pipeline stages tried at the best rows x warps")
    p.add_argument("--cols", default="0,128,256,512",
                   help="columns per tile tried at the best rows x warps (0 = natural width)")
    p.add_argument("--bwd-sums", default="64:8:1,64:8:1024,256:8:1024,256:4:1024,1024:8:1024",
                   help="conv backward: ROWS:STEP:MIN_PROGRAMS_BWD triples timed with "
                        "sums_bwd 'tile' at the best backward warps and columns ('' = none)")
    p.add_argument("--mosaic-kernels", action="store_true",
                   help="also time the bare Mosaic conv kernels, both directions per program "
                        "and one (`mosaic_kernel_rows`)")
    p.add_argument("--norm-passes", action="store_true",
                   help="also time the norm kernels in one pass beside two (`norm_passes_rows`)")
    p.add_argument("--no-sweeps", action="store_true",
                   help="skip the tile sweeps (and --batch1 / --batch1-loop's): only the rows "
                        "--mosaic-kernels and --norm-passes ask for")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=400.0)
    p.add_argument("--out", required=True, help="output prefix (PREFIX.json, PREFIX.md)")
    a = p.parse_args(argv)
    config = load_config_file(a.config)
    if a.seq_len:
        config.data.seq_len = a.seq_len
    dims = mixer_dims(config)
    rows = [int(v) for v in a.rows.split(",")]
    warps = [int(v) for v in a.warps.split(",")]
    stages = [int(v) for v in a.stages.split(",")]
    cols = [int(v) for v in a.cols.split(",")]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    run = Runner(a, dims)
    kernels = a.kernels.split(",")
    bwd_sums = [tuple(int(v) for v in t.split(":")) for t in a.bwd_sums.split(",") if t]
    for kernel in kernels if a.batch and not a.no_sweeps else ():
        sweep(run, kernel, dims, a.batch, rows, warps, backward=True, stages=stages, cols=cols,
              bwd_sums=bwd_sums)
    if a.batch1 and not a.no_sweeps:
        for kernel in kernels:
            sweep(run, kernel, dims, 1, rows, warps, backward=False, stages=stages, cols=cols)
    if "conv" in kernels and a.batch and a.mosaic_kernels:
        mosaic_kernel_rows(run, dims, a.batch, a.batch1_loop)
    if "norm" in kernels and a.batch and a.norm_passes:
        norm_passes_rows(run, dims, a.batch, a.batch1_loop, rows, warps)
    if a.batch1_loop and not a.no_sweeps:
        programs = [int(v) for v in a.programs.split(",")]
        for kernel in kernels:
            sweep_loop(run, kernel, dims, rows, warps, programs, a.batch1_loop)
    return run.result


if __name__ == "__main__":
    main()
