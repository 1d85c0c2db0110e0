"""The epilogue of the bidirectional Mamba-2 mixer with shared projections, as one Pallas kernel.

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
rstd (b, 2 * ngroups, L) float32; nothing else is saved. `forward_only` chooses what a call
that is not differentiated runs: the forward kernel ("pallas") or the jnp reference ("xla").

Backward, per half and group (n = g * rstd, do = 0.5 * dout, dn = do * w, m = mean(dn * n)):
    dw = sum_rows(do * n);  dg = rstd * (dn - n * m);  dy = dg * s
    dz = (dg_f * y_f + dg_b * y_b') * silu'(z),  silu'(z) = sig(z) * (1 + z * (1 - sig(z)))
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dimba_jax.layers.norms import gated_rms_norm
from dimba_jax.layers.triton_common import (DEFAULT_BLOCK_ROWS, check_forward_only,
                                            compiler_params, is_power_of_two, kernel_tiles)


def _check(y, z, w_f, w_b, ngroups):
    if y.ndim != 4 or y.shape[2] % 2:
        raise ValueError(f"y must be (batch, seqlen, 2*nheads, headdim), got {y.shape}")
    bsz, seqlen, h2, p = y.shape
    d = h2 // 2 * p
    if z.shape != (bsz, seqlen, d) or w_f.shape != (d,) or w_b.shape != (d,):
        raise ValueError(f"expected z {(bsz, seqlen, d)} and weights ({d},); got "
                         f"{z.shape}, {w_f.shape}, {w_b.shape}")
    if ngroups <= 0 or (h2 // 2) % ngroups:
        raise ValueError(f"nheads {h2 // 2} must be divisible by ngroups {ngroups}")


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


# --------------------------------------------------------------------------------------------
# Kernels. One program: batch row bi, output time rows [t0, t0 + T). ys_ref is the whole
# (L, 2H, P) sequence of batch bi; the forward half reads rows t0 + i, the backward half rows
# L - 1 - t0 - i. Heads are visited group by group with a loop of P-wide tiles (T, P).
# --------------------------------------------------------------------------------------------


def _silu_parts(z):
    sig = jax.nn.sigmoid(z)
    return z * sig, sig


def _rows(t0, q, seqlen):
    """(forward rows pl.ds, backward rows (q,) int32) for output rows [t0, t0 + q)."""
    i = jax.lax.broadcasted_iota(jnp.int32, (q,), 0)
    return pl.ds(t0, q), (seqlen - 1 - t0) - i


def _fwd_kernel(ys_ref, z_ref, wf_ref, wb_ref, o_ref, rstd_ref, *, q, seqlen, nh, p, ngroups,
                eps):
    f32 = jnp.float32
    t0 = pl.program_id(1) * q
    rf, rb = _rows(t0, q, seqlen)
    hpg = nh // ngroups

    def tiles(h):
        cols = pl.ds(h * p, p)
        s, _ = _silu_parts(z_ref[:, cols].astype(f32))
        g_f = ys_ref[rf, h, :].astype(f32) * s
        g_b = ys_ref[rb, nh + h, :].astype(f32) * s
        return cols, g_f, g_b

    for gi in range(ngroups):
        def sumsq(j, acc):
            _, g_f, g_b = tiles(gi * hpg + j)
            return acc[0] + jnp.sum(g_f * g_f, axis=1), acc[1] + jnp.sum(g_b * g_b, axis=1)

        zero = jnp.zeros((q,), f32)
        ss_f, ss_b = jax.lax.fori_loop(0, hpg, sumsq, (zero, zero))
        r_f = jax.lax.rsqrt(ss_f / (hpg * p) + eps)
        r_b = jax.lax.rsqrt(ss_b / (hpg * p) + eps)
        rstd_ref[gi, :] = r_f
        rstd_ref[ngroups + gi, :] = r_b

        def write(j, carry):
            cols, g_f, g_b = tiles(gi * hpg + j)
            o_f = (g_f * r_f[:, None] * wf_ref[cols].astype(f32)[None, :]).astype(o_ref.dtype)
            o_b = (g_b * r_b[:, None] * wb_ref[cols].astype(f32)[None, :]).astype(o_ref.dtype)
            o_ref[:, cols] = ((o_f.astype(f32) + o_b.astype(f32)) * 0.5).astype(o_ref.dtype)
            return carry

        jax.lax.fori_loop(0, hpg, write, 0)


def _bwd_kernel(ys_ref, z_ref, wf_ref, wb_ref, rstd_ref, do_ref, dys_ref, dz_ref, dw_ref, *, q,
                seqlen, nh, p, ngroups):
    """dys_ref: (L, 2H, P) of batch bi (rows of both halves written as read in the forward);
    dw_ref: (2, D) this program's partial sums of dw_f, dw_b."""
    f32 = jnp.float32
    t0 = pl.program_id(1) * q
    rf, rb = _rows(t0, q, seqlen)
    hpg = nh // ngroups

    for gi in range(ngroups):
        r_f = rstd_ref[gi, :]
        r_b = rstd_ref[ngroups + gi, :]

        def tiles(h):
            cols = pl.ds(h * p, p)
            z = z_ref[:, cols].astype(f32)
            s, sig = _silu_parts(z)
            y_f = ys_ref[rf, h, :].astype(f32)
            y_b = ys_ref[rb, nh + h, :].astype(f32)
            n_f = y_f * s * r_f[:, None]
            n_b = y_b * s * r_b[:, None]
            do = do_ref[:, cols].astype(f32) * 0.5
            dn_f = do * wf_ref[cols].astype(f32)[None, :]
            dn_b = do * wb_ref[cols].astype(f32)[None, :]
            return cols, z, s, sig, y_f, y_b, n_f, n_b, do, dn_f, dn_b

        def dots(j, acc):
            h = gi * hpg + j
            cols, _, _, _, _, _, n_f, n_b, do, dn_f, dn_b = tiles(h)
            dw_ref[0, cols] = jnp.sum(do * n_f, axis=0)
            dw_ref[1, cols] = jnp.sum(do * n_b, axis=0)
            return acc[0] + jnp.sum(dn_f * n_f, axis=1), acc[1] + jnp.sum(dn_b * n_b, axis=1)

        zero = jnp.zeros((q,), f32)
        c_f, c_b = jax.lax.fori_loop(0, hpg, dots, (zero, zero))
        c_f = c_f / (hpg * p)
        c_b = c_b / (hpg * p)

        def write(j, carry):
            h = gi * hpg + j
            cols, z, s, sig, y_f, y_b, n_f, n_b, _, dn_f, dn_b = tiles(h)
            dg_f = r_f[:, None] * (dn_f - n_f * c_f[:, None])
            dg_b = r_b[:, None] * (dn_b - n_b * c_b[:, None])
            dys_ref[rf, h, :] = (dg_f * s).astype(dys_ref.dtype)
            dys_ref[rb, nh + h, :] = (dg_b * s).astype(dys_ref.dtype)
            dsilu = sig * (1.0 + z * (1.0 - sig))
            dz_ref[:, cols] = ((dg_f * y_f + dg_b * y_b) * dsilu).astype(dz_ref.dtype)
            return carry

        jax.lax.fori_loop(0, hpg, write, 0)


