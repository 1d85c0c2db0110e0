"""The epilogue of the Mamba-2 mixer (gate + grouped RMS norm) as Pallas kernels: both directions
of the bidirectional mixer with shared projections, or the causal mixer's one.

With the SSD output of both directions in one array y (b, L, 2H, P) (heads [0, H) the forward
direction in normal time, heads [H, 2H) the backward direction in scan time, i.e. flipped),
the gate z (b, L, D), D = H * P, and the two gated-norm weights w_f, w_b (D,):

    s = silu(z[b, t])
    out[b, t] = 0.5 * ( N(y_f[b, t] * s) * w_f + N(y_b[b, L-1-t] * s) * w_b )

N normalises each of `ngroups` groups of D / ngroups channels by its RMS (eps inside the square
root), in float32. Each half is rounded to the output dtype before the mean, as the XLA path
does (so the forward results agree to the last bit up to float32 summation order).

`bidirectional_gated_norm_xla` is that math in jnp (what `BidirectionalMamba2` computes);
`bidirectional_gated_norm_pallas` is the fused Pallas kernel (Triton backend, or the Pallas
interpreter with `interpret=True`) with a custom VJP. The flip of the backward half is row
arithmetic inside the kernels (row L-1-t is read in the forward, written in the backward). The
backward recomputes the gate and normalised values from the inputs and the saved per-row
rstd (b, 2 * ngroups, L) float32; it also keeps the output (the out projection's input, saved
anyway), which the causal backward's first pass reads.
The causal mixer's gated norm is the same kernels with one direction (`gated_norm_pallas`:
out = N(y * s) * w, no flip, no mean; its reference is `gated_norm_xla`); kernel names
then drop "bidir_". At a small batch (the sampler's denoiser at batch 1) the forward takes fewer,
wider rows per program (`min_programs`), so its grid still fills the GPU.

Backward, per half and group (n = g * rstd, do = 0.5 * dout, dn = do * w, m = mean(dn * n)):
    dw = sum_rows(do * n);  dg = rstd * (dn - n * m);  dy = dg * s
    dz = (dg_f * y_f + dg_b * y_b') * silu'(z),  silu'(z) = sig(z) * (1 + z * (1 - sig(z)))
With one direction dn * n = dout * out, so the causal backward's first pass takes m from
(dout, out) and reads neither y nor z.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dimba_jax.layers.norms import gated_rms_norm
from dimba_jax.layers.triton_common import (DEFAULT_BLOCK_ROWS, DEFAULT_MIN_PROGRAMS,
                                            compiler_params, default_tiles, is_power_of_two,
                                            kernel_tiles, narrower_rows, tile_width)


def _check(y, z, w_f, w_b, ngroups, z_offset=0):
    if y.ndim != 4 or y.shape[2] % 2:
        raise ValueError(f"y must be (batch, seqlen, 2*nheads, headdim), got {y.shape}")
    bsz, seqlen, h2, p = y.shape
    d = h2 // 2 * p
    if z.ndim == 3 and (z_offset or z.shape[-1] != d):
        _check_offset(z, d, z_offset)
        z = jax.ShapeDtypeStruct((bsz, seqlen, d), z.dtype)
    if z.shape != (bsz, seqlen, d) or w_f.shape != (d,) or w_b.shape != (d,):
        raise ValueError(f"expected z {(bsz, seqlen, d)} and weights ({d},); got "
                         f"{z.shape}, {w_f.shape}, {w_b.shape}")
    if ngroups <= 0 or (h2 // 2) % ngroups:
        raise ValueError(f"nheads {h2 // 2} must be divisible by ngroups {ngroups}")


def _check_offset(z, d, z_offset):
    if z.ndim != 3 or z_offset < 0 or z_offset + d > z.shape[-1]:
        raise ValueError(f"z_offset {z_offset} + d_inner {d} must fit z's columns, got z "
                         f"{z.shape}")


def norm_size_error(headdim: int) -> str:
    """Why the fused kernels cannot take this head size, "" if they can: their tiles are
    (rows, headdim), so headdim is a power of two."""
    if not is_power_of_two(headdim):
        return f"the fused gated norm needs headdim a power of two, got {headdim}"
    return ""


def bidirectional_gated_norm_xla(y, z, w_f, w_b, *, ngroups: int = 1, eps: float = 1e-5,
                                 dtype=None):
    """The reference epilogue in jnp (the module docstring's math).

    Args:
      y: (batch, L, 2*nheads, headdim) SSD output, backward half in scan (flipped) time.
      z: (batch, L, d_inner) gate, d_inner = nheads * headdim.
      w_f, w_b: (d_inner,) norm weights of the forward / backward direction.
      ngroups: normalisation groups over d_inner (nheads % ngroups == 0).
      eps: added to each group's mean square.
      dtype: output dtype (default y.dtype); also the dtype y is cast to first.
    Returns:
      (batch, L, d_inner) in `dtype`.
    """
    _check(y, z, w_f, w_b, ngroups)
    bsz, seqlen, h2, _ = y.shape
    dtype = dtype or y.dtype
    d = z.shape[-1]
    y_f = y[:, :, :h2 // 2].reshape(bsz, seqlen, d).astype(dtype)
    y_b = jnp.flip(y[:, :, h2 // 2:], axis=1).reshape(bsz, seqlen, d).astype(dtype)
    n_f = gated_rms_norm(y_f, z, w_f, ngroups=ngroups, eps=eps, dtype=dtype)
    n_b = gated_rms_norm(y_b, z, w_b, ngroups=ngroups, eps=eps, dtype=dtype)
    return (n_f + n_b) * 0.5


def gated_norm_xla(y, z, w, *, ngroups: int = 1, eps: float = 1e-5, dtype=None):
    """The causal mixer's epilogue in jnp (what `Mamba2` computes): y (batch, L, nheads,
    headdim), z (batch, L, d_inner), w (d_inner,) -> gated_rms_norm of y cast to `dtype`
    (default y.dtype), (batch, L, d_inner) in `dtype`."""
    dtype = dtype or y.dtype
    return gated_rms_norm(y.reshape(*y.shape[:2], -1).astype(dtype), z, w, ngroups=ngroups,
                          eps=eps, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Kernels, for nd = 2 directions (the bidirectional epilogue) or nd = 1 (the causal mixer's
# gated norm). One program: batch row bi, output time rows [t0, t0 + T). ys_ref is the whole
# (L, nd*H, P) sequence of batch bi; the forward half reads rows t0 + i, the backward half rows
# L - 1 - t0 - i. Heads are visited group by group with a loop of P-wide tiles (T, P).
# --------------------------------------------------------------------------------------------


def _silu_parts(z):
    sig = jax.nn.sigmoid(z)
    return z * sig, sig


def _rows(t0, q, seqlen, nd):
    """The rows each direction reads for output rows [t0, t0 + q): the forward's pl.ds, and
    with nd = 2 the backward's (q,) int32 rows L - 1 - t0 - i."""
    i = jax.lax.broadcasted_iota(jnp.int32, (q,), 0)
    return (pl.ds(t0, q), (seqlen - 1 - t0) - i)[:nd]


