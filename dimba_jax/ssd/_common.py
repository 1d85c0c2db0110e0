"""Pre- and post-processing shared by every SSD implementation.

Every `impl` of `dimba_jax.ssd.ssd` goes through the same three steps, defined once here so the
implementations cannot drift apart:

1. `validate_inputs`: shapes, ranks and options, with a `ValueError` naming the argument.
2. `process_dt` and `segment_ids`: the time step actually used by the recurrence
   (bias, softplus, clamp, all in float32) and monotone segment ids for packed sequences.
3. `apply_skip_and_gate`: the `D * x` skip connection and the `silu(z)` gate, then the cast
   back to the input dtype.

The implementations themselves only compute the scan
    h_t = exp(dt_t * A) * h_{t-1} * [same segment as t-1] + dt_t * (x_t outer B_t),
    y_t = h_t . C_t
from already processed inputs.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "reference", "pallas")

# mamba_ssm's softplus switches to the identity above this input (Triton kernels, threshold 20).
_SOFTPLUS_THRESHOLD = 20.0


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(getattr(a, "shape", ()))


def _check_rank(name: str, a: Any, rank: int, layout: str) -> None:
    if a is None or not hasattr(a, "shape"):
        raise ValueError(f"ssd: {name} must be an array of shape {layout}, got {type(a).__name__}")
    if len(a.shape) != rank:
        raise ValueError(
            f"ssd: {name} must have rank {rank} {layout}, got shape {_shape(a)}")


def validate_inputs(x, dt, A, B, C, chunk_size, *, D=None, z=None, dt_bias=None,
                    dt_limit=(0.0, math.inf), initial_states=None, seq_idx=None,
                    impl="auto") -> dict[str, int]:
    """Checks every argument of `ssd` and returns the sizes.

    Returns:
      dict with batch, seqlen, nheads, headdim, ngroups, dstate (python ints).
    Raises:
      ValueError naming the offending argument and the shapes involved.
    """
    if impl not in IMPLS:
        raise ValueError(f"ssd: unknown impl {impl!r}; expected one of {IMPLS}")
    try:
        if isinstance(chunk_size, bool):
            raise TypeError
        operator.index(chunk_size)
    except TypeError:
        raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}") from None
    if int(chunk_size) <= 0:
        raise ValueError(f"ssd: chunk_size must be > 0, got {chunk_size}")

    _check_rank("x", x, 4, "(batch, seqlen, nheads, headdim)")
    batch, seqlen, nheads, headdim = x.shape
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"ssd: x must be a floating array, got dtype {x.dtype}")
    if seqlen == 0 or batch == 0 or nheads == 0 or headdim == 0:
        raise ValueError(f"ssd: x must have non-empty dimensions, got shape {_shape(x)}")

    _check_rank("dt", dt, 3, "(batch, seqlen, nheads)")
    if _shape(dt) != (batch, seqlen, nheads):
        raise ValueError(
            f"ssd: dt must have shape (batch, seqlen, nheads) = {(batch, seqlen, nheads)} "
            f"to match x {_shape(x)}, got {_shape(dt)}")

    _check_rank("A", A, 1, "(nheads,)")
    if _shape(A) != (nheads,):
        raise ValueError(f"ssd: A must have shape (nheads,) = {(nheads,)}, got {_shape(A)}")

    _check_rank("B", B, 4, "(batch, seqlen, ngroups, dstate)")
    _check_rank("C", C, 4, "(batch, seqlen, ngroups, dstate)")
    if _shape(B) != _shape(C):
        raise ValueError(f"ssd: B and C must have the same shape, got B {_shape(B)} and C {_shape(C)}")
    if _shape(B)[:2] != (batch, seqlen):
        raise ValueError(
            f"ssd: B/C batch and seqlen {_shape(B)[:2]} do not match x's {(batch, seqlen)} "
            f"(x {_shape(x)}, B {_shape(B)})")
    ngroups, dstate = B.shape[2], B.shape[3]
    if ngroups == 0 or dstate == 0:
        raise ValueError(f"ssd: B/C must have non-empty ngroups and dstate, got {_shape(B)}")
    if nheads % ngroups != 0:
        raise ValueError(
            f"ssd: nheads ({nheads}, from x {_shape(x)}) must be divisible by ngroups "
            f"({ngroups}, from B {_shape(B)})")

    if D is not None and _shape(D) not in ((nheads,), (nheads, headdim)):
        raise ValueError(
            f"ssd: D must have shape (nheads,) = {(nheads,)} or (nheads, headdim) = "
            f"{(nheads, headdim)}, got {_shape(D)}")
    if z is not None and _shape(z) != _shape(x):
        raise ValueError(f"ssd: z must have the shape of x {_shape(x)}, got {_shape(z)}")
    if dt_bias is not None and _shape(dt_bias) != (nheads,):
        raise ValueError(f"ssd: dt_bias must have shape (nheads,) = {(nheads,)}, got {_shape(dt_bias)}")
    try:
        lo, hi = dt_limit
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"ssd: dt_limit must be a pair (min, max) of floats, got {dt_limit!r}") from None
    if not lo <= hi:
        raise ValueError(f"ssd: dt_limit must satisfy min <= max, got {dt_limit!r}")
    if initial_states is not None and _shape(initial_states) != (batch, nheads, headdim, dstate):
        raise ValueError(
            f"ssd: initial_states must have shape (batch, nheads, headdim, dstate) = "
            f"{(batch, nheads, headdim, dstate)}, got {_shape(initial_states)}")
    if seq_idx is not None:
        if _shape(seq_idx) != (batch, seqlen):
            raise ValueError(
                f"ssd: seq_idx must have shape (batch, seqlen) = {(batch, seqlen)}, "
                f"got {_shape(seq_idx)}")
        if not jnp.issubdtype(seq_idx.dtype, jnp.integer):
            raise ValueError(f"ssd: seq_idx must be an integer array, got dtype {seq_idx.dtype}")
    return dict(batch=batch, seqlen=seqlen, nheads=nheads, headdim=headdim,
                ngroups=ngroups, dstate=dstate)


def softplus(v: jax.Array) -> jax.Array:
    """mamba_ssm's softplus: log(1 + e^v) for v <= 20, identity above (float32 in, float32 out)."""
    safe = jnp.minimum(v, _SOFTPLUS_THRESHOLD)
    return jnp.where(v <= _SOFTPLUS_THRESHOLD, jnp.log1p(jnp.exp(safe)), v)