# --------------------------------------------------------------------------------------------
# pallas_call wrappers; cfg = (ngroups, eps, out dtype name, (T fwd, T bwd),
# (num_warps fwd, num_warps bwd), interpret, forward_only).
# --------------------------------------------------------------------------------------------


def _specs(seqlen, h2, p, d, q, ngroups):
    seq = pl.BlockSpec((None, seqlen, h2, p), lambda bi, ti: (bi, 0, 0, 0))
    rows = pl.BlockSpec((None, q, d), lambda bi, ti: (bi, ti, 0))
    vec = pl.BlockSpec((d,), lambda bi, ti: (0,))
    rstd = pl.BlockSpec((None, 2 * ngroups, q), lambda bi, ti: (bi, 0, ti))
    return seq, rows, vec, rstd


def _fwd_call(y, z, w_f, w_b, cfg):
    ngroups, eps, out_dtype, (q, _), (num_warps, _), interpret, _ = cfg
    bsz, seqlen, h2, p = y.shape
    d = z.shape[-1]
    seq, rows, vec, rstd = _specs(seqlen, h2, p, d, q, ngroups)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, q=q, seqlen=seqlen, nh=h2 // 2, p=p, ngroups=ngroups,
                          eps=eps),
        out_shape=(jax.ShapeDtypeStruct((bsz, seqlen, d), jnp.dtype(out_dtype)),
                   jax.ShapeDtypeStruct((bsz, 2 * ngroups, seqlen), jnp.float32)),
        grid=(bsz, seqlen // q),
        in_specs=[seq, rows, vec, vec],
        out_specs=(rows, rstd),
        compiler_params=compiler_params(num_warps, interpret),
        interpret=interpret,
        name="bidir_gated_norm_fwd",
    )(y, z, w_f, w_b)