def _tile_loop(count: int, body, init, cached: bool):
    """body(j, carry) -> carry over a group's column tiles j = 0 .. count-1: a fori_loop, or
    with `cached` a Python loop (j a Python int indexing the tiles loaded beforehand)."""
    if not cached:
        return jax.lax.fori_loop(0, count, body, init)
    for j in range(count):
        init = body(j, init)
    return init


def _fwd_kernel(ys_ref, z_ref, *refs, q, seqlen, d, ngroups, eps, nd, w, zo, passes=2):
    """ys_ref: (L, nd*D) of batch bi (direction-major); z_ref: (q, W) rows holding the gate at
    columns [zo, zo + D); refs: nd weight refs (D,), then o_ref (q, D) and rstd_ref (nd * G, q)
    float32. w: columns per tile (divides D / G). passes: 2 = a group's tiles read from memory
    twice (sums of squares, then the outputs); 1 = read once and kept (as loaded) for both."""
    f32 = jnp.float32
    w_refs, (o_ref, rstd_ref) = refs[:nd], refs[nd:]
    rows = _rows(pl.program_id(1) * q, q, seqlen, nd)
    per_group = d // ngroups
    hpg = per_group // w  # tiles per group

    def load(h):
        return (z_ref[:, pl.ds(zo + h * w, w)],
                [ys_ref[r, pl.ds(k * d + h * w, w)] for k, r in enumerate(rows)])

    def gated(raw):
        s, _ = _silu_parts(raw[0].astype(f32))
        return [y.astype(f32) * s for y in raw[1]]

    for gi in range(ngroups):
        cache = [load(gi * hpg + j) for j in range(hpg)] if passes == 1 else None
        raw = (lambda j: load(gi * hpg + j)) if cache is None else cache.__getitem__

        def sumsq(j, acc):
            return tuple(a + jnp.sum(g * g, axis=1) for a, g in zip(acc, gated(raw(j))))

        ss = _tile_loop(hpg, sumsq, (jnp.zeros((q,), f32),) * nd, cache is not None)
        rs = [jax.lax.rsqrt(v / per_group + eps) for v in ss]
        for k, r in enumerate(rs):
            rstd_ref[k * ngroups + gi, :] = r

        def write(j, carry):
            cols = pl.ds((gi * hpg + j) * w, w)
            outs = [(g * r[:, None] * wr[cols].astype(f32)[None, :]).astype(o_ref.dtype)
                    for g, r, wr in zip(gated(raw(j)), rs, w_refs)]
            if nd == 2:  # each half rounded to the output dtype, then the mean
                outs = [((outs[0].astype(f32) + outs[1].astype(f32)) * 0.5).astype(o_ref.dtype)]
            o_ref[:, cols] = outs[0]
            return carry

        _tile_loop(hpg, write, 0, cache is not None)


