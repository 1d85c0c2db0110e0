"""RMS normalisation layers: plain RMSNorm and the gated, grouped RMSNorm of Mamba-2.

Both compute in float32 whatever the input dtype and return the input's dtype (or `dtype`
when given). Parameters carry logical axis names for sharding ("embed" for norms over
d_model, "mlp" for the gated norm over d_inner).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def partitioned(init, names: tuple):
    """Wraps an initializer with logical axis names (no eager placement: the trainer shards).

    `eager_sharding=False` keeps variable creation independent of any mesh context, so the
    same module can be built in tests, under `jax.jit(..., out_shardings=...)`, or on a mesh.
    """
    return nnx.with_partitioning(init, names, eager_sharding=False)


def _rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2, -1) + eps), computed in float32. Shape preserved."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def prenorm(h: jax.Array, delta: jax.Array | None, weight: jax.Array, mod: jax.Array | None,
            *, eps: float = 1e-5, dtype=None) -> tuple[jax.Array, jax.Array]:
    """A block's pre-norm: the previous block's residual add, RMSNorm and conditioning.

        u = h + delta                                    (in h's dtype; u = h without delta)
        x = (u * rsqrt(mean(u^2) + eps) * w) * (1 + scale[b]) + shift[b]

    Args:
      h: (batch, L, d) residual stream (float32 in the models).
      delta: (batch, L, d) any float dtype (the previous block's mixer output), or None.
      weight: (d,) RMSNorm weight.
      mod: (batch, 2, d) float32 [scale; shift] (FiLM; additive conditioning has scale 0), or
        None (no conditioning).
      eps: added to the mean square.
      dtype: dtype of x (default h.dtype).
    Returns:
      (u (batch, L, d) in h.dtype, x (batch, L, d) in `dtype`): what `RMSNorm` and the
      conditioning modules compute, in that order of operations.
    Raises:
      ValueError (one line) for shapes that do not fit together.
    """
    if h.ndim != 3:
        raise ValueError(f"h must be (batch, seqlen, d_model), got {h.shape}")
    bsz, _, d = h.shape
    if delta is not None and delta.shape != h.shape:
        raise ValueError(f"delta must have h's shape {h.shape}, got {delta.shape}")
    if weight.shape != (d,):
        raise ValueError(f"weight must be ({d},), got {weight.shape}")
    if mod is not None and mod.shape != (bsz, 2, d):
        raise ValueError(f"mod must be (batch, 2, d_model) = {(bsz, 2, d)}, got {mod.shape}")
    u = h if delta is None else h + delta.astype(h.dtype)
    x = (_rms_normalize(u, eps) * weight.astype(jnp.float32)).astype(h.dtype).astype(jnp.float32)
    if mod is not None:
        mod = mod.astype(jnp.float32)
        x = (x * (1.0 + mod[:, None, 0]) + mod[:, None, 1]).astype(h.dtype)
    return u, x.astype(dtype or h.dtype)


def gated_rms_norm(y: jax.Array, z: jax.Array, weight: jax.Array, *, ngroups: int = 1,
                   eps: float = 1e-5, dtype=None) -> jax.Array:
    """normalise(y * silu(z)) * weight per group of d/ngroups channels, in float32.

    y, z: (..., d); weight: (d,). Returns (..., d) in `dtype` (default y.dtype).
    """
    out_dtype = dtype or y.dtype
    g = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    grouped = g.reshape(*g.shape[:-1], ngroups, g.shape[-1] // ngroups)
    g = _rms_normalize(grouped, eps).reshape(g.shape)
    return (g * weight.astype(jnp.float32)).astype(out_dtype)


class RMSNorm(nnx.Module):
    """y = x / rms(x) * weight over the last axis (eps inside the square root).

    Args:
      dim: size of the normalised (last) axis.
      eps: added to the mean square (mamba_ssm uses 1e-5).
      dtype: output dtype; None = the input's dtype.
      param_dtype: dtype of `weight` (initialised to ones).
      axis_name: logical axis name of `weight` ("embed" for d_model, "mlp" for d_inner).
    """

    def __init__(self, dim: int, eps: float = 1e-5, *, dtype=None, param_dtype=jnp.float32,
                 axis_name: str = "embed", rngs: nnx.Rngs):
        del rngs  # deterministic init (ones); kept for the uniform constructor signature
        self.dim = dim
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(partitioned(nnx.initializers.ones, (axis_name,))(
            jax.random.key(0), (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., dim) any float dtype -> (..., dim) in `dtype` (default: x.dtype)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm expects last axis {self.dim}, got shape {x.shape}")
        out_dtype = self.dtype or x.dtype
        y = _rms_normalize(x, self.eps) * self.weight[...].astype(jnp.float32)
        return y.astype(out_dtype)


class GatedRMSNorm(nnx.Module):
    """Mamba-2's gated RMSNorm with the gate applied first (mamba_ssm `norm_before_gate=False`).

    g = y * silu(z); g is split into `ngroups` groups of dim/ngroups channels along the last
    axis, each group normalised by its own RMS, then multiplied by `weight` (dim,).

    Args:
      dim: channels (d_inner); must be divisible by ngroups.
      ngroups: normalisation groups (Mamba-2's ngroups, so tensor-parallel shards stay local).
      eps: added to each group's mean square (1e-5 as in mamba_ssm).
      dtype: output dtype; None = y's dtype.
      param_dtype: dtype of `weight` (initialised to ones; logical axis "mlp").
    """

    def __init__(self, dim: int, ngroups: int = 1, eps: float = 1e-5, *, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        del rngs
        if ngroups <= 0 or dim % ngroups:
            raise ValueError(f"GatedRMSNorm: dim {dim} must be divisible by ngroups {ngroups}")
        self.dim = dim
        self.ngroups = ngroups
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(partitioned(nnx.initializers.ones, ("mlp",))(
            jax.random.key(0), (dim,), param_dtype))

    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        """y, z: (..., dim) -> normalise(y * silu(z)) * weight, (..., dim) in `dtype` or y.dtype."""
        if y.shape != z.shape or y.shape[-1] != self.dim:
            raise ValueError(f"GatedRMSNorm expects y and z of shape (..., {self.dim}); "
                             f"got {y.shape} and {z.shape}")
        return gated_rms_norm(y, z, self.weight[...], ngroups=self.ngroups, eps=self.eps,
                              dtype=self.dtype)
