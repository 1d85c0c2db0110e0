"""The residual add, RMSNorm and conditioning in front of a DIMBA block's mixer, as one Pallas
kernel.

With the residual stream h (b, L, d), the previous block's mixer output delta (b, L, d) (None
for the first block), the norm weight w (d,) and the block's conditioning mod (b, 2, d) float32
= [scale; shift] (None: no conditioning; FiLM gives both rows, additive conditioning a zero
scale):

    u = h + delta                                    (in h's dtype; u = h without delta)
    x = (u * rsqrt(mean(u^2) + eps) * w) * (1 + scale[b]) + shift[b]    (float32)

and returns (u, x rounded to `dtype`): what `DimbaBlock` computes as `h + mixer(...)` of the
previous block, then its `norm` and `cond`, in that order of operations.

`prenorm_xla` is that math in jnp; `prenorm_pallas` is one Pallas forward kernel (Triton
backend, or the Pallas interpreter with `interpret=True`) with a custom VJP whose backward is
one more kernel. The forward saves the per-row rstd (b, L) float32 beside its inputs.

Backward (n = u * rstd, a = 1 + scale, dx the cotangent of x in float32, du_out that of u):
    dn = dx * w * a;  du = rstd * (dn - n * mean(dn * n)) + du_out;  dh = du;  ddelta = du
    dw = sum_{b,rows} dx * n * a;  dscale[b] = sum_rows dx * n * w;  dshift[b] = sum_rows dx
The weight and conditioning sums are per-program partial sums (b, L/T, 3, d) float32, added in
XLA. Each program takes T time rows of one batch row and walks d in column tiles twice (the
sums of squares or of dn * n, then the outputs), recomputing u from h and delta the second
time. At a small batch (the sampler at batch 1) the forward takes fewer, wider rows per
program (`min_programs`), as the mixer's kernels do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dimba_jax.layers.norms import rms_normalize
from dimba_jax.layers.triton_common import (DEFAULT_BLOCK_ROWS, DEFAULT_MIN_PROGRAMS,
                                            compiler_params, kernel_tiles, narrower_rows,
                                            tile_width)

MIN_TILE = 16  # the narrowest column tile the kernels take (d must be a multiple of it)
NATURAL_COLS = 256  # columns per tile for block_cols 0 (narrowed to divide d)


def prenorm_size_error(d: int) -> str:
    """Why the fused kernels cannot take this width, "" if they can: their column tiles are
    powers of two of at least MIN_TILE columns that divide d."""
    if d % MIN_TILE:
        return f"the fused pre-norm needs d_model a multiple of {MIN_TILE}, got {d}"
    return ""


def _check(h, delta, weight, mod):
    if h.ndim != 3:
        raise ValueError(f"h must be (batch, seqlen, d_model), got {h.shape}")
    bsz, _, d = h.shape
    if delta is not None and delta.shape != h.shape:
        raise ValueError(f"delta must have h's shape {h.shape}, got {delta.shape}")
    if weight.shape != (d,):
        raise ValueError(f"weight must be ({d},), got {weight.shape}")
    if mod is not None and mod.shape != (bsz, 2, d):
        raise ValueError(f"mod must be (batch, 2, d_model) = {(bsz, 2, d)}, got {mod.shape}")


def prenorm_xla(h, delta, weight, mod, *, eps: float = 1e-5, dtype=None):
    """The reference in jnp (the module docstring's math).

    Args:
      h: (batch, L, d) residual stream (float32 in the models).
      delta: (batch, L, d) any float dtype, added to h in h's dtype; or None.
      weight: (d,) RMSNorm weight.
      mod: (batch, 2, d) float32 [scale; shift], or None.
      eps: added to the mean square.
      dtype: dtype of x (default h.dtype).
    Returns:
      (u (batch, L, d) in h.dtype, x (batch, L, d) in `dtype`).
    """
    _check(h, delta, weight, mod)
    u = h if delta is None else h + delta.astype(h.dtype)
    x = (rms_normalize(u, eps) * weight.astype(jnp.float32)).astype(h.dtype).astype(jnp.float32)
    if mod is not None:
        mod = mod.astype(jnp.float32)
        x = (x * (1.0 + mod[:, None, 0]) + mod[:, None, 1]).astype(h.dtype)
    return u, x.astype(dtype or h.dtype)


# --------------------------------------------------------------------------------------------
# Kernels. One program: batch row bi, time rows [t0, t0 + T), d in column tiles of w.
# --------------------------------------------------------------------------------------------


def _u(h_ref, delta_ref, cols):
    """h + delta over the program's rows and `cols`: (u in h's dtype, u float32)."""
    u = h_ref[:, cols]
    if delta_ref is not None:
        u = u + delta_ref[:, cols].astype(u.dtype)
    return u, u.astype(jnp.float32)


def _fwd_kernel(h_ref, *refs, d, w, eps, has_delta, has_mod):
    """h_ref (T, d); refs: [delta_ref (T, d)], w_ref (d,), [mod_ref (2, d) of batch bi], then
    the outputs [u_ref (T, d)], x_ref (T, d), rstd_ref (T,) float32."""
    f32 = jnp.float32
    refs = list(refs)
    delta_ref = refs.pop(0) if has_delta else None
    w_ref = refs.pop(0)
    mod_ref = refs.pop(0) if has_mod else None
    u_ref = refs.pop(0) if has_delta else None
    x_ref, rstd_ref = refs
    q = h_ref.shape[0]

    def sumsq(j, acc):
        cols = pl.ds(j * w, w)
        u, uf = _u(h_ref, delta_ref, cols)
        if u_ref is not None:
            u_ref[:, cols] = u
        return acc + jnp.sum(uf * uf, axis=1)

    ss = jax.lax.fori_loop(0, d // w, sumsq, jnp.zeros((q,), f32))
    r = jax.lax.rsqrt(ss / d + eps)
    rstd_ref[:] = r

    def write(j, carry):
        cols = pl.ds(j * w, w)
        _, uf = _u(h_ref, delta_ref, cols)
        x = (uf * r[:, None] * w_ref[cols].astype(f32)[None, :]).astype(h_ref.dtype).astype(f32)
        if mod_ref is not None:
            scale, shift = mod_ref[0, cols].astype(f32), mod_ref[1, cols].astype(f32)
            x = (x * (1.0 + scale[None, :]) + shift[None, :]).astype(h_ref.dtype).astype(f32)
        x_ref[:, cols] = x.astype(x_ref.dtype)
        return carry

    jax.lax.fori_loop(0, d // w, write, 0)


def _bwd_kernel(h_ref, *refs, d, w, has_delta, has_mod):
    """h_ref (T, d); refs: [delta_ref], w_ref (d,), [mod_ref (2, d)], rstd_ref (T,), dx_ref
    (T, d), [du_ref (T, d): the cotangent of u], then the outputs dh_ref (T, d) in h's dtype,
    [ddelta_ref (T, d) in delta's dtype], sums_ref (3, d) float32: this program's partial sums
    of [dw; dscale; dshift]."""
    f32 = jnp.float32
    refs = list(refs)
    delta_ref = refs.pop(0) if has_delta else None
    w_ref = refs.pop(0)
    mod_ref = refs.pop(0) if has_mod else None
    rstd_ref, dx_ref = refs.pop(0), refs.pop(0)
    du_ref = refs.pop(0) if has_delta else None
    dh_ref = refs.pop(0)
    ddelta_ref = refs.pop(0) if has_delta else None
    (sums_ref,) = refs
    q = h_ref.shape[0]
    r = rstd_ref[:]

    def tile(j):
        cols = pl.ds(j * w, w)
        _, uf = _u(h_ref, delta_ref, cols)
        n = uf * r[:, None]
        wt = w_ref[cols].astype(f32)[None, :]
        a = 1.0 + mod_ref[0, cols].astype(f32)[None, :] if mod_ref is not None else 1.0
        dx = dx_ref[:, cols].astype(f32)
        return cols, n, wt, a, dx

    def dots(j, acc):
        cols, n, wt, a, dx = tile(j)
        sums_ref[0, cols] = jnp.sum(dx * n * a, axis=0)
        sums_ref[1, cols] = jnp.sum(dx * n * wt, axis=0)
        sums_ref[2, cols] = jnp.sum(dx, axis=0)
        return acc + jnp.sum(dx * wt * a * n, axis=1)

    c = jax.lax.fori_loop(0, d // w, dots, jnp.zeros((q,), f32)) / d

    def write(j, carry):
        cols, n, wt, a, dx = tile(j)
        du = r[:, None] * (dx * wt * a - n * c[:, None])
        if du_ref is not None:
            du = du + du_ref[:, cols].astype(f32)
        dh_ref[:, cols] = du.astype(dh_ref.dtype)
        if ddelta_ref is not None:
            ddelta_ref[:, cols] = du.astype(ddelta_ref.dtype)
        return carry

    jax.lax.fori_loop(0, d // w, write, 0)


# --------------------------------------------------------------------------------------------
# pallas_call wrappers; cfg = (eps, x dtype name, (Tiles fwd, Tiles bwd), interpret).
# --------------------------------------------------------------------------------------------


def _width(d, tiles):
    """Columns per tile: the largest power of two <= tiles.cols (0: NATURAL_COLS) dividing d."""
    return tile_width(d, d, tiles.cols or NATURAL_COLS)


def _specs(q, d):
    rows = pl.BlockSpec((None, q, d), lambda bi, ti: (bi, ti, 0))
    vec = pl.BlockSpec((d,), lambda bi, ti: (0,))
    mod = pl.BlockSpec((None, 2, d), lambda bi, ti: (bi, 0, 0))
    rstd = pl.BlockSpec((None, q), lambda bi, ti: (bi, ti))
    return rows, vec, mod, rstd


def _fwd_call(h, delta, weight, mod, cfg):
    eps, x_dtype, (tiles, _), interpret = cfg
    bsz, seqlen, d = h.shape
    tiles = narrower_rows(tiles, bsz, seqlen)
    q = tiles.rows
    rows, vec, mod_spec, rstd = _specs(q, d)
    has_delta, has_mod = delta is not None, mod is not None
    out_shape = ([jax.ShapeDtypeStruct(h.shape, h.dtype)] if has_delta else []) + [
        jax.ShapeDtypeStruct(h.shape, jnp.dtype(x_dtype)),
        jax.ShapeDtypeStruct((bsz, seqlen), jnp.float32)]
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, d=d, w=_width(d, tiles), eps=eps,
                          has_delta=has_delta, has_mod=has_mod),
        out_shape=tuple(out_shape),
        grid=(bsz, seqlen // q),
        in_specs=[rows] + [rows] * has_delta + [vec] + [mod_spec] * has_mod,
        out_specs=tuple([rows] * has_delta + [rows, rstd]),
        compiler_params=compiler_params(tiles, interpret),
        interpret=interpret,
        name="prenorm_fwd",
    )(h, *([delta] if has_delta else []), weight, *([mod] if has_mod else []))
    u = outs[0] if has_delta else h
    return u, outs[-2], outs[-1]


def _bwd_call(h, delta, weight, mod, rstd, dx, du, cfg):
    _, _, (_, tiles), interpret = cfg
    bsz, seqlen, d = h.shape
    q = tiles.rows
    nt = seqlen // q
    rows, vec, mod_spec, rstd_spec = _specs(q, d)
    has_delta, has_mod = delta is not None, mod is not None
    out_shape = ([jax.ShapeDtypeStruct(h.shape, h.dtype)]
                 + ([jax.ShapeDtypeStruct(h.shape, delta.dtype)] if has_delta else [])
                 + [jax.ShapeDtypeStruct((bsz, nt, 3, d), jnp.float32)])
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, d=d, w=_width(d, tiles),
                          has_delta=has_delta, has_mod=has_mod),
        out_shape=tuple(out_shape),
        grid=(bsz, nt),
        in_specs=([rows] + [rows] * has_delta + [vec] + [mod_spec] * has_mod
                  + [rstd_spec, rows] + [rows] * has_delta),
        out_specs=tuple([rows] + [rows] * has_delta
                        + [pl.BlockSpec((None, None, 3, d), lambda bi, ti: (bi, ti, 0, 0))]),
        compiler_params=compiler_params(tiles, interpret),
        interpret=interpret,
        name="prenorm_bwd",
    )(h, *([delta] if has_delta else []), weight, *([mod] if has_mod else []), rstd, dx,
      *([du] if has_delta else []))
    return outs[0], (outs[1] if has_delta else None), outs[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(h, delta, weight, mod, cfg):
    u, x, _ = _fwd_call(h, delta, weight, mod, cfg)
    return u, x


def _fused_fwd(h, delta, weight, mod, cfg):
    u, x, rstd = _fwd_call(h, delta, weight, mod, cfg)
    return (u, x), (h, delta, weight, mod, rstd)


def _fused_bwd(cfg, res, cts):
    h, delta, weight, mod, rstd = res
    du, dx = cts
    if delta is None:  # u is h itself: its cotangent passes straight through
        dh, _, sums = _bwd_call(h, None, weight, mod, rstd, dx, None, cfg)
        dh = dh + du.astype(dh.dtype)
    else:
        dh, ddelta, sums = _bwd_call(h, delta, weight, mod, rstd, dx, du, cfg)
    dw = jnp.sum(sums[:, :, 0], axis=(0, 1)).astype(weight.dtype)
    dmod = None if mod is None else jnp.sum(sums[:, :, 1:], axis=1).astype(mod.dtype)
    return dh, (None if delta is None else ddelta), dw, dmod


_fused.defvjp(_fused_fwd, _fused_bwd)


def prenorm_pallas(h, delta, weight, mod, *, eps: float = 1e-5, dtype=None,
                   interpret: bool = False, block_rows: int = DEFAULT_BLOCK_ROWS,
                   num_warps: int = 4, block_rows_bwd: int | None = None,
                   num_warps_bwd: int | None = None, block_cols: int = 256,
                   min_programs: int = DEFAULT_MIN_PROGRAMS):
    """`prenorm_xla` as the fused Pallas kernels (differentiable: custom VJP).

    Args: those of `prenorm_xla`, plus interpret (the Pallas interpreter: CPU tests, slow);
    block_rows / num_warps (_bwd): time rows and warps per program of the forward (backward;
    None = the forward's); block_cols: columns per tile (0 = NATURAL_COLS), narrowed to the
    largest power of two dividing d; min_programs: the forward's grid target
    (`triton_common.Tiles.programs`).
    Returns: (u, x) as `prenorm_xla`. Raises ValueError for mismatched shapes or a d the
    kernels do not take (`prenorm_size_error`).
    """
    _check(h, delta, weight, mod)
    error = prenorm_size_error(h.shape[-1])
    if error:
        raise ValueError(error)
    tiles = kernel_tiles(h.shape[1], block_rows, num_warps, block_rows_bwd, num_warps_bwd,
                         block_cols=block_cols, min_programs=min_programs)
    cfg = (float(eps), jnp.dtype(dtype or h.dtype).name, tiles, bool(interpret))
    return _fused(h, delta, weight, None if mod is None else mod.astype(jnp.float32), cfg)
