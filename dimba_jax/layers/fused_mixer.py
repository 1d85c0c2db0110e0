"""The Mamba-2 mixer's core (fused conv prologue -> SSD -> fused gated-norm epilogue) as one
custom VJP whose backward writes the gradient of the input projection's output once.

The fused prologue (`fused_conv`) and epilogue (`fused_norm`) both read the projection's output
zx (b, L, W), W = D + C + H ([z | xBC | dt]), through column offsets. Each with its own custom
VJP returns a gradient of zx's full width, zero outside its own columns (dz; dxBC and ddt), and
autodiff adds the three arrays: one full-width elementwise pass per mixer in the train step.
Here the epilogue's backward kernel writes dz into a (b, L, W) buffer (`fused_norm.bwd_call`,
`dz_wide`), the SSD's VJP runs between, and the prologue's second backward kernel writes dxBC
and ddt into the same buffer in place (`fused_conv.bwd_call`, `into`): the buffer is the whole
gradient of zx, with no add. Values and every gradient are those of the two custom VJPs
composed (`mixer_core` against the same three calls made separately: tests/test_fused_mixer.py).

`mixer_core` takes both directions of the bidirectional mixer (two conv weights / biases and
two norm weights) or the causal mixer's one. Forward only (sampling, evaluation: the custom
VJP's primal) the SSD reads dt from zx in place (`ssd`'s dt_layout), so where its prologue
kernel runs no program forms the (b, L, nd*H) dt_cat; under differentiation it takes dt_cat,
whose cotangent the conv's second backward kernel writes into the gradient buffer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dimba_jax.layers import fused_conv, fused_norm
from dimba_jax.ssd import ssd


def _ssd_fn(ssd_kw, dt_layout=None):
    """ssd(x, dt, a, b, c, chunk_size, D=d, dt_bias=bias, dt_softplus=True, ...) with the
    call's static settings ssd_kw ((name, value) pairs: chunk_size, dt_limit, impl, kernels)
    and `ssd`'s dt_layout (dt then the projection's whole output)."""
    kw = dict(ssd_kw)
    chunk = kw.pop("chunk_size")

    def run(x, dt, a, b, c, d, bias):
        return ssd(x, dt, a, b, c, chunk, D=d, dt_bias=bias, dt_softplus=True,
                   dt_layout=dt_layout, **kw)
    return run


def _forward(zx, conv_ws, conv_bs, cfg, in_place: bool = False):
    """The prologue's outputs (x, B, C, dt) and the SSD as a function of its inputs: dt is
    dt_cat, or with `in_place` zx itself, which the SSD then reads through its dt_layout
    (dt_cat left unused, so a forward-only program never forms it)."""
    conv_cfg, _, ssd_kw = cfg
    x, b, c, dt = fused_conv.fwd_call(zx, zx, conv_ws, conv_bs, conv_cfg)
    if not in_place:
        return x, b, c, dt, _ssd_fn(ssd_kw)
    _, dt_offset, _ = conv_cfg[-1]  # (xbc offset, dt offset, nheads) in zx
    return x, b, c, zx, _ssd_fn(ssd_kw, (dt_offset, len(conv_ws)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _core(zx, conv_ws, conv_bs, a, d, bias, norm_ws, cfg):
    x, b, c, dt, run = _forward(zx, conv_ws, conv_bs, cfg, in_place=True)
    y = run(x, dt, a, b, c, d, bias)
    return fused_norm.fwd_call(y.astype(cfg[1][2]), zx, norm_ws, cfg[1])[0]


def _core_fwd(zx, conv_ws, conv_bs, a, d, bias, norm_ws, cfg):
    x, b, c, dt, run = _forward(zx, conv_ws, conv_bs, cfg)
    y, ssd_vjp = jax.vjp(run, x, dt, a, b, c, d, bias)
    y = y.astype(cfg[1][2])
    out, rstd = fused_norm.fwd_call(y, zx, norm_ws, cfg[1])
    return out, (zx, conv_ws, conv_bs, norm_ws, y, rstd, out, ssd_vjp)


def _core_bwd(cfg, res, dout):
    conv_cfg, norm_cfg, _ = cfg
    zx, conv_ws, conv_bs, norm_ws, y, rstd, out, ssd_vjp = res
    dy, dzx, dnw = fused_norm.bwd_call(y, zx, norm_ws, rstd, dout, norm_cfg, dz_wide=True,
                                       out=out)
    dx, ddt, da, db, dc, dd, dbias = ssd_vjp(dy.astype(conv_cfg[2]))
    dzx, _, dcw = fused_conv.bwd_call(zx, zx, conv_ws, conv_bs, dx, db, dc, ddt, conv_cfg,
                                      into=dzx)
    dnw = jnp.sum(dnw, axis=(0, 1))
    dcw = jnp.sum(dcw, axis=(0, 1))  # (nd, K + 1, C)
    k_width = conv_ws[0].shape[0]
    return (dzx, tuple(dcw[h, :k_width].astype(w.dtype) for h, w in enumerate(conv_ws)),
            tuple(dcw[h, k_width].astype(b.dtype) for h, b in enumerate(conv_bs)), da, dd, dbias,
            tuple(dnw[k].astype(w.dtype) for k, w in enumerate(norm_ws)))


_core.defvjp(_core_fwd, _core_bwd)


@functools.partial(jax.jit, static_argnums=(7,))
def mixer_core_call(zx, conv_ws, conv_bs, a, d, bias, norm_ws, cfg):
    """`_core` as its own jitted function: the model's many mixers of one shape (every layer,
    each pass) then share one traced and lowered copy of the core and its kernels (JAX caches
    the lowering of identical jitted calls within a module) instead of one per call site."""
    return _core(zx, conv_ws, conv_bs, a, d, bias, norm_ws, cfg)


def mixer_core(zx, conv_ws, conv_bs, a, d, dt_bias, norm_ws, *, ngroups: int, d_state: int,
               chunk_size: int, dt_limit, ssd_impl: str, kernels, eps: float, dtype,
               interpret: bool, xbc_offset: int, dt_offset: int, nheads: int,
               conv_forward: str = "triton", conv_backward: str = "triton"):
    """The mixer between its projections, as the fused prologue, `ssd` and the fused epilogue
    compute it, with one custom VJP (module docstring).

    Args:
      zx: (batch, L, W) the input projection's output [z | xBC | dt], W = D + C + H.
      conv_ws, conv_bs: the directions' conv weights (d_conv, C) and biases (C,): two
        (bidirectional, forward first) or one (causal).
      a, d, dt_bias: the SSM constants of the one SSD call over every direction's heads:
        (nd*H,), (nd*H, headdim), (nd*H,) float32.
      norm_ws: the directions' gated-norm weights (D,), as many as conv_ws.
      ngroups, d_state, chunk_size, dt_limit, ssd_impl, kernels, eps: the mixer's settings.
      dtype: the kernels' activation dtype (x, B, C and the output).
      interpret: run the kernels in the Pallas interpreter.
      xbc_offset, dt_offset, nheads: where xBC and dt sit in zx, and H.
      conv_forward: the prologue's forward kernel, "triton" or "mosaic"
        (`fused_conv.bidirectional_conv_pallas`'s forward_kernel); conv_backward: its
        backward's first kernel, the same way (backward_kernel).
    Returns:
      (batch, L, D) in `dtype`: `bidirectional_gated_norm_pallas` (or `gated_norm_pallas`) of
      the SSD of `bidirectional_conv_pallas`'s (or `causal_conv_pallas`'s) outputs.
    Raises:
      ValueError (one line) where the fused kernels do not take the sizes, or zx's columns are
      not exactly [z | xBC | dt].
    """
    nd = len(conv_ws)
    if len(conv_bs) != nd or len(norm_ws) != nd or nd not in (1, 2):
        raise ValueError(f"mixer_core: one or two directions of conv weights, biases and norm "
                         f"weights, got {len(conv_ws)}, {len(conv_bs)}, {len(norm_ws)}")
    d_inner, conv_dim = norm_ws[0].shape[0], conv_ws[0].shape[1]
    if (xbc_offset, dt_offset, zx.shape[-1]) != (d_inner, d_inner + conv_dim,
                                                 d_inner + conv_dim + nheads):
        raise ValueError(f"mixer_core: zx's {zx.shape[-1]} columns must be [z {d_inner} | xBC "
                         f"{conv_dim} | dt {nheads}], got offsets {xbc_offset}, {dt_offset}")
    conv_cfg = fused_conv.kernel_config(zx, zx, conv_ws, conv_bs, ngroups=ngroups,
                                        d_state=d_state, dtype=dtype, interpret=interpret,
                                        xbc_offset=xbc_offset, dt_offset=dt_offset, nheads=nheads,
                                        forward_kernel=conv_forward,
                                        backward_kernel=conv_backward)
    y_shape = jax.ShapeDtypeStruct((*zx.shape[:2], nd * nheads, d_inner // nheads),
                                   jnp.dtype(dtype))
    norm_cfg = fused_norm.kernel_config(y_shape, nd, ngroups=ngroups, eps=eps, dtype=dtype,
                                        interpret=interpret, z_offset=0)
    ssd_kw = (("chunk_size", int(chunk_size)), ("dt_limit", tuple(dt_limit)),
              ("impl", ssd_impl), ("kernels", kernels))
    return mixer_core_call(zx, tuple(conv_ws), tuple(conv_bs), a, d, dt_bias, tuple(norm_ws),
                           (conv_cfg, norm_cfg, ssd_kw))
