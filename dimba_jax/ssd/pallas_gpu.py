"""SSD on NVIDIA GPUs with Pallas kernels, forward and backward (`ssd(..., impl="pallas")`).

Status: the kernels use the Pallas **Triton** backend (`jax.experimental.pallas.triton`, deprecated
in jax 0.11 but working there), whose `dot` reaches the tensor cores. The issue asks for Mosaic GPU
(`jax.experimental.pallas.mosaic_gpu`); this Triton version is the stepping stone. Measured state
and plans are in docs/ssd_kernel_notes.md.

Algorithm (chunked SSD, `Q` = `block_len` positions per chunk, chosen here for the kernels: the
result does not depend on the chunk length, only the speed does). With the chunk-local
cumulative log-decay s_t = sum_{u<=t in chunk} dt_u A and xd = x * dt:

  1. `_chunk_state` kernel, grid (batch, heads, chunks):
        S_c = xd^T @ (B * exp(s_end - s))                       (headdim x dstate, float32)
  2. `_state_pass` kernel, grid (batch, heads, headdim blocks), sequential over chunks:
        h_0 = initial_states;  h_{c+1} = exp(s_end_c) h_c + S_c  (stored in the operand dtype)
  3. `_chunk_out` kernel, grid (batch, heads, chunks), output in x.dtype:
        y = ((C B^T) o L) @ xd + exp(s) * (C @ h_c^T) + D x,   L_ij = exp(s_i - s_j) [i >= j]

The backward (a `jax.custom_vjp`) mirrors it: the `_chunk_state` kernel again for the gradient
reaching each chunk's incoming state from its outputs, a reverse `_state_pass`, and one
`_chunk_bwd` kernel giving dx, dB, dC (per head, summed over a group's heads in XLA), ddt, ds and
dD partial sums per chunk. dt preprocessing (bias, softplus, clip), the cumulative sum of dt*A
and the z gate stay in XLA outside the custom_vjp, so autodiff handles them.

Packed sequences (`seq_idx`) are handled by per-position segment masks (only when given: the
kernels without them are unchanged). Not supported (`supported()` says why; the dispatcher falls
back to `xla`): a non-Hopper device, headdim or dstate that is not a power of two in [16, 256],
dtypes other than float32/bfloat16/float16.

This module imports without a GPU: the Triton Pallas module is imported lazily.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dimba_jax.ssd import _common

# Chunk length used by the kernels (a power of two); the caller's chunk_size is only a hint.
DEFAULT_BLOCK_LEN = 128
# headdim rows of the state carried by one program of the state-passing kernels.
_STATE_ROWS = 16


def _triton():
    """The Pallas Triton module, imported on first use."""
    from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
    return plt


def _dot(a, b, trans_a=False, trans_b=False):
    """a @ b (optionally transposed) on the tensor cores, float32 accumulation.

    bf16/f16 operands: plain tensor-core products. float32 operands: Triton's default tf32
    tensor-core products (~4e-4 relative error, the same as XLA's default float32 matmuls on
    this GPU). Full-float32 (IEEE) products were tried: at block_len 128 they need more shared
    memory than an H200 has (393 KB requested, 227 KB available) and compile for minutes.
    """
    return _triton().dot(a, b, trans_a=trans_a, trans_b=trans_b)


def _pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _device_reason() -> str | None:
    """None when the default device is a Hopper GPU, else why not."""
    try:
        dev = jax.devices()[0]
    except RuntimeError as e:  # no backend at all
        return f"no jax device ({e})"
    if dev.platform != "gpu":
        return f"default device is {dev.platform}, not an NVIDIA GPU"
    cc = str(getattr(dev, "compute_capability", ""))
    if not cc.startswith("9"):
        return f"GPU compute capability {cc!r} is not Hopper (9.x)"
    try:
        _triton()
    except ImportError as e:
        return f"jax.experimental.pallas.triton unavailable ({e})"
    return None


def supported(*, x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
              dt_limit=(0.0, math.inf), initial_states=None, seq_idx=None,
              return_final_states=False) -> tuple[bool, str]:
    """Whether `ssd_pallas` handles these arguments on the current device.

    Args: as `dimba_jax.ssd.ssd` (arrays or anything with .shape and .dtype).
    Returns:
      (True, "") or (False, reason) where reason names the device or option that is unsupported.
    """
    del dt, A, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states
    del seq_idx, return_final_states
    headdim, dstate = x.shape[-1], B.shape[-1]
    if not (_pow2(headdim) and 16 <= headdim <= 256):
        return False, f"pallas SSD kernel needs headdim a power of two in [16, 256], got {headdim}"
    if not (_pow2(dstate) and 16 <= dstate <= 256):
        return False, f"pallas SSD kernel needs dstate a power of two in [16, 256], got {dstate}"
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                  jnp.dtype(jnp.float16)):
        return False, f"pallas SSD kernel needs x in float32/bfloat16/float16, got {x.dtype}"
    reason = backward_size_reason(headdim, dstate)
    if reason is not None:
        return False, reason
    reason = _device_reason()
    if reason is not None:
        return False, reason
    return True, ""


# The backward kernel (`_chunk_bwd_kernel`) holds (P x N) state tiles and (Q x N) / (Q x P) tiles
# at once; on the H200 headdim 128 x dstate 256 asked for 278,528 bytes of shared memory
# (limit 232,448) and failed to compile, while 128 x 128 and 64 x 128 run.
MAX_BACKWARD_STATE_ITEMS = 128 * 128


def backward_size_reason(headdim: int, dstate: int) -> str | None:
    """None when the Triton backward kernel fits (headdim * dstate <= MAX_BACKWARD_STATE_ITEMS),
    else the reason (shared by the Mosaic forward, whose backward is this one)."""
    if headdim * dstate > MAX_BACKWARD_STATE_ITEMS:
        return (f"the SSD backward kernel needs headdim * dstate <= {MAX_BACKWARD_STATE_ITEMS} "
                f"(shared memory), got {headdim} x {dstate}")
    return None


# --------------------------------------------------------------------------------------------
# Kernels. Every kernel sees one chunk of Q positions of one (batch, head) unless noted.
# --------------------------------------------------------------------------------------------


def _last(v, q):
    """v[q-1] of a (q,) vector, without a scalar load."""
    idx = jax.lax.broadcasted_iota(jnp.int32, (q,), 0)
    return jnp.sum(jnp.where(idx == q - 1, v, 0.0))


def _split(refs, n_in, has_seg):
    """(inputs, seg_ref or None, outputs) of a kernel whose optional segment input is last."""
    if has_seg:
        return refs[:n_in], refs[n_in], refs[n_in + 1:]
    return refs[:n_in], None, refs[n_in:]


def _chunk_state_kernel(*refs, q, mode, has_seg):
    """o = u^T @ (v * w[:, None]) with w = exp(s_end - s) * dt ("state") or exp(s) ("dout").

    With segments (packed sequences), w is zeroed outside the chunk's last segment ("state") or
    outside the segment of the incoming state ("dout")."""
    (u_ref, v_ref, dt_ref, s_ref), seg_ref, (o_ref,) = _split(refs, 4, has_seg)
    u = u_ref[...]
    s = s_ref[...]
    if mode == "state":
        w = jnp.exp(_last(s, q) - s) * dt_ref[...]
        if has_seg:
            w = w * seg_ref[2]
    else:
        w = jnp.exp(s)
        if has_seg:
            w = w * seg_ref[1]
    vw = (v_ref[...].astype(jnp.float32) * w[:, None]).astype(u.dtype)
    o_ref[...] = _dot(u, vw, trans_a=True).astype(o_ref.dtype)


def _state_pass_fwd_kernel(st_ref, dec_ref, h0_ref, hprev_ref, fin_ref, *, nc):
    """h_0 = h0; hprev[c] = h_c; h_{c+1} = dec[c] * h_c + S[c]; fin = h_nc (rows block)."""

    def body(c, h):
        hprev_ref[c] = h.astype(hprev_ref.dtype)
        return dec_ref[c] * h + st_ref[c]

    fin_ref[...] = jax.lax.fori_loop(0, nc, body, h0_ref[...])


def _state_pass_bwd_kernel(dhp_ref, hprev_ref, dec_ref, dfin_ref, dst_ref, dsend_ref, dh0_ref,
                           *, nc):
    """Reverse of `_state_pass_fwd_kernel`: dS[c] = dh_{c+1}; ds_end[c] = dec[c] <h_c, dh_{c+1}>;
    dh_c = dhprev[c] + dec[c] dh_{c+1}; dh0 = dh_0."""

    def body(i, dh):
        c = nc - 1 - i
        dst_ref[c] = dh
        dec = dec_ref[c]
        dsend_ref[c] = dec * jnp.sum(hprev_ref[c] * dh)
        return dhp_ref[c] + dec * dh

    dh0_ref[...] = jax.lax.fori_loop(0, nc, body, dfin_ref[...])


def _load(*refs):
    """The whole block of each ref, in the order given (a tuple of arrays)."""
    return tuple(r[...] for r in refs)


def _masked_decay(s, q, seg=None):
    """L_ij = exp(s_i - s_j) for i >= j (and seg_i == seg_j when segments are given), else 0."""
    i = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    keep = i >= j
    if seg is not None:
        keep = keep & (seg[:, None] == seg[None, :])
    return jnp.exp(jnp.where(keep, s[:, None] - s[None, :], -jnp.inf))


def _chunk_out_kernel(*refs, q, has_seg):
    """y = ((C B^T) o L) @ (x dt) + exp(s) * (C @ h^T) + D x for one chunk."""
    (x_ref, b_ref, c_ref, dt_ref, s_ref, h_ref, d_ref), seg_ref, (y_ref,) = _split(
        refs, 7, has_seg)
    x, b, c, dt, s = _load(x_ref, b_ref, c_ref, dt_ref, s_ref)
    cdt = x.dtype
    g = _dot(c, b, trans_b=True)
    m = (g * _masked_decay(s, q, seg_ref[0] if has_seg else None)).astype(cdt)
    xd = (x.astype(jnp.float32) * dt[:, None]).astype(cdt)
    y = _dot(m, xd)
    h = h_ref[...].astype(cdt)
    e_s = jnp.exp(s) * seg_ref[1] if has_seg else jnp.exp(s)
    y = y + e_s[:, None] * _dot(c, h, trans_b=True)
    y = y + d_ref[...][None, :] * x.astype(jnp.float32)
    y_ref[...] = y.astype(y_ref.dtype)


def _chunk_bwd_kernel(*refs, q, has_seg):
    """Gradients of one chunk's outputs (y and its state S) w.r.t. x, B, C, dt, s and D
    (dD as this chunk's partial sum over positions)."""
    ((x_ref, b_ref, c_ref, dt_ref, s_ref, dy_ref, h_ref, dst_ref, d_ref), seg_ref,
     (dx_ref, db_ref, dc_ref, ddt_ref, ds_ref, dd_ref)) = _split(refs, 9, has_seg)
    f32 = jnp.float32
    x, b, c, dt, s = _load(x_ref, b_ref, c_ref, dt_ref, s_ref)
    cdt = x.dtype
    dy = dy_ref[...].astype(cdt)
    h = h_ref[...].astype(cdt)
    dst = dst_ref[...].astype(cdt)

    xf = x.astype(f32)
    xd_f = xf * dt[:, None]
    xd = xd_f.astype(cdt)
    lmask = _masked_decay(s, q, seg_ref[0] if has_seg else None)
    m_f = _dot(c, b, trans_b=True) * lmask
    m = m_f.astype(cdt)
    dm = _dot(dy, xd, trans_b=True)                 # (q, q) dL/dM
    w = dm * m_f                                      # dL/d(s_i - s_j), zero above the diagonal
    dg = (dm * lmask).astype(cdt)                     # dL/d(C B^T)
    e_s = jnp.exp(s)
    e_end = jnp.exp(_last(s, q) - s)
    if has_seg:  # incoming state reaches the first segment only; S collects the last one only
        e_s = e_s * seg_ref[1]
        e_end = e_end * seg_ref[2]

    b_dst = _dot(b, dst, trans_b=True)              # (q, p)
    dxd = _dot(m, dy, trans_a=True) + e_end[:, None] * b_dst
    dc = _dot(dg, b) + e_s[:, None] * _dot(dy, h)
    db = _dot(dg, c, trans_a=True) + e_end[:, None] * _dot(xd, dst)
    y_off = e_s[:, None] * _dot(c, h, trans_b=True)
    v = e_end * jnp.sum(xd_f * b_dst, axis=1)
    idx = jax.lax.broadcasted_iota(jnp.int32, (q,), 0)
    ds = (jnp.sum(w, axis=1) - jnp.sum(w, axis=0)
          + jnp.sum(dy.astype(f32) * y_off, axis=1)
          - v + jnp.where(idx == q - 1, jnp.sum(v), 0.0))

    d = d_ref[...]
    dy_f = dy.astype(f32)
    dx_ref[...] = (dxd * dt[:, None] + d[None, :] * dy_f).astype(dx_ref.dtype)
    dd_ref[...] = jnp.sum(dy_f * xf, axis=0)
    ddt_ref[...] = jnp.sum(dxd * xf, axis=1)
    db_ref[...] = db.astype(db_ref.dtype)
    dc_ref[...] = dc.astype(dc_ref.dtype)
    ds_ref[...] = ds


# --------------------------------------------------------------------------------------------
# pallas_call wrappers. Layouts: x (b, Lp, h, p); B/C (b, Lp, g, n); dt, s (b, h, Lp) float32;
# chunk states (b, h, nc, p, n) float32.
# --------------------------------------------------------------------------------------------


def _params(num_warps, num_stages=2):
    return _triton().CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _specs(q, p, n, hpg):
    """BlockSpecs for grid (batch, head, chunk)."""
    xs = pl.BlockSpec((None, q, None, p), lambda bi, hi, ci: (bi, ci, hi, 0))
    bs = pl.BlockSpec((None, q, None, n), lambda bi, hi, ci: (bi, ci, hi // hpg, 0))
    vs = pl.BlockSpec((None, None, q), lambda bi, hi, ci: (bi, hi, ci))
    sts = pl.BlockSpec((None, None, None, p, n), lambda bi, hi, ci: (bi, hi, ci, 0, 0))
    hn = pl.BlockSpec((None, q, None, n), lambda bi, hi, ci: (bi, ci, hi, 0))
    ds = pl.BlockSpec((None, p), lambda bi, hi, ci: (hi, 0))
    return xs, bs, vs, sts, hn, ds


def _seg_spec(q):
    """Segment rows (batch, 4, Lp): seg id, in-first-segment, in-last-segment, chunk keep."""
    return pl.BlockSpec((None, 4, q), lambda bi, hi, ci: (bi, 0, ci))


def _with_seg(in_specs, args, seg, q):
    if seg is None:
        return in_specs, args
    return in_specs + [_seg_spec(q)], args + (seg,)


def _chunk_state_call(u, v, dt, s, seg, *, q, hpg, mode, num_warps, interpret):
    bsz, lp, nh, p = u.shape
    n = v.shape[-1]
    nc = lp // q
    xs, bs, vs, sts, _, _ = _specs(q, p, n, hpg)
    in_specs, args = _with_seg([xs, bs, vs, vs], (u, v, dt, s), seg, q)
    return pl.pallas_call(
        functools.partial(_chunk_state_kernel, q=q, mode=mode, has_seg=seg is not None),
        out_shape=jax.ShapeDtypeStruct((bsz, nh, nc, p, n), jnp.float32),
        grid=(bsz, nh, nc),
        in_specs=in_specs,
        out_specs=sts,
        compiler_params=_params(num_warps),
        interpret=interpret,
        name=f"ssd_chunk_{mode}",
    )(*args)


def _state_pass_fwd_call(states, dec, h0, *, hprev_dtype, interpret):
    bsz, nh, nc, p, n = states.shape
    r = min(_STATE_ROWS, p)
    seq = pl.BlockSpec((None, None, nc, r, n), lambda bi, hi, ri: (bi, hi, 0, ri, 0))
    one = pl.BlockSpec((None, None, r, n), lambda bi, hi, ri: (bi, hi, ri, 0))
    decs = pl.BlockSpec((None, None, nc), lambda bi, hi, ri: (bi, hi, 0))
    return pl.pallas_call(
        functools.partial(_state_pass_fwd_kernel, nc=nc),
        out_shape=(jax.ShapeDtypeStruct(states.shape, hprev_dtype),
                   jax.ShapeDtypeStruct((bsz, nh, p, n), jnp.float32)),
        grid=(bsz, nh, p // r),
        in_specs=[seq, decs, one],
        out_specs=(seq, one),
        compiler_params=_params(4),
        interpret=interpret,
        name="ssd_state_pass_fwd",
    )(states, dec, h0)


def _state_pass_bwd_call(dhprev, hprev, dec, dfin, *, interpret):
    bsz, nh, nc, p, n = dhprev.shape
    r = min(_STATE_ROWS, p)
    nr = p // r
    seq = pl.BlockSpec((None, None, nc, r, n), lambda bi, hi, ri: (bi, hi, 0, ri, 0))
    one = pl.BlockSpec((None, None, r, n), lambda bi, hi, ri: (bi, hi, ri, 0))
    decs = pl.BlockSpec((None, None, nc), lambda bi, hi, ri: (bi, hi, 0))
    dsend_spec = pl.BlockSpec((None, None, None, nc), lambda bi, hi, ri: (bi, hi, ri, 0))
    return pl.pallas_call(
        functools.partial(_state_pass_bwd_kernel, nc=nc),
        out_shape=(jax.ShapeDtypeStruct(dhprev.shape, jnp.float32),
                   jax.ShapeDtypeStruct((bsz, nh, nr, nc), jnp.float32),
                   jax.ShapeDtypeStruct((bsz, nh, p, n), jnp.float32)),
        grid=(bsz, nh, nr),
        in_specs=[seq, seq, decs, one],
        out_specs=(seq, dsend_spec, one),
        compiler_params=_params(4),
        interpret=interpret,
        name="ssd_state_pass_bwd",
    )(dhprev, hprev, dec, dfin)


def _chunk_out_call(x, b, c, dt, s, hprev, d, seg, *, q, hpg, num_warps, interpret):
    bsz, lp, nh, p = x.shape
    n = b.shape[-1]
    nc = lp // q
    xs, bs, vs, sts, _, dspec = _specs(q, p, n, hpg)
    in_specs, args = _with_seg([xs, bs, bs, vs, vs, sts, dspec], (x, b, c, dt, s, hprev, d),
                               seg, q)
    return pl.pallas_call(
        functools.partial(_chunk_out_kernel, q=q, has_seg=seg is not None),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(bsz, nh, nc),
        in_specs=in_specs,
        out_specs=xs,
        compiler_params=_params(num_warps),
        interpret=interpret,
        name="ssd_chunk_out",
    )(*args)


def _chunk_bwd_call(x, b, c, dt, s, dy, hprev, dstates, d, seg, *, q, hpg, num_warps,
                    interpret):
    bsz, lp, nh, p = x.shape
    n = b.shape[-1]
    nc = lp // q
    xs, bs, vs, sts, hn, dspec = _specs(q, p, n, hpg)
    f32 = jnp.float32
    # Per-head dB/dC (summed over the heads of a group afterwards) in the operand dtype: halves
    # the largest write of the backward for bf16.
    gdt = x.dtype
    in_specs, args = _with_seg([xs, bs, bs, vs, vs, xs, sts, sts, dspec],
                               (x, b, c, dt, s, dy, hprev, dstates, d), seg, q)
    return pl.pallas_call(
        functools.partial(_chunk_bwd_kernel, q=q, has_seg=seg is not None),
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct((bsz, lp, nh, n), gdt),
                   jax.ShapeDtypeStruct((bsz, lp, nh, n), gdt),
                   jax.ShapeDtypeStruct((bsz, nh, lp), f32),
                   jax.ShapeDtypeStruct((bsz, nh, lp), f32),
                   jax.ShapeDtypeStruct((bsz, nh, nc, p), f32)),
        grid=(bsz, nh, nc),
        in_specs=in_specs,
        out_specs=(xs, hn, hn, vs, vs,
                   pl.BlockSpec((None, None, None, p), lambda bi, hi, ci: (bi, hi, ci, 0))),
        compiler_params=_params(num_warps),
        interpret=interpret,
        name="ssd_chunk_bwd",
    )(*args)


# --------------------------------------------------------------------------------------------
# The differentiable core: padded, chunk-aligned inputs in, y (float32) and final state out.
# --------------------------------------------------------------------------------------------


def _chunk_end_decay(s, seg, q):
    """exp(s at each chunk's end), (b, h, nc); zero for chunks that start a new segment."""
    bsz, nh, lp = s.shape
    dec = jnp.exp(s.reshape(bsz, nh, lp // q, q)[..., -1])
    if seg is not None:
        dec = dec * seg[:, 3].reshape(bsz, 1, lp // q, q)[..., -1]
    return dec


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _core(x, b, c, dt, s, h0, d, seg, cfg):
    """cfg = (q, heads_per_group, warps_fwd, warps_bwd, interpret).

    Returns y = scan output + D x in x.dtype, and the final state (float32)."""
    y, fin, _ = _core_fwd_once(x, b, c, dt, s, h0, d, seg, cfg)
    return y, fin


def _core_fwd_impl(x, b, c, dt, s, h0, d, seg, cfg):
    q, hpg, nwf, _, interp = cfg
    states = _chunk_state_call(x, b, dt, s, seg, q=q, hpg=hpg, mode="state", num_warps=nwf,
                               interpret=interp)
    # The incoming states are stored in the operand dtype: the output kernel multiplies them
    # in that dtype anyway (bf16 tensor cores), so float32 storage would only cost bytes.
    hprev, fin = _state_pass_fwd_call(states, _chunk_end_decay(s, seg, q), h0, hprev_dtype=x.dtype,
                                      interpret=interp)
    y = _chunk_out_call(x, b, c, dt, s, hprev, d, seg, q=q, hpg=hpg, num_warps=nwf,
                        interpret=interp)
    return y, fin, hprev


# Jitted once for all call sites: a model's layers share one jaxpr per (shapes, cfg), lowered once
# (the kernels are not re-lowered per layer; pallas_mosaic._fwd_impl_once says more).
_core_fwd_once = jax.jit(_core_fwd_impl, static_argnums=(8,))


def _core_fwd(x, b, c, dt, s, h0, d, seg, cfg):
    y, fin, hprev = _core_fwd_once(x, b, c, dt, s, h0, d, seg, cfg)
    return (y, fin), (x, b, c, dt, s, hprev, d, seg)


def core_backward(cfg, res, grads, chunk_bwd=None, state_bwd=None):
    """The custom_vjp backward of `_core`: the Triton dout chunk-state and reverse state-pass
    kernels, then `chunk_bwd` (default `_chunk_bwd_call`; pallas_mosaic passes its Mosaic GPU
    kernel, same signature and outputs) for dx, dB, dC, ddt, ds and dD; dB and dC come per
    head, (b, Lp, nheads, N), and are summed over each group's heads here.

    state_bwd: None (the two Triton kernels) or a replacement for both,
      state_bwd(dy, c, dt, s, hprev, dec, dfin, seg, *, q, hpg, interpret) -> (dstates
      (b, h, nc, P, N) float32 or x.dtype, dsend (b, h, k, nc) float32 partial sums over any
      k, dh0 (b, h, P, N) float32); dec (b, h, nc) = `_chunk_end_decay`, dfin float32.

    cfg: (q, heads per group, warps fwd, warps bwd, interpret); res: `_core_fwd`'s residuals
    (x, b, c, dt, s, hprev, d, seg); grads: (dy, dfinal_states). Returns the cotangents of
    (x, b, c, dt, s, h0, d, seg).
    """
    q, hpg, _, nwb, interp = cfg
    x, b, c, dt, s, hprev, d, seg = res
    dy, dfin = grads
    bsz, lp, nh, _ = x.shape
    g, n = b.shape[2], b.shape[3]
    nc = lp // q
    dy = dy.astype(x.dtype)
    dec = _chunk_end_decay(s, seg, q)
    if state_bwd is None:
        dhprev = _chunk_state_call(dy, c, dt, s, seg, q=q, hpg=hpg, mode="dout",
                                   num_warps=nwb, interpret=interp)
        dstates, dsend, dh0 = _state_pass_bwd_call(dhprev, hprev, dec, dfin.astype(jnp.float32),
                                                   interpret=interp)
    else:
        dstates, dsend, dh0 = state_bwd(dy, c, dt, s, hprev, dec, dfin.astype(jnp.float32), seg,
                                        q=q, hpg=hpg, interpret=interp)
    dx, db_h, dc_h, ddt, ds, dd = (chunk_bwd or _chunk_bwd_call)(
        x, b, c, dt, s, dy, hprev, dstates, d, seg, q=q, hpg=hpg, num_warps=nwb, interpret=interp)
    ds = ds.reshape(bsz, nh, nc, q).at[..., -1].add(jnp.sum(dsend, axis=2)).reshape(bsz, nh, lp)
    f32 = jnp.float32

    def per_group(v, dtype):
        if v.shape[2] != g:  # per head: sum each group's heads
            v = v.reshape(bsz, lp, g, hpg, n).sum(axis=3, dtype=f32)
        return v.astype(dtype)

    db, dc = per_group(db_h, b.dtype), per_group(dc_h, c.dtype)
    dseg = None if seg is None else jnp.zeros_like(seg)
    return dx, db, dc, ddt, ds, dh0, jnp.sum(dd, axis=(0, 2)), dseg


@functools.partial(jax.jit, static_argnums=(0,))
def _core_bwd(cfg, res, grads):
    return core_backward(cfg, res, grads)


_core.defvjp(_core_fwd, _core_bwd)


def _segment_rows(seg_ids, lp, q):
    """Per-position segment data the kernels read, (batch, 4, Lp) float32.

    Rows: 0 the segment id; 1 whether the position is in the segment of the state entering its
    chunk (the last segment of the previous chunk; segment 0 for the first chunk, where
    initial_states apply); 2 whether it is in its chunk's last segment; 3 (read at chunk ends)
    whether the entering state survives the whole chunk (no segment change inside it).
    Padding continues the last segment.
    """
    bsz, seqlen = seg_ids.shape
    seg = jnp.pad(seg_ids.astype(jnp.int32), ((0, 0), (0, lp - seqlen)), mode="edge")
    chunks = seg.reshape(bsz, lp // q, q)
    last = chunks[..., -1:]                                               # (b, nc, 1)
    prev = jnp.concatenate([jnp.zeros_like(last[:, :1]), last[:, :-1]], axis=1)
    rows = [chunks, chunks == prev, chunks == last, jnp.broadcast_to(last == prev, chunks.shape)]
    return jnp.stack([r.astype(jnp.float32).reshape(bsz, lp) for r in rows], axis=1)


def prepare_chunks(x, dt, A, B, C, q: int, cdt, *, dt_bias=None, dt_softplus=False,
                   dt_limit=(0.0, float("inf")), initial_states=None, dt_chunks=None):
    """The glue in front of the chunk kernels (shared by the Triton and Mosaic GPU paths).

    x: (b, L, h, P); dt: (b, L, h); A: (h,); B, C: (b, L, g, N); q: kernel chunk length; cdt:
    the kernels' operand dtype. Processes dt (bias, softplus, limits), pads L up to Lp, a
    multiple of q (padded positions get dt = 0: no decay, no input), and forms the chunk-local
    cumulative sum of dt * A (`_common.prepare_dt`; dt_chunks: those two computed beforehand,
    e.g. by `pallas_prologue.prepare_dt_pallas`).
    Returns xk (b, Lp, h, P), bk and ck (b, Lp, g, N) in cdt; dtk (b, h, Lp) float32; sk
    (b, h, Lp) float32 (restarting at every chunk); h0 (b, h, P, N) float32 (zeros if
    initial_states is None).
    """
    bsz, seqlen, nh, p = x.shape
    n = B.shape[-1]
    lp = -(-seqlen // q) * q
    pad = lp - seqlen
    xk, bk, ck = x.astype(cdt), B.astype(cdt), C.astype(cdt)
    if pad:
        pad4 = ((0, 0), (0, pad), (0, 0), (0, 0))
        xk, bk, ck = jnp.pad(xk, pad4), jnp.pad(bk, pad4), jnp.pad(ck, pad4)
    dtk, sk = dt_chunks if dt_chunks is not None else _common.prepare_dt(
        dt, A, q, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
    if initial_states is None:
        h0 = jnp.zeros((bsz, nh, p, n), jnp.float32)
    else:
        h0 = initial_states.astype(jnp.float32)
    return xk, bk, ck, dtk, sk, h0


def ssd_pallas(x, dt, A, B, C, chunk_size, *, D=None, z=None, dt_bias=None, dt_softplus=False,
               dt_limit=(0.0, math.inf), initial_states=None, seq_idx=None,
               return_final_states=False, block_len: int | None = None,
               num_warps_fwd: int = 4, num_warps_bwd: int = 8, interpret: bool = False):
    """SSD through the Pallas GPU kernels; same semantics and returns as `dimba_jax.ssd.ssd`.

    Args:
      x: (batch, seqlen, nheads, headdim) float32/bfloat16/float16.
      dt: (batch, seqlen, nheads).  A: (nheads,).  B, C: (batch, seqlen, ngroups, dstate).
      chunk_size: accepted for the common signature; the kernels use `block_len` positions per
        chunk (default DEFAULT_BLOCK_LEN), which changes only speed, not the result.
      D, z, dt_bias, dt_softplus, dt_limit, initial_states, return_final_states: see `ssd`.
      seq_idx: (batch, seqlen) int or None; the state resets where it changes.
      block_len: kernel chunk length, a power of two >= 16.
      num_warps_fwd, num_warps_bwd: warps per program of the forward / backward kernels.
      interpret: run the kernels in the Pallas interpreter (any device; for tests on CPU).
    Returns:
      y (batch, seqlen, nheads, headdim) in x.dtype [, final_states (batch, nheads, headdim,
      dstate) float32].
    Raises:
      ValueError for invalid shapes or an option the kernels do not support.
    """
    sizes = _common.validate_inputs(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                    dt_limit=dt_limit, initial_states=initial_states,
                                    seq_idx=seq_idx, impl="pallas")
    q = int(block_len or DEFAULT_BLOCK_LEN)
    if not (_pow2(q) and q >= 16):
        raise ValueError(f"ssd_pallas: block_len must be a power of two >= 16, got {q}")
    seqlen, nh = sizes["seqlen"], sizes["nheads"]
    p, g = sizes["headdim"], sizes["ngroups"]
    cdt = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32

    xk, bk, ck, dtk, sk, h0 = prepare_chunks(x, dt, A, B, C, q, cdt, dt_bias=dt_bias,
                                             dt_softplus=dt_softplus, dt_limit=dt_limit,
                                             initial_states=initial_states)
    lp = xk.shape[1]
    if D is None:
        d = jnp.zeros((nh, p), jnp.float32)
    else:
        d = jnp.broadcast_to(D.astype(jnp.float32).reshape(nh, -1), (nh, p))
    cfg = (q, nh // g, int(num_warps_fwd), int(num_warps_bwd), bool(interpret))
    seg = None if seq_idx is None else _segment_rows(_common.segment_ids(seq_idx), lp, q)
    y, fin = _core(xk, bk, ck, dtk, sk, h0, d, seg, cfg)
    y = y[:, :seqlen]
    if z is not None:
        y = _common.apply_skip_and_gate(y, x, z=z)
    else:
        y = y.astype(x.dtype)
    if return_final_states:
        return y, fin
    return y
