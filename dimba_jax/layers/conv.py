"""Mamba-2's depthwise causal conv + SiLU, with a hand-written backward (`jax.custom_vjp`).

    y[t] = silu(bias + sum_k w[k] * x[t - (K-1) + k]),  zero input before t = 0

and, with packed sequences, a term is dropped when x[t - (K-1) + k] belongs to a different
sequence than position t. Accumulation is float32; x and y are in the compute dtype.

Why a custom VJP: the forward is K shifted multiply-adds that XLA fuses into one loop, but under
autodiff XLA is free to lay out the backward's float32 intermediates as it likes. On the H200,
next to the Pallas SSD kernels, it chose channel-major (batch, channels, time) float32 copies for
the conv's backward: one transpose fusion of 0.87 ms per block of `configs/base.py`
(docs/train_step_profile.md). The backward written out here works on the same (batch, time,
channels) arrays as the forward:

    a      = bias + sum_k w[k] * x_pad[t + k] * keep_k[t]      (recomputed, float32)
    da     = dy * silu'(a)
    dx_pad = sum_k shift_right_by_k(w[k] * da * keep_k)       (K shifted adds, one loop)
    dw[k]  = sum_{b,t} x_pad[t + k] * da[t] * keep_k[t]       (column reductions)
    dbias  = sum_{b,t} da

Only x (compute dtype), w, bias and the masks are saved; `a` is recomputed (K FMAs per element)
instead of storing a float32 tensor of x's size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def conv_keep_masks(seq_idx: jax.Array | None, width: int) -> jax.Array | None:
    """Which conv terms stay within a packed sequence.

    seq_idx: (batch, seqlen) int or None. Returns None (keep all) or a float32 array
    (width - 1, batch, seqlen) whose [k, b, t] is 1 where x[t - (width-1) + k] is in t's sequence
    (the last tap, k = width - 1, is x[t] itself and always kept).
    """
    if seq_idx is None or width <= 1:
        return None
    seqlen = seq_idx.shape[1]
    spad = jnp.pad(seq_idx, ((0, 0), (width - 1, 0)), constant_values=-1)
    return jnp.stack([(spad[:, k:k + seqlen] == seq_idx).astype(jnp.float32)
                      for k in range(width - 1)])


def _preactivation(x, w, bias, keep):
    """bias + sum_k w[k] * x_pad[t + k] (* keep_k): float32 (batch, seqlen, channels)."""
    width, seqlen = w.shape[0], x.shape[1]
    xpad = jnp.pad(x.astype(jnp.float32), ((0, 0), (width - 1, 0), (0, 0)))
    acc = bias.astype(jnp.float32)
    for k in range(width):
        term = xpad[:, k:k + seqlen] * w[k].astype(jnp.float32)
        if keep is not None and k < width - 1:
            term = term * keep[k][..., None]
        acc = acc + term
    return acc


@jax.custom_vjp
def causal_depthwise_conv_silu(x: jax.Array, w: jax.Array, bias: jax.Array,
                               keep: jax.Array | None = None) -> jax.Array:
    """silu(depthwise causal conv(x) + bias) in x's dtype.

    Args:
      x: (batch, seqlen, channels), the compute dtype (bf16 / f32).
      w: (width, channels) conv taps, oldest input first (w[width-1] multiplies x[t]).
      bias: (channels,).
      keep: None, or `conv_keep_masks(seq_idx, width)` (width-1, batch, seqlen) float32.
    Returns:
      (batch, seqlen, channels) in x.dtype.
    """
    return jax.nn.silu(_preactivation(x, w, bias, keep)).astype(x.dtype)


def _conv_fwd(x, w, bias, keep):
    return causal_depthwise_conv_silu(x, w, bias, keep), (x, w, bias, keep)


def _conv_bwd(residuals, dy):
    x, w, bias, keep = residuals
    width, seqlen = w.shape[0], x.shape[1]
    a = _preactivation(x, w, bias, keep)
    sig = jax.nn.sigmoid(a)
    da = dy.astype(jnp.float32) * sig * (1.0 + a * (1.0 - sig))  # d silu(a) / da
    xpad = jnp.pad(x.astype(jnp.float32), ((0, 0), (width - 1, 0), (0, 0)))
    dxpad = None
    dw = []
    for k in range(width):
        g = da if keep is None or k == width - 1 else da * keep[k][..., None]
        dw.append(jnp.sum(xpad[:, k:k + seqlen] * g, axis=(0, 1)))
        shifted = jnp.pad(g * w[k].astype(jnp.float32), ((0, 0), (k, width - 1 - k), (0, 0)))
        dxpad = shifted if dxpad is None else dxpad + shifted
    dx = dxpad[:, width - 1:].astype(x.dtype)
    dkeep = None if keep is None else jnp.zeros_like(keep)
    return (dx, jnp.stack(dw).astype(w.dtype), jnp.sum(da, axis=(0, 1)).astype(bias.dtype),
            dkeep)


causal_depthwise_conv_silu.defvjp(_conv_fwd, _conv_bwd)
