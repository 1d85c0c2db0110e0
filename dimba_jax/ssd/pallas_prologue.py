"""The SSD chunk kernels' step-size prologue as one Pallas Triton kernel.

From dt (b, L, h) (any float dtype), the per-head bias dt_bias, softplus, the clip to dt_limit
and A (h,), the chunk kernels read (`_common.prepare_dt`, its XLA reference):

    dtk[b, j, t] = clip(softplus(dt[b, t, j] + dt_bias[j]), *dt_limit)   (0 for t >= L)
    sk[b, j, t]  = sum of A[j] * dtk[b, j, u] over u from the start of t's chunk of q to t

both float32 (b, h, Lp), Lp = L rounded up to a multiple of q; with `weights` also what the
Mosaic state pass reads (`pallas_mosaic_fwd.state_weights` and the chunk-end decays):

    w[b, j, t]   = dtk[b, j, t] * exp(S - sk[b, j, t]),  dec[b, j, c] = exp(S),
    S = the sum of A[j] * dtk over chunk c (t's chunk)

w (b, h, Lp), dec (b, h, Lp / q) float32, or with `dec_cols` > 0 dec (b, h, Lp / q, dec_cols):
each chunk's decay repeated dec_cols times, the per-row vector the state pass reads (so no
broadcast kernel of its own). In XLA that is four to five kernels per SSD call
(the processing, the pad, the transpose, the product and a chunked cumulative sum) and two more
for w and dec; here it is one: a program takes one chunk of q rows of `HEADS` heads, processes
them, sums them along the rows (`jnp.cumsum`, Triton's scan) and stores its outputs transposed.
The backward (a custom VJP) is the XLA reference's, recomputed from the saved inputs: the
tensors are small and this saves the forward's launches where they count, in sampling. With
`grad_kernel` False the forward under differentiation is the XLA reference too, so the kernel
runs only in calls no gradient goes through (`KernelConfig.prologue` "auto").

With a `layout` (offset, directions) (`ssd`'s dt_layout) dt is a wider (b, L, W) array, the
mixer's projection output: head j < h / directions reads column offset + j, and with two
directions head h / 2 + j reads column offset + j at row L-1-t (the backward direction in scan
time), so the (b, L, h) concatenation of both directions' step sizes is never formed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dimba_jax.ssd import _common
from dimba_jax.ssd.pallas_gpu import _chunk_end_decay
from dimba_jax.ssd.pallas_mosaic_fwd import state_weights

HEADS = 8  # heads per program; the kernel takes nheads that are a multiple of it


def prologue_supported(nheads: int, q: int, directions: int = 1) -> bool:
    """Whether the kernel takes these sizes: each direction's nheads / directions heads a
    multiple of HEADS, q a power of two >= 16."""
    return nheads % (HEADS * directions) == 0 and q >= 16 and not q & (q - 1)


def _kernel(dt_ref, bias_ref, a_ref, dtk_ref, sk_ref, *w_dec, q, seqlen, softplus, lo, hi,
            dec_cols, offset, per_dir):
    """dt_ref: the whole (L, W) dt of batch row bi, head j's step sizes at column offset + j
    (j < per_dir) or, for the heads j >= per_dir of a second direction, at column
    offset + j - per_dir in reversed time (row L-1-t); bias_ref, a_ref (HEADS,) float32;
    outputs dtk_ref, sk_ref (HEADS, q) float32: chunk pl.program_id(1) of heads block
    pl.program_id(2); with weights also w_ref (HEADS, q) and dec_ref (HEADS,) float32, or
    (HEADS, dec_cols) with dec_cols > 0."""
    rows = pl.program_id(1) * q + jax.lax.broadcasted_iota(jnp.int32, (q,), 0)
    first = pl.program_id(2) * HEADS
    d = first // per_dir  # the block's direction, 0 or 1 (per_dir is a multiple of HEADS)
    src = rows + d * ((seqlen - 1) - 2 * rows)  # row L-1-t in the second direction
    heads = pl.ds(offset + first - d * per_dir, HEADS)
    v = dt_ref[jnp.clip(src, 0, seqlen - 1), heads].astype(jnp.float32)
    v = v + bias_ref[...][None, :]
    if softplus:
        v = _common.softplus(v)
    if lo > -math.inf or hi < math.inf:
        v = jnp.clip(v, lo, hi)
    v = jnp.where((rows < seqlen)[:, None], v, 0.0)  # padded positions: no decay, no input
    a = v * a_ref[...][None, :]
    sk = jnp.cumsum(a, axis=0)
    dtk_ref[...] = v.T
    sk_ref[...] = sk.T
    if w_dec:
        w_ref, dec_ref = w_dec
        last = (jax.lax.broadcasted_iota(jnp.int32, (q, HEADS), 0) == q - 1)
        total = jnp.sum(jnp.where(last, sk, 0.0), axis=0)  # the chunk's last cumulative sum
        w_ref[...] = (v * jnp.exp(total[None, :] - sk)).T
        dec = jnp.exp(total)
        dec_ref[...] = jnp.broadcast_to(dec[:, None], (HEADS, dec_cols)) if dec_cols else dec


def _triton_params():
    """The Triton backend's compiler parameters (one warp group; no loop to pipeline)."""
    from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
    return plt.CompilerParams(num_warps=4, num_stages=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _prologue(dt, A, bias, cfg):
    q, softplus, limit, interpret, weights, dec_cols, (offset, directions), _ = cfg
    bsz, seqlen, width = dt.shape
    nh = A.shape[0]
    lp = -(-seqlen // q) * q
    out = jax.ShapeDtypeStruct((bsz, nh, lp), jnp.float32)
    block = pl.BlockSpec((None, HEADS, q), lambda bi, ci, hi: (bi, hi, ci))
    vec = pl.BlockSpec((HEADS,), lambda bi, ci, hi: (hi,))
    out_shape, out_specs = [out, out], [block, block]
    if weights and dec_cols:
        out_shape += [out, jax.ShapeDtypeStruct((bsz, nh, lp // q, dec_cols), jnp.float32)]
        out_specs += [block, pl.BlockSpec((None, HEADS, None, dec_cols),
                                          lambda bi, ci, hi: (bi, hi, ci, 0))]
    elif weights:
        out_shape += [out, jax.ShapeDtypeStruct((bsz, nh, lp // q), jnp.float32)]
        out_specs += [block, pl.BlockSpec((None, HEADS, None), lambda bi, ci, hi: (bi, hi, ci))]
    return pl.pallas_call(
        functools.partial(_kernel, q=q, seqlen=seqlen, softplus=softplus, lo=float(limit[0]),
                          hi=float(limit[1]), dec_cols=dec_cols, offset=offset,
                          per_dir=nh // directions),
        out_shape=tuple(out_shape),
        grid=(bsz, lp // q, nh // HEADS),
        in_specs=[pl.BlockSpec((None, seqlen, width), lambda bi, ci, hi: (bi, 0, 0)), vec, vec],
        out_specs=tuple(out_specs),
        compiler_params=None if interpret else _triton_params(),
        interpret=interpret,
        name="ssd_dt_prologue",
    )(dt, bias, A)


def _reference(dt, A, bias, cfg):
    q, softplus, limit, _, weights, dec_cols, layout, _ = cfg
    dt = _common.window_dt(dt, layout, A.shape[0])
    dtk, sk = _common.prepare_dt(dt, A, q, dt_bias=bias, dt_softplus=softplus, dt_limit=limit)
    if not weights:
        return dtk, sk
    dec = _chunk_end_decay(sk, None, q)
    if dec_cols:
        dec = jnp.broadcast_to(dec[..., None], dec.shape + (dec_cols,))
    return dtk, sk, state_weights(dtk, sk, q), dec


def _prologue_fwd(dt, A, bias, cfg):
    grad_kernel = cfg[-1]
    out = _prologue(dt, A, bias, cfg) if grad_kernel else _reference(dt, A, bias, cfg)
    return out, (dt, A, bias)


def _prologue_bwd(cfg, res, cts):
    _, vjp = jax.vjp(functools.partial(_reference, cfg=cfg), *res)
    return vjp(cts)


_prologue.defvjp(_prologue_fwd, _prologue_bwd)


def prepare_dt_pallas(dt, A, q: int, *, dt_bias=None, dt_softplus: bool = False,
                      dt_limit=(0.0, math.inf), weights: bool = False, dec_cols: int = 0,
                      layout=None, interpret: bool = False, grad_kernel: bool = True):
    """`_common.prepare_dt` as the fused kernel (differentiable: the reference's VJP).

    Args: dt (b, L, h) any float dtype, or with `layout` a wider (b, L, W) array holding the
    step sizes where `layout` says; A (h,); q the chunk length (a power of two >= 16); dt_bias
    (h,) or None; dt_softplus, dt_limit as `ssd`; weights: also the state pass's w and
    chunk-end decays; dec_cols: 0, or a power of two: the decays repeated along a last axis of
    this width (the state pass's rows, headdim); layout: None, or (offset, directions) as
    `ssd`'s dt_layout (`_common.window_dt`: the kernel reads the columns, and a second
    direction's rows in reversed time, in place); interpret: the Pallas interpreter;
    grad_kernel: whether the kernel also runs under differentiation (else the XLA reference's
    forward there; the kernel runs in calls without a gradient only).
    Returns: (dtk, sk) float32 (b, h, Lp) [+ (w (b, h, Lp), dec (b, h, Lp / q) or
    (b, h, Lp / q, dec_cols)) with weights].
    Raises ValueError for sizes the kernel does not take (`prologue_supported`).
    """
    nh = A.shape[0] if A.ndim == 1 else -1
    narrow = layout is None  # dt is exactly (b, L, h)
    layout = (0, 1) if narrow else (int(layout[0]), int(layout[1]))
    why = _common.dt_window_error(dt.shape, layout, nh) if nh > 0 else ""
    if nh <= 0 or why or (narrow and dt.shape[-1] != nh) or (
            dt_bias is not None and dt_bias.shape != (nh,)):
        raise ValueError(f"prepare_dt_pallas: dt (b, L, h) (or wider, as dt_layout says), A and "
                         f"dt_bias (h,); got {dt.shape}, {A.shape}, "
                         f"{None if dt_bias is None else dt_bias.shape}{'; ' + why if why else ''}")
    if not prologue_supported(nh, q, layout[1]):
        raise ValueError(f"prepare_dt_pallas: nheads {nh} per direction must be a multiple of "
                         f"{HEADS} and the chunk {q} a power of two >= 16")
    if dec_cols and (dec_cols < 0 or dec_cols & (dec_cols - 1)):
        raise ValueError(f"prepare_dt_pallas: dec_cols must be 0 or a power of two, got {dec_cols}")
    bias = jnp.zeros((nh,), jnp.float32) if dt_bias is None else dt_bias.astype(jnp.float32)
    cfg = (int(q), bool(dt_softplus), (float(dt_limit[0]), float(dt_limit[1])), bool(interpret),
           bool(weights), int(dec_cols), layout, bool(grad_kernel))
    return _prologue(dt, A.astype(jnp.float32), bias, cfg)
