"""Adaptive time warping: training noise levels drawn where the loss changes (CDCD's idea).

`NoiseWarp` is a monotone piecewise-linear fit F(lambda) of the denoiser's cross-entropy as a
function of the log-SNR lambda, on K equal bins from the cleanest level lambda_hi down to the
noisiest lambda_lo (knots lambda_k = lambda_hi - k (lambda_hi - lambda_lo) / K, k = 0..K):

    F(lambda_k) = bias + sum_{j < k} inc_j,     inc_j = softplus(GAIN * w_j) >= 0,

linear between knots, so F grows with the noise as the cross-entropy does. Its parameters are
trained with the model by regression on the observed per-example cross-entropy
(`regression_loss`, gradients stopped on the model side), so the fit follows the running loss
and is saved with the model in every checkpoint (and averaged by the EMA).

Normalised, F is a CDF over lambda: G(lambda) = (F(lambda) - F(lambda_hi)) / (F(lambda_lo) -
F(lambda_hi)). Training draws u ~ U(0, 1) and lambda = G^-1(u), so the density of training levels
is proportional to |dCE/dlambda|: the steps go where the cross-entropy changes, i.e. where tokens
are being decided, and almost none where the answer is already certain or still hopeless. The
samplers put their T steps at the quantiles of the same distribution (`quantile_grid`). A floor
(`floor` x the mean bin mass, added to every bin) keeps every level visited, so a bin that the
fit has written off can come back.

Both parameters are 1-D or scalars, so AdamW never decays them. GAIN multiplies the raw parameters so that Adam's per-step moves (about the learning rate) move
the fit fast enough to follow the loss within a few hundred steps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

GAIN = 20.0


class NoiseWarp(nnx.Module):
    """Monotone piecewise-linear fit of cross-entropy over log-SNR (see the module docstring).

    Args:
      logsnr_lo, logsnr_hi: the noisiest and the cleanest level (lambda_lo < lambda_hi).
      bins: K, the number of linear pieces.
      max_loss: the value F starts at the noisy end (log of the vocabulary size: the
        cross-entropy of a uniform guess); the fit starts as a straight line from 0 to it.
      floor: mass added to every bin when sampling, as a fraction of the mean bin mass.
    """

    def __init__(self, logsnr_lo: float, logsnr_hi: float, *, bins: int = 64, max_loss: float = 9.0,
                 floor: float = 0.05, rngs: nnx.Rngs | None = None):
        if not logsnr_lo < logsnr_hi:
            raise ValueError(f"noise warp needs logsnr_lo < logsnr_hi, got {logsnr_lo}, {logsnr_hi}")
        if bins < 2 or floor < 0:
            raise ValueError(f"noise warp needs bins >= 2 and floor >= 0, got {bins}, {floor}")
        self.logsnr_lo = float(logsnr_lo)
        self.logsnr_hi = float(logsnr_hi)
        self.bins = int(bins)
        self.floor = float(floor)
        inc = max(float(max_loss), 1e-3) / bins
        w0 = math.log(math.expm1(inc)) / GAIN  # softplus(GAIN w0) = inc
        self.w = nnx.Param(jnp.full((bins,), w0, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((), jnp.float32))

    def increments(self) -> jax.Array:
        """inc_k >= 0: float32 (K,), the rise of F over bin k (bin 0 at the clean end)."""
        return jax.nn.softplus(GAIN * self.w[...].astype(jnp.float32))

    def knots(self) -> tuple[jax.Array, jax.Array]:
        """(lambda_k float32 (K+1,) descending, F(lambda_k) float32 (K+1,) ascending)."""
        lam = jnp.linspace(self.logsnr_hi, self.logsnr_lo, self.bins + 1, dtype=jnp.float32)
        f = self.bias[...].astype(jnp.float32) + jnp.concatenate(
            [jnp.zeros((1,), jnp.float32), jnp.cumsum(self.increments())])
        return lam, f

    def __call__(self, logsnr: jax.Array) -> jax.Array:
        """F(lambda): the fitted cross-entropy at log-SNR `logsnr` (any shape) -> float32, same shape."""
        lam, f = self.knots()
        pos = (self.logsnr_hi - jnp.clip(logsnr.astype(jnp.float32), self.logsnr_lo, self.logsnr_hi)) \
            / (self.logsnr_hi - self.logsnr_lo) * self.bins
        k = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, self.bins - 1)
        return f[k] + (pos - k) * self.increments()[k]

    def regression_loss(self, logsnr: jax.Array, observed: jax.Array, weight: jax.Array | None = None
                        ) -> jax.Array:
        """mean((F(lambda) - observed)^2) (weighted by `weight` where given: a bool or float mask of
        the same shape), gradients only into the warp. Any equal shapes, e.g. (b,) per example or
        (b, L) per position -> float32 scalar."""
        se = jnp.square(self(logsnr) - jax.lax.stop_gradient(observed.astype(jnp.float32)))
        if weight is None:
            return jnp.mean(se)
        w = weight.astype(jnp.float32)
        return jnp.sum(se * w) / jnp.maximum(jnp.sum(w), 1.0)

    def bin_mass(self) -> jax.Array:
        """Sampling mass per bin: float32 (K,) summing to 1 (increments plus the floor; no gradient)."""
        inc = jax.lax.stop_gradient(self.increments())
        mass = inc + self.floor * jnp.mean(inc)
        return mass / jnp.sum(mass)

    def inverse_cdf(self, u: jax.Array) -> jax.Array:
        """lambda = G^-1(u) for u in [0, 1] (any shape): u = 0 the cleanest level, u = 1 the noisiest.
        Within a bin the CDF is linear. -> float32, same shape as u."""
        mass = self.bin_mass()
        cdf = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(mass)])
        u = jnp.clip(u.astype(jnp.float32), 0.0, 1.0)
        k = jnp.clip(jnp.searchsorted(cdf, u, side="right") - 1, 0, self.bins - 1)
        frac = jnp.clip((u - cdf[k]) / jnp.maximum(mass[k], 1e-12), 0.0, 1.0)
        width = (self.logsnr_hi - self.logsnr_lo) / self.bins
        return self.logsnr_hi - (k + frac) * width

    def cdf(self, logsnr: jax.Array) -> jax.Array:
        """G(lambda) of the sampling distribution (the inverse of `inverse_cdf`) -> float32, same shape."""
        mass = self.bin_mass()
        cdf = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(mass)])
        pos = (self.logsnr_hi - jnp.clip(logsnr.astype(jnp.float32), self.logsnr_lo, self.logsnr_hi)) \
            / (self.logsnr_hi - self.logsnr_lo) * self.bins
        k = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, self.bins - 1)
        return cdf[k] + (pos - k) * mass[k]

    def sample(self, rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Training levels lambda = G^-1(u), u ~ U(0, 1): float32 of `shape`."""
        return self.inverse_cdf(jax.random.uniform(rng, shape, jnp.float32))

    def quantile_grid(self, steps: int) -> jax.Array:
        """The sampler's levels: lambda at u = 1, (S-1)/S, ..., 1/S (noisiest first): float32 (S,)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        u = 1.0 - jnp.arange(steps, dtype=jnp.float32) / steps
        return self.inverse_cdf(u)