def _bwd_call(y, z, w_f, w_b, rstd, dout, cfg):
    ngroups, _, _, (_, q), (_, num_warps), interpret, _ = cfg
    bsz, seqlen, h2, p = y.shape
    d = z.shape[-1]
    nt = seqlen // q
    seq, rows, vec, rstd_spec = _specs(seqlen, h2, p, d, q, ngroups)
    # Each program writes its own rows of the (L, 2H, P) block of its batch element: programs
    # of one batch element share that output block but never an element of it.
    return pl.pallas_call(
        functools.partial(_bwd_kernel, q=q, seqlen=seqlen, nh=h2 // 2, p=p, ngroups=ngroups),
        out_shape=(jax.ShapeDtypeStruct(y.shape, y.dtype),
                   jax.ShapeDtypeStruct(z.shape, z.dtype),
                   jax.ShapeDtypeStruct((bsz, nt, 2, d), jnp.float32)),
        grid=(bsz, nt),
        in_specs=[seq, rows, vec, vec, rstd_spec, rows],
        out_specs=(seq, rows, pl.BlockSpec((None, None, 2, d), lambda bi, ti: (bi, ti, 0, 0))),
        compiler_params=compiler_params(num_warps, interpret),
        interpret=interpret,
        name="bidir_gated_norm_bwd",
    )(y, z, w_f, w_b, rstd, dout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(y, z, w_f, w_b, cfg):
    if cfg[-1] == "xla":
        return bidirectional_gated_norm_xla(y, z, w_f, w_b, ngroups=cfg[0], eps=cfg[1],
                                            dtype=jnp.dtype(cfg[2]))
    return _fwd_call(y, z, w_f, w_b, cfg)[0]


def _fused_fwd(y, z, w_f, w_b, cfg):
    out, rstd = _fwd_call(y, z, w_f, w_b, cfg)
    return out, (y, z, w_f, w_b, rstd)


def _fused_bwd(cfg, res, dout):
    y, z, w_f, w_b, rstd = res
    dy, dz, dw = _bwd_call(y, z, w_f, w_b, rstd, dout, cfg)
    dw = jnp.sum(dw, axis=(0, 1))
    return dy, dz, dw[0].astype(w_f.dtype), dw[1].astype(w_b.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)


def bidirectional_gated_norm_pallas(y, z, w_f, w_b, *, ngroups: int = 1, eps: float = 1e-5,
                                    dtype=None, interpret: bool = False,
                                    block_rows: int = DEFAULT_BLOCK_ROWS, num_warps: int = 4,
                                    block_rows_bwd: int | None = None,
                                    num_warps_bwd: int | None = None,
                                    forward_only: str = "pallas"):
    """The fused epilogue (Pallas kernels, custom VJP); same math and arguments as
    `bidirectional_gated_norm_xla`.

    Args (beyond the reference's):
      interpret: run the kernels in the Pallas interpreter (any device; CPU tests).
      block_rows: time rows per program, rounded down to a power of two dividing seqlen.
      num_warps: warps per Triton program.
      block_rows_bwd, num_warps_bwd: the same for the backward kernel (None = the forward's).
      forward_only: one of triton_common.FORWARD_ONLY, what a call that is not differentiated
        runs: "pallas" (the forward kernel) or "xla" (`bidirectional_gated_norm_xla`); a
        differentiated call runs the forward and backward kernels either way.
    Constraints: headdim a power of two (the kernels' tiles are (rows, headdim)).
    Returns:
      (batch, L, d_inner) in `dtype` (default y.dtype). Gradients: y (y.dtype), z (z.dtype),
      w_f, w_b (their dtypes).
    """
    _check(y, z, w_f, w_b, ngroups)
    check_forward_only(forward_only)
    error = norm_size_error(y.shape[-1])
    if error:
        raise ValueError(error)
    dtype = jnp.dtype(dtype or y.dtype)
    rows, warps = kernel_tiles(y.shape[1], block_rows, num_warps, block_rows_bwd,
                               num_warps_bwd)
    cfg = (int(ngroups), float(eps), dtype.name, rows, warps, bool(interpret),
           forward_only)
    return _fused(y.astype(dtype), z, w_f, w_b, cfg)