def _bwd_kernel(ys_ref, z_ref, *refs, q, seqlen, d, ngroups, nd, w, zo, dzo=0, passes=2,
                from_out=False):
    """ys_ref: (L, nd*D) of batch bi; z_ref: (q, W) rows holding the gate at columns
    [zo, zo + D); refs: nd weight refs (D,), rstd_ref (nd * G, q), do_ref
    (q, D), with `from_out` o_ref (q, D) the forward's output, then the outputs dys_ref
    (L, nd*D) of batch bi (rows of each half written as read in the forward), dz_ref (q, D),
    or (q, W') holding dz at columns [dzo, dzo + D) and nothing else, and dw_ref (nd, D): this
    program's partial sums of the weights' gradients. w: columns per tile. passes: as
    `_fwd_kernel`'s (the row sums m, then the gradients). from_out (nd 1, passes 2): the first
    pass reads (dout, out) instead of (y, z, dout), m = mean(dout * w * n) = mean(dout * out),
    and the weight's gradient moves to the second pass."""
    f32 = jnp.float32
    w_refs, rest = refs[:nd], refs[nd:]
    if from_out:
        rstd_ref, do_ref, o_ref, dys_ref, dz_ref, dw_ref = rest
    else:
        (rstd_ref, do_ref, dys_ref, dz_ref, dw_ref), o_ref = rest, None
    rows = _rows(pl.program_id(1) * q, q, seqlen, nd)
    per_group = d // ngroups
    hpg = per_group // w
    half = 0.5 if nd == 2 else 1.0  # the mean's factor

    def load(h):
        return (z_ref[:, pl.ds(zo + h * w, w)],
                [ys_ref[r, pl.ds(k * d + h * w, w)] for k, r in enumerate(rows)],
                do_ref[:, pl.ds(h * w, w)])

    for gi in range(ngroups):
        rs = [rstd_ref[k * ngroups + gi, :] for k in range(nd)]
        cache = [load(gi * hpg + j) for j in range(hpg)] if passes == 1 else None
        raw = (lambda j: load(gi * hpg + j)) if cache is None else cache.__getitem__

        def tile_cols(j):
            return pl.ds((gi * hpg + j) * w, w)

        def tiles(j):
            z_raw, y_raw, do_raw = raw(j)
            cols = tile_cols(j)
            z = z_raw.astype(f32)
            s, sig = _silu_parts(z)
            ys = [y.astype(f32) for y in y_raw]
            ns = [y * s * r[:, None] for y, r in zip(ys, rs)]
            do = do_raw.astype(f32) * half
            dns = [do * wr[cols].astype(f32)[None, :] for wr in w_refs]
            return cols, z, s, sig, ys, ns, do, dns

        def dots(j, acc):
            if o_ref is not None:
                cols = tile_cols(j)
                do_o = do_ref[:, cols].astype(f32) * o_ref[:, cols].astype(f32)
                return (acc[0] + jnp.sum(do_o, axis=1),)
            cols, _, _, _, _, ns, do, dns = tiles(j)
            for k, n in enumerate(ns):
                dw_ref[k, cols] = jnp.sum(do * n, axis=0)
            return tuple(a + jnp.sum(dn * n, axis=1) for a, dn, n in zip(acc, dns, ns))

        cs = _tile_loop(hpg, dots, (jnp.zeros((q,), f32),) * nd, cache is not None)
        cs = [c / per_group for c in cs]

        def write(j, carry):
            h = gi * hpg + j
            cols, z, s, sig, ys, ns, do, dns = tiles(j)
            if o_ref is not None:
                dw_ref[0, cols] = jnp.sum(do * ns[0], axis=0)
            dz = 0.0
            for k, r in enumerate(rows):
                dg = rs[k][:, None] * (dns[k] - ns[k] * cs[k][:, None])
                dys_ref[r, pl.ds(k * d + h * w, w)] = (dg * s).astype(dys_ref.dtype)
                dz = dz + dg * ys[k]
            dsilu = sig * (1.0 + z * (1.0 - sig))
            dz_ref[:, pl.ds(dzo + h * w, w)] = (dz * dsilu).astype(dz_ref.dtype)
            return carry

        _tile_loop(hpg, write, 0, cache is not None)


