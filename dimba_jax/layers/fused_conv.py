"""The prologue of the Mamba-2 mixer (depthwise conv + SiLU + split) as Pallas kernels: both
directions of the bidirectional mixer with shared projections, or the causal mixer's one.

From the shared projection's xBC (b, L, C), C = H*P + 2*G*N, and dt (b, L, H), with the two
directions' depthwise conv weights w_f, w_b (K, C) and biases bias_f, bias_b (C,), K = d_conv:

    a_f[t] = bias_f + sum_k w_f[k] * xbc[t - (K-1) + k]        (zero for rows < 0)
    a_b[s] = bias_b + sum_k w_b[k] * xbc[L-1-s + (K-1) - k]    (zero for rows > L-1)
    [x | B | C]_f = silu(a_f),  [x | B | C]_b = silu(a_b),  in float32, then rounded to `dtype`

a_b is the causal conv of flip(xbc) at scan time s (original row L-1-s). The outputs are the
inputs of the single SSD call over both directions, backward halves in scan time:

    x_cat (b, L, 2H, P), B_cat (b, L, 2G, N), C_cat (b, L, 2G, N) in `dtype`;
    dt_cat (b, L, 2H) float32 = [dt[t] | dt[L-1-t]].

`bidirectional_conv_xla` is that computation in jnp (what `BidirectionalMamba2` computes);
`bidirectional_conv_pallas` is one Pallas forward kernel for both directions (Triton backend,
or the Pallas interpreter with `interpret=True`) with a custom VJP. The flip is row arithmetic
inside the kernels; the split and the concatenation are where the kernels write. The VJP saves
only the inputs (xbc, dt, weights, biases) and recomputes a_f, a_b.

Backward (g = dout * silu'(a), silu'(a) = sig(a) * (1 + a * (1 - sig(a))), float32; dout_f[t],
dout_b[s]: the cotangents of x_cat/B_cat/C_cat at the forward / backward half):
    dxbc[j] = sum_k w_f[k] * g_f[j + (K-1) - k] + w_b[k] * g_b[L-1-j + (K-1) - k]
    dw_f[k] = sum_t g_f[t] * xbc[t - (K-1) + k],  dbias_f = sum_t g_f[t]
    dw_b[k] = sum_s g_b[s] * xbc[L-1-s + (K-1) - k],  dbias_b = sum_s g_b[s]
    ddt[j]  = ddt_cat[j, :H] + ddt_cat[L-1-j, H:]
Weight and bias sums are per-program partial sums (b, L/T, 2, K+1, C) float32, added in XLA.
Two kernels over grid (batch, row blocks of T rows): "bidir_conv_bwd_g" over scan rows t: K
shifted xbc loads per direction give a_f[t], a_b[t] once each; g_f[t], g_b[t] from the
cotangents at the program's own rows; it writes g (b, L, 2, C) in xbc.dtype (forward half in
original time, backward half in scan time; `mosaic_conv.conv_bwd_g_mosaic` writes both in
original time) and the weight and bias sums over rows t from the
same loads. Then "bidir_conv_bwd_dx" over original rows j: dxbc[j] from K shifted loads of g
per direction (zero outside [0, L)), summed in float32 and written in xbc.dtype, and ddt[j].
Each pre-activation is computed once; g is stored in xbc.dtype (2C values per row in HBM,
bf16 in training: no full-size float32 intermediate), written by the first kernel and read by
the second; the weight and bias sums take the float32 g before that rounding.

The causal mixer's prologue is the same kernels with one direction (nd = 1: the forward half
only, no flip, outputs (b, L, H, P), (b, L, G, N), (b, L, G, N), dt (b, L, H) float32):
`causal_conv_pallas`, with `causal_conv_xla` its jnp reference. Kernel names drop "bidir_".

At a small batch (the sampler's denoiser at batch 1: 64 row blocks) the forward's grid gets a
third axis that splits the column tiles over programs (`min_programs`), so the GPU's SMs are
not left to a few programs that each walk every column tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dimba_jax.layers import mosaic_conv
from dimba_jax.layers.triton_common import (DEFAULT_BLOCK_ROWS, DEFAULT_MIN_PROGRAMS,
                                            compiler_params, default_tiles, is_power_of_two,
                                            kernel_tiles, split_count, tile_width)
from dimba_jax.ssd import hopper

# The bidirectional backward kernels' default tiles: 64 rows in steps of 8, weight sums
# elementwise over the steps ("tile"), column splits up to 1024 programs (fastest forward +
# backward at configs/base.py's mixer on an H100: benchmarks/results/fused_sums_h100.md).
BWD_BLOCK_ROWS, BWD_NUM_WARPS, BWD_STEP_ROWS, BWD_MIN_PROGRAMS, BWD_SUMS = 64, 4, 8, 1024, "tile"


def causal_conv1d_silu(xbc, weight, bias, *, seq_idx=None, dtype=None):
    """Depthwise causal conv + bias + SiLU (float32 accumulation).

    out[t] = silu(bias + sum_k weight[k] * xbc[t - (K-1) + k]), zero before t = 0 and, with
    seq_idx, zero for inputs from a different packed sequence than t's.

    Args:
      xbc: (batch, L, C); weight: (K, C); bias: (C,).
      seq_idx: optional (batch, L) int packed-sequence ids.
      dtype: output dtype (default xbc.dtype).
    Returns:
      (batch, L, C) in `dtype`.
    """
    k_width, seqlen = weight.shape[0], xbc.shape[1]
    w = weight.astype(jnp.float32)
    xpad = jnp.pad(xbc.astype(jnp.float32), ((0, 0), (k_width - 1, 0), (0, 0)))
    if seq_idx is not None:
        spad = jnp.pad(seq_idx, ((0, 0), (k_width - 1, 0)), constant_values=-1)
    acc = bias.astype(jnp.float32)
    for k in range(k_width):
        term = xpad[:, k:k + seqlen] * w[k]
        if seq_idx is not None and k < k_width - 1:
            term = jnp.where((spad[:, k:k + seqlen] == seq_idx)[..., None], term, 0.0)
        acc = acc + term
    return jax.nn.silu(acc).astype(dtype or xbc.dtype)


def _dims(xbc, dt, w_f, w_b, bias_f, bias_b, ngroups, d_state):
    """(nheads, headdim) after checking the shapes."""
    if xbc.ndim != 3 or dt.ndim != 3 or dt.shape[:2] != xbc.shape[:2]:
        raise ValueError(f"expected xbc (batch, L, conv_dim) and dt (batch, L, nheads); got "
                         f"{xbc.shape}, {dt.shape}")
    nh, c = dt.shape[-1], xbc.shape[-1]
    d_inner = c - 2 * ngroups * d_state
    if ngroups <= 0 or d_state <= 0 or d_inner <= 0 or d_inner % nh or nh % ngroups:
        raise ValueError(f"conv_dim {c} != nheads {nh} * headdim + 2 * ngroups {ngroups} * "
                         f"d_state {d_state} (nheads % ngroups == 0)")
    k_width = w_f.shape[0]
    if (w_f.shape != (k_width, c) or w_b.shape != (k_width, c) or bias_f.shape != (c,)
            or bias_b.shape != (c,)):
        raise ValueError(f"expected weights (d_conv, {c}) and biases ({c},); got {w_f.shape}, "
                         f"{w_b.shape}, {bias_f.shape}, {bias_b.shape}")
    return nh, d_inner // nh


def conv_size_error(headdim: int, d_state: int) -> str:
    """Why the fused kernels cannot take these sizes, "" if they can: their tiles are
    (rows, headdim) and (rows, d_state), so both are powers of two."""
    for name, v in (("headdim", headdim), ("d_state", d_state)):
        if not is_power_of_two(v):
            return f"the fused conv needs {name} a power of two, got {v}"
    return ""


def bidirectional_conv_xla(xbc, dt, w_f, w_b, bias_f, bias_b, *, ngroups: int, d_state: int,
                           dtype=None):
    """The reference prologue in jnp (the module docstring's math).

    Args:
      xbc: (batch, L, conv_dim) conv input [x | B | C] in original time.
      dt: (batch, L, nheads) raw dt (before bias and softplus).
      w_f, w_b: (d_conv, conv_dim) conv weights; bias_f, bias_b: (conv_dim,) conv biases.
      ngroups, d_state: B/C groups G and state size N (conv_dim = nheads*headdim + 2*G*N).
      dtype: dtype of x_cat, B_cat, C_cat (default xbc.dtype).
    Returns:
      x_cat (batch, L, 2*nheads, headdim), B_cat, C_cat (batch, L, 2*ngroups, d_state), all in
      `dtype`; dt_cat (batch, L, 2*nheads) float32. Backward halves in scan (flipped) time.
    """
    nh, p = _dims(xbc, dt, w_f, w_b, bias_f, bias_b, ngroups, d_state)
    bsz, seqlen, _ = xbc.shape
    d_inner, gn = nh * p, ngroups * d_state

    def split(v):
        return (v[..., :d_inner].reshape(bsz, seqlen, nh, p),
                v[..., d_inner:d_inner + gn].reshape(bsz, seqlen, ngroups, d_state),
                v[..., d_inner + gn:].reshape(bsz, seqlen, ngroups, d_state))

    fwd = split(causal_conv1d_silu(xbc, w_f, bias_f, dtype=dtype))
    bwd = split(causal_conv1d_silu(jnp.flip(xbc, axis=1), w_b, bias_b, dtype=dtype))
    x, b, c = (jnp.concatenate([u, v], axis=2) for u, v in zip(fwd, bwd))
    return x, b, c, jnp.concatenate([dt, jnp.flip(dt, axis=1)], axis=2).astype(jnp.float32)


def causal_conv_xla(xbc, dt, w, bias, *, ngroups: int, d_state: int, dtype=None):
    """The causal mixer's prologue in jnp: one direction of `bidirectional_conv_xla`.

    Args: xbc (batch, L, conv_dim), dt (batch, L, nheads), w (d_conv, conv_dim), bias
      (conv_dim,), ngroups, d_state, dtype as `bidirectional_conv_xla`.
    Returns:
      x (batch, L, nheads, headdim), B, C (batch, L, ngroups, d_state) in `dtype`, and dt
      float32 (batch, L, nheads).
    """
    nh, p = _dims(xbc, dt, w, w, bias, bias, ngroups, d_state)
    bsz, seqlen, _ = xbc.shape
    d_inner, gn = nh * p, ngroups * d_state
    v = causal_conv1d_silu(xbc, w, bias, dtype=dtype)
    return (v[..., :d_inner].reshape(bsz, seqlen, nh, p),
            v[..., d_inner:d_inner + gn].reshape(bsz, seqlen, ngroups, d_state),
            v[..., d_inner + gn:].reshape(bsz, seqlen, ngroups, d_state), dt.astype(jnp.float32))


# --------------------------------------------------------------------------------------------
# Kernels. One program: batch row bi, time rows [t0, t0 + T). xbc_ref is the whole (L, C)
# sequence of batch bi. Channels are visited in tiles of P (heads of x) or N (groups of B, C)
# columns; a tile's input rows r + d are gathered with rows outside [0, L) read as zero.
# --------------------------------------------------------------------------------------------


def _shifted(ref, rows, d, cols, seqlen, *mid):
    """ref[rows + d, *mid, cols] in float32, zero where rows + d is outside [0, seqlen)."""
    r = rows + d
    ok = (r >= 0) & (r < seqlen)
    v = ref[(jnp.clip(r, 0, seqlen - 1), *mid, cols)].astype(jnp.float32)
    return jnp.where(ok[:, None], v, 0.0)


def _pre(x, w, bias, offsets):
    """bias + sum_k w[k] * x[offsets[k]] (the reference's summation order)."""
    acc = bias
    for k, d in enumerate(offsets):
        acc = acc + x[d] * w[k]
    return acc


def _vecs(w_ref, b_ref, cols, k_width):
    """The K weight rows and the bias of columns `cols`, each (1, width) float32 (bias None
    without b_ref)."""
    f32 = jnp.float32
    return ([w_ref[k, cols].astype(f32)[None, :] for k in range(k_width)],
            None if b_ref is None else b_ref[cols].astype(f32)[None, :])


def _column_tiles(nh, p, ng, n, cols):
    """Per region of xBC (x, then B, then C): (first xbc column of tile j, tile width, tile
    count, region width). Tiles are `tile_width(region, natural, cols)` wide, the natural
    width being headdim for x and d_state for B and C."""
    out = []
    for start, total, natural in ((0, nh * p, p), (nh * p, ng * n, n), (nh * p + ng * n, ng * n, n)):
        w = tile_width(total, natural, cols)
        out.append((lambda j, start=start, w=w: start + j * w, w, total // w, total))
    return out


def _directions(seqlen, t0, i, k_width, nd):
    """Per direction (forward, then with nd = 2 the backward): (original rows of its outputs
    at scan rows t0 + i, its K tap offsets in original rows)."""
    km = k_width - 1
    return ((t0 + i, [k - km for k in range(k_width)]),
            ((seqlen - 1 - t0) - i, [km - k for k in range(k_width)]))[:nd]


def _steps(q, step, body, init):
    """body(s, carry) over the q // step row steps of a program (called once, not looped, for
    one step); returns the final carry."""
    if q // step == 1:
        return body(0, init)
    return jax.lax.fori_loop(0, q // step, body, init)


def _split_loop(count, splits, shift, body):
    """body(j) over the tiles j in [0, count) of this program's split: with splits = 1 all
    of them; else the tiles j whose global index shift + j is congruent to the split
    pl.program_id(2) modulo splits (a split owns the tiles at a stride of splits)."""
    if splits == 1:
        def visit(j, carry):
            body(j)
            return carry

        jax.lax.fori_loop(0, count, visit, 0)
        return
    first = (pl.program_id(2) + (splits - shift % splits)) % splits

    def visit_split(m, carry):
        j = first + m * splits

        @pl.when(j < count)
        def _():
            body(j)
        return carry

    jax.lax.fori_loop(0, -(-count // splits), visit_split, 0)


def _fwd_kernel(xbc_ref, dt_ref, *refs, q, seqlen, nh, p, ng, n, k_width, nd, cols, step, xo,
                do, splits=1):
    """xbc_ref, dt_ref: the whole sequences holding xBC at columns [xo, xo + C) and dt at
    [do, do + H); refs: nd weight refs (K, C), nd bias refs (C,), then the outputs x_ref
    (q, nd*H*P), bm_ref, cm_ref (q, nd*G*N) (direction-major, then heads or groups) and
    dtc_ref (q, nd*H) float32. Per column tile the program walks its q rows in steps of
    `step` rows. With splits > 1 the grid's third axis splits the column tiles (x, B and C
    tiles in one global order, then the dt columns in `_pieces`) over that many programs
    (`_split_loop`)."""
    w_refs, b_refs = refs[:nd], refs[nd:2 * nd]
    x_ref, bm_ref, cm_ref, dtc_ref = refs[2 * nd:]
    t0 = pl.program_id(1) * q
    i = jax.lax.broadcasted_iota(jnp.int32, (step,), 0)

    shift = 0
    for (first, width, count, total), o_ref in zip(_column_tiles(nh, p, ng, n, cols),
                                                   (x_ref, bm_ref, cm_ref)):
        def tile(j, first=first, width=width, total=total, o_ref=o_ref):
            cs = pl.ds(first(j), width)
            src = pl.ds(xo + first(j), width)
            vecs = [_vecs(w_refs[h], b_refs[h], cs, k_width) for h in range(nd)]

            def rows_step(si, c):
                dirs = _directions(seqlen, t0 + si * step, i, k_width, nd)
                for half, (rows, offsets) in enumerate(dirs):
                    w, bias = vecs[half]
                    xs = {d: _shifted(xbc_ref, rows, d, src, seqlen) for d in offsets}
                    o_ref[pl.ds(si * step, step), pl.ds(half * total + j * width, width)] = (
                        jax.nn.silu(_pre(xs, w, bias, offsets)).astype(o_ref.dtype))
                return c

            _steps(q, step, rows_step, 0)

        _split_loop(count, splits, shift, tile)
        shift += count

    dirs = _directions(seqlen, t0, jax.lax.broadcasted_iota(jnp.int32, (q,), 0), k_width, nd)
    for m, (h0, width) in enumerate(_pieces(nh)):
        def dt_piece(h0=h0, width=width):
            for half, (rows, _) in enumerate(dirs):
                dtc_ref[:, pl.ds(half * nh + h0, width)] = dt_ref[
                    rows, pl.ds(do + h0, width)].astype(jnp.float32)

        if splits == 1:
            dt_piece()
        else:  # piece m belongs to split (shift + m) mod splits
            pl.when(pl.program_id(2) == (shift + m) % splits)(dt_piece)


def _pieces(count):
    """[0, count) as power-of-two column pieces, widest first: (first column, width) pairs
    (24 -> (0, 16), (16, 8)), so a (rows, count) block moves as a few whole tiles."""
    out, first = [], 0
    for bit in reversed(range(count.bit_length())):
        if count & (1 << bit):
            out.append((first, 1 << bit))
            first += 1 << bit
    return out


def _ddt_rows(ddtc_ref, ddt_ref, t0, j, *, q, seqlen, nh, nd, col=0):
    """ddt_ref[:, col:col + H] (q rows) = ddt[j] = ddt_cat[j, :H] (+ ddt_cat[L-1-j, H:] with
    nd = 2) for the rows j = t0 + i, in `_pieces(H)`; ddtc_ref: the whole (L, nd*H) float32
    ddt_cat of the batch row."""
    for h0, width in _pieces(nh):
        g = ddtc_ref[pl.ds(t0, q), pl.ds(h0, width)]
        if nd == 2:
            g = g + ddtc_ref[(seqlen - 1) - j, pl.ds(nh + h0, width)]
        ddt_ref[:, pl.ds(col + h0, width)] = g.astype(ddt_ref.dtype)


def _bwd_g_kernel(xbc_ref, *refs, q, seqlen, nh, p, ng, n, k_width, nd, cols, step, xo, do,
                  splits=1, sums="step"):
    """Backward kernel 1 ("bidir_conv_bwd_g"; "conv_bwd_g" with nd = 1), scan rows t0 + i.

    xbc_ref: the whole sequence holding xBC at columns [xo, xo + C); refs: nd weight refs, nd
    bias refs; dx_ref (q, nd*H*P), dbm_ref, dcm_ref (q, nd*G*N): the cotangents of x_cat,
    B_cat, C_cat at the program's rows; then the outputs g_ref (q, nd, C) in xbc's dtype:
    [g_f[t] | g_b[t]], and dw_ref (nd, K + 1, C) float32: this program's partial sums of
    [dw; dbias] of each direction (of the float32 g), summed over its row steps of `step` rows
    in registers: each step's rows reduced at once (sums "step") or elementwise (step, width)
    sums reduced once per column tile (sums "tile"). With splits > 1 the grid's third axis
    splits the column tiles (x, B and C tiles in one global order) over that many programs.
    """
    f32 = jnp.float32
    w_refs, b_refs = refs[:nd], refs[nd:2 * nd]
    dx_ref, dbm_ref, dcm_ref, g_ref, dw_ref = refs[2 * nd:]
    t0 = pl.program_id(1) * q
    i = jax.lax.broadcasted_iota(jnp.int32, (step,), 0)
    elementwise = sums == "tile"

    shift = 0
    for (first, width, count, total), d_ref in zip(_column_tiles(nh, p, ng, n, cols),
                                                   (dx_ref, dbm_ref, dcm_ref)):
        def tile(c, first=first, width=width, total=total, d_ref=d_ref):
            cs = pl.ds(first(c), width)
            src = pl.ds(xo + first(c), width)
            vecs = [_vecs(w_refs[h], b_refs[h], cs, k_width) for h in range(nd)]

            def rows_step(si, acc):
                rs = pl.ds(si * step, step)
                dirs = _directions(seqlen, t0 + si * step, i, k_width, nd)
                new = []
                for half, (rows, offsets) in enumerate(dirs):
                    w, bias = vecs[half]
                    xs = {d: _shifted(xbc_ref, rows, d, src, seqlen) for d in offsets}
                    dout = d_ref[rs, pl.ds(half * total + c * width, width)].astype(f32)
                    g = dout * mosaic_conv.dsilu(_pre(xs, w, bias, offsets))
                    g_ref[rs, half, cs] = g.astype(g_ref.dtype)
                    terms = [g * xs[d] for d in offsets] + [g]
                    if not elementwise:
                        terms = [jnp.sum(v, axis=0) for v in terms]
                    new.append(tuple(a + b for a, b in zip(acc[half], terms)))
                return tuple(new)

            zero = jnp.zeros((step, width) if elementwise else (width,), f32)
            acc = _steps(q, step, rows_step, ((zero,) * (k_width + 1),) * nd)
            for half in range(nd):
                for k in range(k_width + 1):
                    v = acc[half][k]
                    dw_ref[half, k, cs] = jnp.sum(v, axis=0) if elementwise else v

        _split_loop(count, splits, shift, tile)
        shift += count


def _bwd_dx_kernel(g_ref, *refs, q, seqlen, nh, p, ng, n, k_width, nd, cols, step, xo, do,
                   into=False, g_time="scan"):
    """Backward kernel 2 ("bidir_conv_bwd_dx"; "conv_bwd_dx" with nd = 1), original rows
    j = t0 + i of batch bi, in steps of `step` rows.

    g_ref: the whole (L, nd, C) g of pass 1 (xbc's dtype); refs: nd weight refs, ddtc_ref (the
    whole (L, nd*H) ddt_cat), then the outputs dxbc_ref (q, C) in xbc's dtype:
    sum_k w_f[k] * g_f[j + (K-1) - k] (+ w_b[k] * g_b[L-1-j + (K-1) - k] with nd = 2) and
    ddt_ref (q, H). With `into`: an input ref (the buffer, unread) and one output ref (q, W)
    aliased to it instead, dxbc written at columns [xo, xo + C) and ddt at [do, do + H).
    g_time: the time of g's backward half, "scan" (the Triton first kernel's) or "original"
    (the Mosaic one's: g_b[L-1-j + (K-1) - k] is then row j - (K-1) + k).
    """
    if into:
        w_refs, (ddtc_ref, _, out_ref) = refs[:nd], refs[nd:]
        dxbc_ref = ddt_ref = out_ref
        xs, ds = xo, do
    else:
        w_refs, (ddtc_ref, dxbc_ref, ddt_ref) = refs[:nd], refs[nd:]
        xs, ds = 0, 0
    t0 = pl.program_id(1) * q
    i = jax.lax.broadcasted_iota(jnp.int32, (step,), 0)
    km = k_width - 1

    for first, width, count, _ in _column_tiles(nh, p, ng, n, cols):
        def tile(c, carry, first=first, width=width):
            cs = pl.ds(first(c), width)
            ws = [_vecs(w_refs[h], None, cs, k_width)[0] for h in range(nd)]

            def rows_step(si, c2):
                ts = t0 + si * step
                # rows of g at tap offset 0 and each tap's offset from them
                taps = ((ts + i, lambda k: km - k),
                        (((seqlen - 1 - ts) - i, lambda k: km - k) if g_time == "scan"
                         else (ts + i, lambda k: k - km)))[:nd]
                acc = jnp.zeros((step, width), jnp.float32)
                for half, (rows, offset) in enumerate(taps):
                    for k in range(k_width):
                        acc = acc + ws[half][k] * _shifted(g_ref, rows, offset(k), cs, seqlen,
                                                           half)
                dxbc_ref[pl.ds(si * step, step), pl.ds(xs + first(c), width)] = acc.astype(
                    dxbc_ref.dtype)
                return c2

            _steps(q, step, rows_step, 0)
            return carry

        jax.lax.fori_loop(0, count, tile, 0)

    j = t0 + jax.lax.broadcasted_iota(jnp.int32, (q,), 0)
    _ddt_rows(ddtc_ref, ddt_ref, t0, j, q=q, seqlen=seqlen, nh=nh, nd=nd, col=ds)


# --------------------------------------------------------------------------------------------
# pallas_call wrappers; cfg = (ngroups, d_state, out dtype name, (Tiles fwd, Tiles bwd),
# interpret, (xbc offset, dt offset, nheads)); ws, bs = the nd weights and
# biases. xbc and dt may be wider arrays (the input projection's whole output) holding xBC at
# columns [xo, xo + C) and dt at [do, do + H).
# --------------------------------------------------------------------------------------------


def _statics(xbc, dt, ws, cfg, tiles):
    ng, n = cfg[:2]
    xo, do, nh = cfg[5]
    bsz, seqlen = xbc.shape[:2]
    c = ws[0].shape[1]
    p = (c - 2 * ng * n) // nh
    kw = dict(q=tiles.rows, seqlen=seqlen, nh=nh, p=p, ng=ng, n=n, k_width=ws[0].shape[0],
              nd=len(ws), cols=tiles.cols, step=tiles.step or tiles.rows, xo=xo, do=do)
    return bsz, seqlen, c, nh, p, kw


def _specs(seqlen, q, k_width, c):
    """BlockSpec makers over grid (batch, row block[, column split]): a batch row's whole
    sequence, its row block of q rows (trailing dims `*tail` whole; the column splits of a row
    block share it and write disjoint columns), the (k_width, c) weights, the (c,) biases."""
    def seq(*tail):
        return pl.BlockSpec((None, seqlen, *tail), lambda bi, ti, *_: (bi, 0) + (0,) * len(tail))

    def rows(*tail):
        return pl.BlockSpec((None, q, *tail), lambda bi, ti, *_: (bi, ti) + (0,) * len(tail))

    return (seq, rows, pl.BlockSpec((k_width, c), lambda bi, ti, *_: (0, 0)),
            pl.BlockSpec((c,), lambda bi, ti, *_: (0,)))


def _name(nd, part):
    return f"{'bidir_' if nd == 2 else ''}conv_{part}"


def fwd_call(xbc, dt, ws, bs, cfg):
    """The forward kernel: (x, B, C, dt_cat) as the public functions return them."""
    ng, n, out_dtype, (tiles, _), interpret, _ = cfg
    bsz, seqlen, c, nh, p, kw = _statics(xbc, dt, ws, cfg, tiles)
    nd, dtype, q = len(ws), jnp.dtype(out_dtype), tiles.rows
    if tiles.kernel == "mosaic":
        x, bm, cm = mosaic_conv.conv_fwd_mosaic(xbc, ws, bs, ngroups=ng, d_state=n,
                                                xo=kw["xo"], dtype=dtype, interpret=interpret,
                                                min_programs=tiles.programs)
        dts = dt[..., kw["do"]:kw["do"] + nh].astype(jnp.float32)
        dtc = jnp.concatenate([dts, jnp.flip(dts, axis=1)], axis=2) if nd == 2 else dts
        return (x.reshape(bsz, seqlen, nd * nh, p), bm.reshape(bsz, seqlen, nd * ng, n),
                cm.reshape(bsz, seqlen, nd * ng, n), dtc)
    ntiles = sum(count for _, _, count, _ in _column_tiles(nh, p, ng, n, tiles.cols))
    splits = split_count(tiles.programs, bsz * (seqlen // q), ntiles)
    seq, rows, mat, vec = _specs(seqlen, q, ws[0].shape[0], c)
    x, bm, cm, dtc = pl.pallas_call(
        functools.partial(_fwd_kernel, splits=splits, **kw),
        out_shape=(jax.ShapeDtypeStruct((bsz, seqlen, nd * nh * p), dtype),
                   jax.ShapeDtypeStruct((bsz, seqlen, nd * ng * n), dtype),
                   jax.ShapeDtypeStruct((bsz, seqlen, nd * ng * n), dtype),
                   jax.ShapeDtypeStruct((bsz, seqlen, nd * nh), jnp.float32)),
        grid=(bsz, seqlen // q, splits),
        in_specs=[seq(xbc.shape[-1]), seq(dt.shape[-1])] + [mat] * nd + [vec] * nd,
        out_specs=(rows(nd * nh * p), rows(nd * ng * n), rows(nd * ng * n), rows(nd * nh)),
        compiler_params=compiler_params(tiles, interpret),
        interpret=interpret,
        name=_name(nd, "fwd"),
    )(xbc, dt, *ws, *bs)
    return (x.reshape(bsz, seqlen, nd * nh, p), bm.reshape(bsz, seqlen, nd * ng, n),
            cm.reshape(bsz, seqlen, nd * ng, n), dtc)


def bwd_call(xbc, dt, ws, bs, dx, dbm, dcm, ddtc, cfg, into=None):
    """The two backward kernels: (dxbc (b, L, C) in xbc.dtype, ddt (b, L, H) in dt.dtype,
    weight / bias partial sums (b, L/T, nd, K + 1, C) float32). With `into` (a (b, L, W)
    array, W the width of xbc, which must be dt itself: the projection's output read at both
    offsets) the second kernel writes dxbc and ddt into that array's xBC and dt columns in
    place (aliased) and returns it as one (b, L, W) gradient, with every other column as it
    was: (buffer, None, sums). cfg: this module's."""
    ng, n, _, (_, tiles), interpret, _ = cfg
    bsz, seqlen, c, nh, p, kw = _statics(xbc, dt, ws, cfg, tiles)
    q = tiles.rows
    nd, k_width, nt = len(ws), ws[0].shape[0], seqlen // q
    ntiles = sum(count for _, _, count, _ in _column_tiles(nh, p, ng, n, tiles.cols))
    splits = split_count(tiles.programs, bsz * nt, ntiles)
    seq, rows, mat, vec = _specs(seqlen, q, k_width, c)
    params = compiler_params(tiles, interpret)
    dx, dbm, dcm = (v.reshape(bsz, seqlen, -1) for v in (dx, dbm, dcm))
    if tiles.kernel == "mosaic":  # g's backward half in original time
        g_time = "original"
        g, dw = mosaic_conv.conv_bwd_g_mosaic(xbc, ws, bs, dx, dbm, dcm, ngroups=ng, d_state=n,
                                              xo=kw["xo"], interpret=interpret)
    else:  # in scan time
        g_time = "scan"
        g, dw = pl.pallas_call(
            functools.partial(_bwd_g_kernel, splits=splits, sums=tiles.sums, **kw),
            out_shape=(jax.ShapeDtypeStruct((bsz, seqlen, nd, c), xbc.dtype),
                       jax.ShapeDtypeStruct((bsz, nt, nd, k_width + 1, c), jnp.float32)),
            grid=(bsz, nt, splits),
            in_specs=[seq(xbc.shape[-1])] + [mat] * nd + [vec] * nd
            + [rows(nd * nh * p), rows(nd * ng * n), rows(nd * ng * n)],
            out_specs=(rows(nd, c), pl.BlockSpec((None, None, nd, k_width + 1, c),
                                                 lambda bi, ti, *_: (bi, ti, 0, 0, 0))),
            compiler_params=params,
            interpret=interpret,
            name=_name(nd, "bwd_g"),
        )(xbc, *ws, *bs, dx, dbm, dcm)
    if into is not None:
        width = into.shape[-1]
        if into.shape != (bsz, seqlen, width) or xbc is not dt or xbc.shape[-1] != width:
            raise ValueError(f"bwd_call: into {into.shape} must be the (batch, L, W) gradient of "
                             f"the one array read as xbc and dt, {xbc.shape}")
        (buf,) = pl.pallas_call(
            functools.partial(_bwd_dx_kernel, into=True, g_time=g_time, **kw),
            out_shape=(jax.ShapeDtypeStruct(into.shape, into.dtype),),
            grid=(bsz, nt),
            in_specs=[seq(nd, c)] + [mat] * nd + [seq(nd * nh), rows(width)],
            out_specs=(rows(width),),
            input_output_aliases={nd + 2: 0},
            compiler_params=params,
            interpret=interpret,
            name=_name(nd, "bwd_dx"),
        )(g, *ws, ddtc.astype(jnp.float32), into)
        return buf, None, dw
    dxbc, ddt = pl.pallas_call(
        functools.partial(_bwd_dx_kernel, g_time=g_time, **kw),
        out_shape=(jax.ShapeDtypeStruct((bsz, seqlen, c), xbc.dtype),
                   jax.ShapeDtypeStruct((bsz, seqlen, nh), dt.dtype)),
        grid=(bsz, nt),
        in_specs=[seq(nd, c)] + [mat] * nd + [seq(nd * nh)],
        out_specs=(rows(c), rows(nh)),
        compiler_params=params,
        interpret=interpret,
        name=_name(nd, "bwd_dx"),
    )(g, *ws, ddtc.astype(jnp.float32))
    return dxbc, ddt, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(xbc, dt, ws, bs, cfg):
    return fwd_call(xbc, dt, ws, bs, cfg)


def _fused_fwd(xbc, dt, ws, bs, cfg):
    return fwd_call(xbc, dt, ws, bs, cfg), (xbc, dt, ws, bs)


def _widen(v, offset, width):
    """v (b, L, c) placed at columns [offset, offset + c) of zeros (b, L, width); v itself
    when it is the whole width."""
    c = v.shape[-1]
    if (offset, width) == (0, c):
        return v
    return jnp.pad(v, ((0, 0), (0, 0), (offset, width - offset - c)))


def _fused_bwd(cfg, res, cts):
    xbc, dt, ws, bs = res
    dxbc, ddt, dw = bwd_call(xbc, dt, ws, bs, *cts, cfg)
    xo, do, _ = cfg[5]
    dxbc, ddt = _widen(dxbc, xo, xbc.shape[-1]), _widen(ddt, do, dt.shape[-1])
    dw = jnp.sum(dw, axis=(0, 1))  # (nd, K + 1, C)
    k_width = ws[0].shape[0]
    return (dxbc, ddt, tuple(dw[h, :k_width].astype(w.dtype) for h, w in enumerate(ws)),
            tuple(dw[h, k_width].astype(b.dtype) for h, b in enumerate(bs)))


_fused.defvjp(_fused_fwd, _fused_bwd)
# jitted, so the many calls of one shape in a model (every layer) share one lowered copy
_fused_call = jax.jit(_fused, static_argnums=(4,))


def _call(xbc, dt, ws, bs, ngroups, d_state, dtype, interpret, tiles, packed=(0, 0, None),
          config_only=False):
    """Checks the sizes and tile arguments and runs the custom VJP (with config_only: returns
    its cfg); tiles = the keyword arguments of `triton_common.kernel_tiles` but seqlen; packed =
    (xbc_offset, dt_offset, nheads) of the public functions."""
    xo, do, nh = (int(v) if v is not None else None for v in packed)
    c = ws[0].shape[1]
    if xbc.ndim == 3 and dt.ndim == 3:
        nh = nh or dt.shape[-1] - do
        if xo < 0 or xo + c > xbc.shape[-1] or do < 0 or nh <= 0 or do + nh > dt.shape[-1]:
            raise ValueError(f"xbc_offset {xo} + conv_dim {c} must fit xbc's {xbc.shape[-1]} "
                             f"columns and dt_offset {do} + nheads {nh} dt's {dt.shape[-1]}")
    part = lambda a, w: (jax.ShapeDtypeStruct((*a.shape[:-1], w), a.dtype)  # noqa: E731
                         if a.ndim == 3 else a)
    _, p = _dims(part(xbc, c), part(dt, nh), ws[0], ws[-1], bs[0], bs[-1], ngroups, d_state)
    error = conv_size_error(p, d_state)
    dtype = jnp.dtype(dtype or xbc.dtype)
    cfg = (int(ngroups), int(d_state), dtype.name, kernel_tiles(xbc.shape[1], **tiles),
           bool(interpret), (xo, do, nh))
    if error:
        raise ValueError(error)
    if (not interpret and not hopper.on_hopper_gpu()) or mosaic_conv.size_error(
            xbc.shape[1], c - 2 * ngroups * d_state, ngroups * d_state, xo,
            jnp.dtype(xbc.dtype).itemsize, bool(interpret), ws[0].shape[0]):
        cfg = cfg[:3] + (tuple(t._replace(kernel="triton") for t in cfg[3]),) + cfg[4:]
    return cfg if config_only else _fused_call(xbc, dt, tuple(ws), tuple(bs), cfg)


def kernel_config(xbc, dt, ws, bs, *, ngroups: int, d_state: int, dtype, interpret: bool,
                  xbc_offset: int = 0, dt_offset: int = 0, nheads: int | None = None,
                  forward_kernel: str = "triton", backward_kernel: str = "triton") -> tuple:
    """The cfg `fwd_call` and `bwd_call` take (after the public functions' size checks), at
    the default tiles of `bidirectional_conv_pallas` (two weights) or `causal_conv_pallas`
    (one), with the forward run by `forward_kernel` and the backward's first kernel by
    `backward_kernel`."""
    fn = bidirectional_conv_pallas if len(ws) == 2 else causal_conv_pallas
    tiles = dict(default_tiles(fn), forward_kernel=forward_kernel,
                 backward_kernel=backward_kernel)
    return _call(xbc, dt, tuple(ws), tuple(bs), ngroups, d_state, dtype, interpret, tiles,
                 (xbc_offset, dt_offset, nheads), config_only=True)


def bidirectional_conv_pallas(xbc, dt, w_f, w_b, bias_f, bias_b, *, ngroups: int, d_state: int,
                              dtype=None, interpret: bool = False,
                              block_rows: int = DEFAULT_BLOCK_ROWS, num_warps: int = 4,
                              block_rows_bwd: int = BWD_BLOCK_ROWS,
                              num_warps_bwd: int = BWD_NUM_WARPS, num_stages: int = 1,
                              num_stages_bwd: int | None = None, block_cols: int = 0,
                              block_cols_bwd: int | None = None, step_rows: int = 0,
                              step_rows_bwd: int | None = BWD_STEP_ROWS,
                              min_programs: int = DEFAULT_MIN_PROGRAMS,
                              min_programs_bwd: int = BWD_MIN_PROGRAMS,
                              sums_bwd: str = BWD_SUMS, forward_kernel: str = "triton",
                              backward_kernel: str = "triton",
                              xbc_offset: int = 0, dt_offset: int = 0, nheads: int | None = None):
    """The fused prologue (Pallas kernels, custom VJP); same math, arguments and outputs as
    `bidirectional_conv_xla`.

    Args (beyond the reference's):
      interpret: run the kernels in the Pallas interpreter (any device; CPU tests).
      block_rows: time rows per program, rounded down to a power of two dividing seqlen.
      num_warps: warps per Triton program.
      block_rows_bwd, num_warps_bwd: the same for both backward kernels (None = the
        forward's); defaults: `BWD_*` above.
      num_stages, num_stages_bwd: Triton pipeline stages of the loops over column tiles
        (forward; backward, None = the forward's); 1 = no software pipelining.
      block_cols, block_cols_bwd: columns per tile (0 = headdim for x, d_state for B and C;
        else a power of two, narrowed to divide each region; backward None = the forward's).
      step_rows, step_rows_bwd: time rows per inner step of a program (0 = all its rows in one
        step; else a power of two, at most the program's rows; backward None = the forward's):
        each column tile's weights load once per program, and the backward sums the weight
        gradients over the steps in registers (fewer, larger programs with small tiles).
      min_programs: the forward's grid target: where batch x row blocks falls short of it
        (batch 1 in the sampler: 64 programs, each walking every column tile), a third grid
        axis splits the column tiles over programs (`triton_common.split_count`); 1 = never.
        The Mosaic forward takes fewer rows per program instead (`mosaic_conv.fwd_rows`).
      min_programs_bwd: the same grid target for the backward's first kernel (the one that
        sums the weight gradients); 1 = batch x row blocks.
      sums_bwd: how that kernel sums the weight gradients over its row steps (`Tiles.sums`):
        "step" or "tile" (elementwise over the steps, one reduction per column tile; for
        programs of many rows in small steps).
      forward_kernel: "triton" (the forward kernel above, shaped by the forward tile
        arguments) or "mosaic" (`mosaic_conv.conv_fwd_mosaic`: one Mosaic GPU program per
        64-row block and column tile, TMA in and out, dt_cat by jnp; Hopper, or the Mosaic GPU
        interpreter with `interpret`; on another device, or where it does not take the sizes
        (`mosaic_conv.size_error`), the Triton forward runs).
      backward_kernel: the backward's first kernel (g and the weight sums): "triton" (shaped
        by the backward tile arguments) or "mosaic" (`mosaic_conv.conv_bwd_g_mosaic`, the
        same program shape and fallback as the Mosaic forward). The second kernel (dxbc, ddt)
        is the Triton one either way.
      xbc_offset, dt_offset, nheads: xbc and dt may be wider arrays, e.g. both the input
        projection's whole output [z | xBC | dt]: the kernels read xBC from columns
        [xbc_offset, xbc_offset + conv_dim) (conv_dim = the weights' width) and dt from
        [dt_offset, dt_offset + nheads) (nheads None = dt's width - dt_offset), so no slice
        of them is copied; their gradients are then those arrays' widths, zero elsewhere.
    Constraints: headdim and d_state powers of two (the kernels' tiles are (rows, headdim) and
    (rows, d_state) at the natural width).
    Returns:
      (x_cat, B_cat, C_cat, dt_cat) as the reference. Gradients: xbc (xbc.dtype), dt (dt.dtype),
      w_f, w_b, bias_f, bias_b (their dtypes).
    """
    tiles = dict(block_rows=block_rows, num_warps=num_warps, block_rows_bwd=block_rows_bwd,
                 num_warps_bwd=num_warps_bwd, num_stages=num_stages,
                 num_stages_bwd=num_stages_bwd, block_cols=block_cols,
                 block_cols_bwd=block_cols_bwd, step_rows=step_rows, step_rows_bwd=step_rows_bwd,
                 min_programs=min_programs, min_programs_bwd=min_programs_bwd, sums_bwd=sums_bwd,
                 forward_kernel=forward_kernel, backward_kernel=backward_kernel)
    return _call(xbc, dt, (w_f, w_b), (bias_f, bias_b), ngroups, d_state, dtype, interpret,
                 tiles, (xbc_offset, dt_offset, nheads))


def causal_conv_pallas(xbc, dt, w, bias, *, ngroups: int, d_state: int, dtype=None,
                       interpret: bool = False, block_rows: int = 8, num_warps: int = 4,
                       block_rows_bwd: int = 64, num_warps_bwd: int = 8, num_stages: int = 3,
                       num_stages_bwd: int | None = 1, block_cols: int = 0,
                       block_cols_bwd: int | None = 512, step_rows: int = 0,
                       step_rows_bwd: int | None = 16,
                       min_programs: int = DEFAULT_MIN_PROGRAMS,
                       min_programs_bwd: int = 1, sums_bwd: str = "step",
                       forward_kernel: str = "triton", backward_kernel: str = "triton",
                       xbc_offset: int = 0, dt_offset: int = 0, nheads: int | None = None):
    """The causal mixer's prologue as the same kernels with one direction (custom VJP); same math,
    arguments and outputs as `causal_conv_xla`; the tile, min_programs(_bwd), sums_bwd,
    forward_kernel, backward_kernel and packing (xbc_offset, dt_offset, nheads) arguments as
    `bidirectional_conv_pallas`. The
    default tiles were the fastest forward + backward that `benchmarks.fused_bench` found at
    configs/ar_base.py's mixer on an H100, 0.348 ms against 0.482 ms at the bidirectional
    kernels' defaults (benchmarks/results/fused_bench_ar_h100.md). Constraints: headdim and
    d_state powers of two.
    Returns:
      (x (batch, L, nheads, headdim), B, C (batch, L, ngroups, d_state)) in `dtype`, dt float32
      (batch, L, nheads). Gradients: xbc, dt, w, bias (their dtypes).
    """
    tiles = dict(block_rows=block_rows, num_warps=num_warps, block_rows_bwd=block_rows_bwd,
                 num_warps_bwd=num_warps_bwd, num_stages=num_stages,
                 num_stages_bwd=num_stages_bwd, block_cols=block_cols,
                 block_cols_bwd=block_cols_bwd, step_rows=step_rows, step_rows_bwd=step_rows_bwd,
                 min_programs=min_programs, min_programs_bwd=min_programs_bwd, sums_bwd=sums_bwd,
                 forward_kernel=forward_kernel, backward_kernel=backward_kernel)
    return _call(xbc, dt, (w,), (bias,), ngroups, d_state, dtype, interpret, tiles,
                 (xbc_offset, dt_offset, nheads))
