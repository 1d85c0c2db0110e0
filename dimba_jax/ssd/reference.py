"""The SSD ground truth: the Mamba-2 recurrence, one time step at a time (`jax.lax.scan`).

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * (x_t outer B_t)      (per head: headdim x dstate)
    y_t = h_t . C_t

with h reset to zero where the segment id changes (packed sequences). Everything is float32 at
the highest matmul precision. It is slow (seqlen sequential steps) and exists to define the
answer that the chunked and kernel implementations are tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def reference_scan(x, dt, A, B, C, *, initial_states=None, segment_ids=None):
    """Sequential SSD recurrence.

    Args:
      x: (batch, seqlen, nheads, headdim), any float dtype.
      dt: (batch, seqlen, nheads) float32, already processed (bias/softplus/clip applied).
      A: (nheads,).
      B, C: (batch, seqlen, ngroups, dstate); head h uses group h // (nheads // ngroups).
      initial_states: (batch, nheads, headdim, dstate) or None (zeros); the state before t = 0.
      segment_ids: (batch, seqlen) int, non-decreasing, starting at 0, or None. The state is reset
        to zero at every t > 0 whose id differs from t - 1's.
    Returns:
      y: (batch, seqlen, nheads, headdim) float32 (without the D skip and z gate),
      final_states: (batch, nheads, headdim, dstate) float32, the state after the last step.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    heads_per_group = nheads // ngroups
    f32 = jnp.float32

    Bh = jnp.repeat(B.astype(f32), heads_per_group, axis=2)  # (b, l, h, n)
    Ch = jnp.repeat(C.astype(f32), heads_per_group, axis=2)
    if segment_ids is None:
        keep = jnp.ones((batch, seqlen), f32)
    else:
        same = segment_ids[:, 1:] == segment_ids[:, :-1]
        keep = jnp.concatenate([jnp.ones((batch, 1), bool), same], axis=1).astype(f32)
    if initial_states is None:
        h0 = jnp.zeros((batch, nheads, headdim, dstate), f32)
    else:
        h0 = initial_states.astype(f32)

    def step(h, inputs):
        x_t, dt_t, b_t, c_t, keep_t = inputs  # (b,h,p) (b,h) (b,h,n) (b,h,n) (b,)
        decay = jnp.exp(dt_t * A.astype(f32)) * keep_t[:, None]
        h = decay[:, :, None, None] * h + (dt_t[:, :, None] * x_t)[..., None] * b_t[:, :, None, :]
        y_t = jnp.einsum("bhpn,bhn->bhp", h, c_t, precision=_HIGHEST)
        return h, y_t

    time_major = (
        jnp.moveaxis(x.astype(f32), 1, 0),
        jnp.moveaxis(dt.astype(f32), 1, 0),
        jnp.moveaxis(Bh, 1, 0),
        jnp.moveaxis(Ch, 1, 0),
        jnp.moveaxis(keep, 1, 0),
    )
    final, ys = jax.lax.scan(step, h0, time_major)
    return jnp.moveaxis(ys, 0, 1), final