# --------------------------------------------------------------------------------------------
# pallas_call wrappers; cfg = (ngroups, eps, out dtype name, (Tiles fwd, Tiles bwd),
# interpret, z offset); ws = the nd weights. The kernels see y as (b, L, nd*D);
# z may be a wider array (the input projection's whole output) holding the gate at columns
# [z offset, z offset + D).
# --------------------------------------------------------------------------------------------


def _specs(seqlen, d, q, ngroups, nd):
    seq = pl.BlockSpec((None, seqlen, nd * d), lambda bi, ti: (bi, 0, 0))

    def rows(width=d):
        return pl.BlockSpec((None, q, width), lambda bi, ti: (bi, ti, 0))

    vec = pl.BlockSpec((d,), lambda bi, ti: (0,))
    rstd = pl.BlockSpec((None, nd * ngroups, q), lambda bi, ti: (bi, 0, ti))
    return seq, rows, vec, rstd


def _name(nd, part):
    return f"{'bidir_' if nd == 2 else ''}gated_norm_{part}"


def _width(y, d, ngroups, tiles):
    """Columns per tile: headdim, or tiles.cols narrowed to divide a group's d / ngroups."""
    return tile_width(d // ngroups, y.shape[-1], tiles.cols)


def fwd_call(y, z, ws, cfg):
    """The forward kernel: (out (b, L, D) in cfg's dtype, rstd (b, nd*G, L) float32)."""
    ngroups, eps, out_dtype, (tiles, _), interpret, zo = cfg
    bsz, seqlen = y.shape[:2]
    tiles = narrower_rows(tiles, bsz, seqlen)
    nd, q = len(ws), tiles.rows
    d = ws[0].shape[0]
    seq, rows, vec, rstd = _specs(seqlen, d, q, ngroups, nd)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, q=q, seqlen=seqlen, d=d, ngroups=ngroups, eps=eps, nd=nd,
                          w=_width(y, d, ngroups, tiles), zo=zo, passes=tiles.passes),
        out_shape=(jax.ShapeDtypeStruct((bsz, seqlen, d), jnp.dtype(out_dtype)),
                   jax.ShapeDtypeStruct((bsz, nd * ngroups, seqlen), jnp.float32)),
        grid=(bsz, seqlen // q),
        in_specs=[seq, rows(z.shape[-1])] + [vec] * nd,
        out_specs=(rows(), rstd),
        compiler_params=compiler_params(tiles, interpret),
        interpret=interpret,
        name=_name(nd, "fwd"),
    )(y.reshape(bsz, seqlen, nd * d), z, *ws)