def process_dt(dt, *, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf)) -> jax.Array:
    """The step size the recurrence uses, as mamba_ssm computes it.

    dt <- dt + dt_bias; dt <- softplus(dt) if dt_softplus; dt <- clip(dt, *dt_limit).
    The clip is always applied (as in mamba_ssm), so negative steps become dt_limit[0] = 0.

    Args:
      dt: (batch, seqlen, nheads), any float dtype.  dt_bias: (nheads,) or None.
    Returns:
      (batch, seqlen, nheads) float32.
    """
    out = dt.astype(jnp.float32)
    if dt_bias is not None:
        out = out + dt_bias.astype(jnp.float32)
    if dt_softplus:
        out = softplus(out)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    if lo > -math.inf or hi < math.inf:
        out = jnp.clip(out, lo, hi)
    return out


def dt_window_error(dt_shape, layout, nheads: int) -> str:
    """Why `layout` = (offset, directions) cannot read nheads heads' step sizes from an array
    of shape dt_shape (`window_dt`), "" if it can."""
    try:
        offset, directions = (int(v) for v in layout)
    except (TypeError, ValueError):
        return f"ssd: dt_layout must be (offset, directions), got {layout!r}"
    if directions not in (1, 2) or nheads % directions:
        return (f"ssd: dt_layout's directions must be 1 or 2 and divide nheads {nheads}, got "
                f"{directions}")
    if len(dt_shape) != 3 or offset < 0 or offset + nheads // directions > dt_shape[-1]:
        return (f"ssd: dt_layout {tuple(layout)} reads columns [{offset}, "
                f"{offset + nheads // directions}) of dt, which must be (batch, seqlen, "
                f"columns) holding them; got {tuple(dt_shape)}")
    return ""


