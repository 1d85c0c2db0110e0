"""Chunked SSD (Mamba-2's state-space duality) in plain XLA: the `impl="xla"` path.

The sequence is cut into chunks of Q = chunk_size steps. With a_t = dt_t * A and
Acs = cumsum of a within a chunk (float32), the output splits into four pieces:

1. intra-chunk (quadratic in Q, a masked "attention"):
       y_diag[q] = sum_{k <= q} (C_q . B_k) exp(Acs_q - Acs_k) dt_k x_k
2. chunk states (what each chunk adds to the state at its end):
       S_c = sum_k exp(Acs_last - Acs_k) dt_k x_k outer B_k
3. inter-chunk state passing, an associative scan over chunks (linear in their number):
       H_c = exp(Acs_last(c)) H_{c-1} + S_c,      H_{-1} = initial_states
4. state to output:
       y_off[q] = exp(Acs_q) (H_{c-1} . C_q)

Matmul operands are in the input dtype (bf16 on accelerators) with float32 accumulation; cumsums,
exponentials and states are float32. Packed sequences (segment ids) zero every decay that crosses
a segment change: inside the intra-chunk mask, in the chunk-state weights, in the chunk-to-chunk
decay and in the state-to-output term. Nothing of size (chunks x chunks) or (seqlen x seqlen) is
built; the largest intermediate is the per-chunk (Q x Q) decay matrix for every head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


# ------------------------------------------------------------------ matmul with bf16 gradients
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum(spec, a, b) with operands in their own (shared) dtype and a float32 result.

    Autodiff of a plain `einsum(..., preferred_element_type=float32)` would feed the float32
    cotangent straight into the backward matmuls, turning bf16 tensor-core matmuls into float32
    ones. Here the cotangent is cast to the operand dtype first (a no-op for float32 inputs), so
    the backward matmuls are bf16 x bf16 with float32 accumulation, like the forward.
    """
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _matmul_fwd(spec, a, b):
    return _matmul(spec, a, b), (a, b)


def _matmul_bwd(spec, residuals, g):
    a, b = residuals
    _, vjp = jax.vjp(
        lambda a_, b_: jnp.einsum(spec, a_, b_, preferred_element_type=a.dtype), a, b)
    return vjp(g.astype(a.dtype))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


# ------------------------------------------------------------------ pieces
def _pad_time(a: jax.Array, pad: int, mode: str = "constant") -> jax.Array:
    if pad == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[1] = (0, pad)
    return jnp.pad(a, widths, mode=mode)


def _intra_chunk(C, B, x, Acs_h, dt_h, mask):
    """Quadratic term inside each chunk.

    C, B: (b, c, Q, g, n) compute dtype; x: (b, c, Q, g, r, p) compute dtype;
    Acs_h, dt_h: (b, c, g, r, Q) float32; mask: bool broadcastable to (b, c, g, r, Q, Q).
    Returns (b, c, Q, g, r, p) float32.
    """
    cb = _matmul("bcqgn,bckgn->bcgqk", C, B)  # (b, c, g, Q, Q), shared by the heads of a group
    diff = Acs_h[..., :, None] - Acs_h[..., None, :]  # (b, c, g, r, Q, Q): Acs_q - Acs_k
    decay = jnp.exp(jnp.where(mask, diff, -jnp.inf))
    m = (cb[:, :, :, None] * decay * dt_h[..., None, :]).astype(x.dtype)
    return _matmul("bcgrqk,bckgrp->bcqgrp", m, x)


def _combine_chunks(left, right):
    """Composes two affine state updates H -> a H + s (left first, then right)."""
    a_l, s_l = left
    a_r, s_r = right
    return a_l * a_r, a_r[..., None, None] * s_l + s_r