def bwd_call(y, z, ws, rstd, dout, cfg, dz_wide: bool = False, out=None):
    """The backward kernel: (dy (y's shape, y.dtype), dz, dw partial sums (b, L/T, nd, D)
    float32). dz is (b, L, D) in z.dtype, or with dz_wide z's full width with dz at z's gate
    columns and every other column left unwritten (for a caller whose next kernel writes
    them, `fused_mixer`). out: the forward's output (b, L, D), or None; where given with one
    direction and two passes, the kernel's first pass reads (dout, out) instead of (y, z,
    dout) (`_bwd_kernel`'s from_out). cfg: this module's (ngroups, eps, dtype name, tiles,
    interpret, z offset)."""
    ngroups, _, _, (_, tiles), interpret, zo = cfg
    nd, q = len(ws), tiles.rows
    from_out = out is not None and nd == 1 and tiles.passes == 2
    bsz, seqlen = y.shape[:2]
    d = ws[0].shape[0]
    nt = seqlen // q
    seq, rows, vec, rstd_spec = _specs(seqlen, d, q, ngroups, nd)
    dz_width = z.shape[-1] if dz_wide else d
    # Each program writes its own rows of the (L, nd*D) block of its batch element: programs
    # of one batch element share that output block but never an element of it.
    dy, dz, dw = pl.pallas_call(
        functools.partial(_bwd_kernel, q=q, seqlen=seqlen, d=d, ngroups=ngroups, nd=nd,
                          w=_width(y, d, ngroups, tiles), zo=zo, dzo=zo if dz_wide else 0,
                          passes=tiles.passes, from_out=from_out),
        out_shape=(jax.ShapeDtypeStruct((bsz, seqlen, nd * d), y.dtype),
                   jax.ShapeDtypeStruct((bsz, seqlen, dz_width), z.dtype),
                   jax.ShapeDtypeStruct((bsz, nt, nd, d), jnp.float32)),
        grid=(bsz, nt),
        in_specs=[seq, rows(z.shape[-1])] + [vec] * nd + [rstd_spec] + [rows()] * (1 + from_out),
        out_specs=(seq, rows(dz_width),
                   pl.BlockSpec((None, None, nd, d), lambda bi, ti: (bi, ti, 0, 0))),
        compiler_params=compiler_params(tiles, interpret),
        interpret=interpret,
        name=_name(nd, "bwd"),
    )(y.reshape(bsz, seqlen, nd * d), z, *ws, rstd, dout, *((out,) if from_out else ()))
    return dy.reshape(y.shape), dz, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(y, z, ws, cfg):
    return fwd_call(y, z, ws, cfg)[0]


def _fused_fwd(y, z, ws, cfg):
    out, rstd = fwd_call(y, z, ws, cfg)
    return out, (y, z, ws, rstd, out)


def _fused_bwd(cfg, res, dout):
    y, z, ws, rstd, out = res
    dy, dz, dw = bwd_call(y, z, ws, rstd, dout, cfg, out=out)
    if dz.shape != z.shape:  # the gate's columns of a wider z
        dz = jnp.pad(dz, ((0, 0), (0, 0), (cfg[5], z.shape[-1] - cfg[5] - dz.shape[-1])))
    dw = jnp.sum(dw, axis=(0, 1))
    return dy, dz, tuple(dw[k].astype(w.dtype) for k, w in enumerate(ws))


_fused.defvjp(_fused_fwd, _fused_bwd)
# jitted, so the many calls of one shape in a model (every layer) share one lowered copy
_fused_call = jax.jit(_fused, static_argnums=(3,))


def _config(y, ngroups, eps, dtype, interpret, tiles, z_offset=0):
    """The kernels' cfg after checking the sizes; tiles = the keyword arguments of
    `triton_common.kernel_tiles` but seqlen."""
    error = norm_size_error(y.shape[-1])
    if error:
        raise ValueError(error)
    return (int(ngroups), float(eps), jnp.dtype(dtype or y.dtype).name,
            kernel_tiles(y.shape[1], **tiles), bool(interpret), int(z_offset))