def window_dt(dt, layout, nheads: int) -> jax.Array:
    """The (batch, seqlen, nheads) step sizes that `layout` = (offset, directions) reads from
    the wider dt (batch, seqlen, W): its columns [offset, offset + nheads / directions), and
    with two directions the same columns again in reversed time for heads [nheads / 2,
    nheads) (a bidirectional mixer's backward direction, in scan time). dt's dtype."""
    offset, directions = (int(v) for v in layout)
    cols = dt[..., offset:offset + nheads // directions]
    return cols if directions == 1 else jnp.concatenate([cols, jnp.flip(cols, axis=1)], axis=2)


def prepare_dt(dt, A, q: int, *, dt_bias=None, dt_softplus=False,
               dt_limit=(0.0, math.inf)) -> tuple[jax.Array, jax.Array]:
    """The step sizes in the chunk kernels' layout: dt (b, L, h) any float dtype, A (h,), q the
    chunk length -> (dtk, sk) float32 (b, h, Lp), Lp = L rounded up to a multiple of q: dtk the
    processed dt (`process_dt`; 0 at padded positions: no decay, no input), sk the chunk-local
    cumulative sum of dtk * A (restarting at every multiple of q)."""
    bsz, seqlen, nh = dt.shape
    dtp = process_dt(dt, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
    lp = -(-seqlen // q) * q
    if lp != seqlen:
        dtp = jnp.pad(dtp, ((0, 0), (0, lp - seqlen), (0, 0)))
    dtk = jnp.transpose(dtp, (0, 2, 1))  # (b, h, Lp)
    a = dtk * A.astype(jnp.float32)[None, :, None]
    return dtk, jnp.cumsum(a.reshape(bsz, nh, lp // q, q), axis=-1).reshape(bsz, nh, lp)


def segment_ids(seq_idx) -> jax.Array | None:
    """Monotone segment ids: 0 for the first segment, +1 at every position where seq_idx changes.

    The state resets exactly where seq_idx changes (also for patterns such as 0,1,0, which become
    segments 0,1,2), and initial_states apply to segment 0 only.

    Args:
      seq_idx: (batch, seqlen) integer or None.
    Returns:
      (batch, seqlen) int32 or None.
    """
    if seq_idx is None:
        return None
    changed = (seq_idx[:, 1:] != seq_idx[:, :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros_like(changed[:, :1]), jnp.cumsum(changed, axis=1)], axis=1)


def apply_skip_and_gate(y, x, *, D=None, z=None) -> jax.Array:
    """y + D * x, then times silu(z); float32 math, returned in x.dtype.

    Args:
      y: (batch, seqlen, nheads, headdim) float32, the scan output h_t . C_t.
      x: (batch, seqlen, nheads, headdim).  D: (nheads,) or (nheads, headdim) or None.
      z: (batch, seqlen, nheads, headdim) or None.
    Returns:
      (batch, seqlen, nheads, headdim) in x.dtype.
    """
    y = y.astype(jnp.float32)
    if D is not None:
        d = D.astype(jnp.float32)
        d = d[:, None] if d.ndim == 1 else d
        y = y + x.astype(jnp.float32) * d
    if z is not None:
        zf = z.astype(jnp.float32)
        y = y * (zf * jax.nn.sigmoid(zf))
    return y.astype(x.dtype)


_WARNED: set[tuple[str, str]] = set()


def warn_once(logger: logging.Logger, message: str) -> None:
    """logger.warning(message), once per (logger, message) in a process (fallback notices that
    would otherwise repeat at every trace)."""
    key = (logger.name, message)
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message)