def chunked_scan(x, dt, A, B, C, chunk_size, *, initial_states=None, segment_ids=None,
                 remat_intra: bool = True):
    """Chunked SSD scan; same contract as `reference.reference_scan`.

    Args:
      x: (batch, seqlen, nheads, headdim); its dtype is the matmul operand dtype.
      dt: (batch, seqlen, nheads) float32, already processed (bias/softplus/clip applied).
      A: (nheads,).
      B, C: (batch, seqlen, ngroups, dstate); cast to x.dtype for the matmuls.
      chunk_size: int > 0; any seqlen works (padded internally with dt = 0, which changes
        neither the outputs nor the final states). Sequences shorter than a chunk use one chunk
        of length seqlen.
      initial_states: (batch, nheads, headdim, dstate) or None; applies to segment 0 only.
      segment_ids: (batch, seqlen) int, non-decreasing from 0, or None (one segment).
      remat_intra: recompute the (Q x Q) decay matrices in the backward pass instead of
        storing them (less memory traffic; same numbers).
    Returns:
      y: (batch, seqlen, nheads, headdim) float32 (without D skip and z gate),
      final_states: (batch, nheads, headdim, dstate) float32.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    r = nheads // ngroups
    f32 = jnp.float32
    dtype = x.dtype
    q_len = min(int(chunk_size), seqlen)
    nchunks = -(-seqlen // q_len)
    pad = nchunks * q_len - seqlen

    x = _pad_time(x, pad)
    dt = _pad_time(dt.astype(f32), pad)  # dt = 0 on padding: no decay, no input
    B = _pad_time(B.astype(dtype), pad)
    C = _pad_time(C.astype(dtype), pad)

    shape_c = (batch, nchunks, q_len)
    xc = x.reshape(*shape_c, ngroups, r, headdim)
    Bc = B.reshape(*shape_c, ngroups, dstate)
    Cc = C.reshape(*shape_c, ngroups, dstate)
    dtc = dt.reshape(*shape_c, ngroups, r)
    Acs = jnp.cumsum(dtc * A.astype(f32).reshape(ngroups, r), axis=2)  # (b, c, Q, g, r)
    Acs_last = Acs[:, :, -1]  # (b, c, g, r)

    causal = jnp.tril(jnp.ones((q_len, q_len), bool))
    if segment_ids is None:
        mask = causal
        state_keep = None
        chunk_keep = None
        off_keep = None
    else:
        seg = _pad_time(segment_ids.astype(jnp.int32), pad, mode="edge").reshape(shape_c)
        same = seg[:, :, :, None] == seg[:, :, None, :]  # (b, c, Q, Q)
        mask = (causal & same)[:, :, None, None]  # (b, c, 1, 1, Q, Q)
        seg_end = seg[:, :, -1]  # (b, c): segment at each chunk's last step
        seg_prev_end = jnp.concatenate([jnp.zeros_like(seg_end[:, :1]), seg_end[:, :-1]], axis=1)
        state_keep = (seg == seg_end[:, :, None])[..., None, None]  # (b, c, Q, 1, 1)
        chunk_keep = (seg_end == seg_prev_end)[:, :, None, None]  # (b, c, 1, 1)
        off_keep = (seg == seg_prev_end[:, :, None])[..., None, None]  # (b, c, Q, 1, 1)

    # 1. intra-chunk
    Acs_h = jnp.moveaxis(Acs, 2, -1)  # (b, c, g, r, Q)
    dt_h = jnp.moveaxis(dtc, 2, -1)
    intra = jax.checkpoint(_intra_chunk) if remat_intra else _intra_chunk
    y = intra(Cc, Bc, xc, Acs_h, dt_h, mask)  # (b, c, Q, g, r, p) f32

    # 2. chunk states
    w = jnp.exp(Acs_last[:, :, None] - Acs) * dtc  # (b, c, Q, g, r)
    if state_keep is not None:
        w = jnp.where(state_keep, w, 0.0)
    xw = (xc * w[..., None]).astype(dtype)
    states = _matmul("bckgrp,bckgn->bcgrpn", xw, Bc)  # (b, c, g, r, p, n) f32

    # 3. state passing across chunks
    chunk_decay = jnp.exp(Acs_last)  # (b, c, g, r)
    if chunk_keep is not None:
        chunk_decay = jnp.where(chunk_keep, chunk_decay, 0.0)
    if initial_states is None:
        h_init = jnp.zeros((batch, 1, ngroups, r, headdim, dstate), f32)
    else:
        h_init = initial_states.astype(f32).reshape(batch, 1, ngroups, r, headdim, dstate)
        first = states[:, :1] + chunk_decay[:, :1, ..., None, None] * h_init
        states = jnp.concatenate([first, states[:, 1:]], axis=1)
    _, h_end = jax.lax.associative_scan(_combine_chunks, (chunk_decay, states), axis=1)
    final_states = h_end[:, -1].reshape(batch, nheads, headdim, dstate)
    h_prev = jnp.concatenate([h_init, h_end[:, :-1]], axis=1)  # state entering each chunk

    # 4. state to output
    y_off = _matmul("bcqgn,bcgrpn->bcqgrp", Cc, h_prev.astype(dtype))
    scale = jnp.exp(Acs)  # (b, c, Q, g, r)
    if off_keep is not None:
        scale = jnp.where(off_keep, scale, 0.0)
    y = y + y_off * scale[..., None]

    y = y.reshape(batch, nchunks * q_len, nheads, headdim)[:, :seqlen]
    return y, final_states