def _call(y, z, ws, ngroups, eps, dtype, interpret, tiles, z_offset=0):
    """Runs the custom VJP at `_config`'s cfg."""
    cfg = _config(y, ngroups, eps, dtype, interpret, tiles, z_offset)
    return _fused_call(y.astype(cfg[2]), z, tuple(ws), cfg)


def kernel_config(y, nd: int, *, ngroups: int, eps: float, dtype, interpret: bool,
                  z_offset: int = 0) -> tuple:
    """The cfg `fwd_call` and `bwd_call` take for y (batch, L, nd*nheads, headdim), at the
    default tiles of `bidirectional_gated_norm_pallas` (nd 2) or `gated_norm_pallas` (nd 1)."""
    fn = bidirectional_gated_norm_pallas if nd == 2 else gated_norm_pallas
    tiles = default_tiles(fn)
    return _config(y, ngroups, eps, dtype, interpret, tiles, z_offset)


def bidirectional_gated_norm_pallas(y, z, w_f, w_b, *, ngroups: int = 1, eps: float = 1e-5,
                                    dtype=None, interpret: bool = False,
                                    block_rows: int = 2, num_warps: int = 4,
                                    block_rows_bwd: int | None = DEFAULT_BLOCK_ROWS,
                                    num_warps_bwd: int | None = 8, num_stages: int = 2,
                                    num_stages_bwd: int | None = None, block_cols: int = 256,
                                    block_cols_bwd: int | None = None,
                                    min_programs: int = DEFAULT_MIN_PROGRAMS,
                                    passes: int = 1, passes_bwd: int | None = 2,
                                    z_offset: int = 0):
    """The fused epilogue (Pallas kernels, custom VJP); same math and arguments as
    `bidirectional_gated_norm_xla`.

    Args (beyond the reference's):
      interpret: run the kernels in the Pallas interpreter (any device; CPU tests).
      block_rows: time rows per program, rounded down to a power of two dividing seqlen.
      num_warps: warps per Triton program.
      block_rows_bwd, num_warps_bwd: the same for the backward kernel (None = the forward's).
      num_stages, num_stages_bwd: Triton pipeline stages of the loops over column tiles
        (backward None = the forward's); 1 = no software pipelining.
      block_cols, block_cols_bwd: columns per tile (0 = headdim; else a power of two, narrowed
        to divide d_inner / ngroups; backward None = the forward's).
        The backward's tiles were the fastest forward + backward that `benchmarks.fused_bench`
        found at configs/base.py's mixer on an H100, 0.377 ms against 0.424 ms at one stage
        and the natural width (benchmarks/results/fused_bench3_h100.md); the forward's (2 rows,
        one pass) its fastest at batch 16 in one later call, 0.104 ms against 0.143 ms at the
        former 16 rows and two passes, and the batch-1 loop (narrowed to one row either way)
        0.0147 ms in both (benchmarks/results/fused_bench_passes_h100.md).
      min_programs: the forward's grid target: where batch x row blocks falls short of it
        (batch 1 in the sampler), the forward takes fewer rows per program and as many times
        wider column tiles (`triton_common.narrower_rows`); 1 = never. The backward keeps its
        tiles.
      passes, passes_bwd: 2 = each program reads a group's column tiles from memory twice (the
        row sums, then the outputs); 1 = once, kept in registers for both (fewer bytes read,
        more registers: at the former 16 rows it measured 2.4x slower); backward None = the
        forward's.
      z_offset: z may be a wider array (the input projection's whole output [z | xBC | dt]):
        the kernels read the gate from its columns [z_offset, z_offset + d_inner), so no slice
        of it is copied; z's gradient is then z's width, zero elsewhere.
    Constraints: headdim a power of two (the kernels' tiles are (rows, headdim) at the natural
    width).
    Returns:
      (batch, L, d_inner) in `dtype` (default y.dtype). Gradients: y (y.dtype), z (z.dtype),
      w_f, w_b (their dtypes).
    """
    _check(y, z, w_f, w_b, ngroups, z_offset)
    tiles = dict(block_rows=block_rows, num_warps=num_warps, block_rows_bwd=block_rows_bwd,
                 num_warps_bwd=num_warps_bwd, num_stages=num_stages,
                 num_stages_bwd=num_stages_bwd, block_cols=block_cols,
                 block_cols_bwd=block_cols_bwd, min_programs=min_programs, passes=passes,
                 passes_bwd=passes_bwd)
    return _call(y, z, (w_f, w_b), ngroups, eps, dtype, interpret, tiles, z_offset)


def gated_norm_pallas(y, z, w, *, ngroups: int = 1, eps: float = 1e-5, dtype=None,
                      interpret: bool = False, block_rows: int = 8, num_warps: int = 4,
                      block_rows_bwd: int | None = 16, num_warps_bwd: int | None = None,
                      num_stages: int = 2, num_stages_bwd: int | None = 1, block_cols: int = 128,
                      block_cols_bwd: int | None = 256,
                      min_programs: int = DEFAULT_MIN_PROGRAMS, passes: int = 1,
                      passes_bwd: int | None = 2, z_offset: int = 0):
    """The causal mixer's gated norm as the same kernels with one direction (custom VJP):
    gated_rms_norm(y.reshape(batch, L, d_inner).astype(dtype), z, w, ngroups, eps, dtype).

    Args:
      y: (batch, L, nheads, headdim) SSD output; z: (batch, L, d_inner) gate; w: (d_inner,)
        norm weight; the rest as `bidirectional_gated_norm_pallas` (min_programs likewise;
        passes likewise; z_offset: the gate's first column of a wider z). The default tiles
        were the fastest forward + backward that `benchmarks.fused_bench` found at
        configs/ar_base.py's mixer on an H100,
        0.272 ms against 0.297 ms at the bidirectional kernels' former defaults (16 rows x 4 warps,
        one stage, natural width; benchmarks/results/fused_bench_ar_h100.md). The forward reads
        its tiles once (passes 1: 0.078 / 0.095 ms against 0.104 / 0.149 in two passes, batch 16,
        two H100 calls, benchmarks/results/fused_bench_passes_ar*_h100.md), the backward twice
        (one pass at 16 rows measured 6x slower); the AR base train step 48.5 against 49.0 ms
        (train_throughput_arnorm*_h100.md). The backward's first pass reads (dout, out)
        instead of (y, z, dout) (`bwd_call`'s out): the AR base train step 47.84 against
        48.81 ms (benchmarks/results/train_throughput_arce_root_h100.md against _pk3_, one call).
    Returns:
      (batch, L, d_inner) in `dtype` (default y.dtype). Gradients: y, z, w (their dtypes).
    """
    wide = y.ndim == 4 and z.ndim == 3 and (z_offset or z.shape[-1] != y.shape[2] * y.shape[3])
    if wide:
        _check_offset(z, y.shape[2] * y.shape[3], z_offset)
    zs = z.shape[:-1] + (y.shape[2] * y.shape[3],) if wide else z.shape
    if y.ndim != 4 or zs != (*y.shape[:2], y.shape[2] * y.shape[3]) or w.shape != zs[-1:]:
        raise ValueError(f"expected y (batch, L, nheads, headdim), z (batch, L, nheads*headdim) "
                         f"and w (nheads*headdim,); got {y.shape}, {z.shape}, {w.shape}")
    if ngroups <= 0 or y.shape[2] % ngroups:
        raise ValueError(f"nheads {y.shape[2]} must be divisible by ngroups {ngroups}")
    tiles = dict(block_rows=block_rows, num_warps=num_warps, block_rows_bwd=block_rows_bwd,
                 num_warps_bwd=num_warps_bwd, num_stages=num_stages,
                 num_stages_bwd=num_stages_bwd, block_cols=block_cols,
                 block_cols_bwd=block_cols_bwd, min_programs=min_programs, passes=passes,
                 passes_bwd=passes_bwd)
    return _call(y, z, (w,), ngroups, eps, dtype, interpret, tiles, z_offset)
