"""The cosine noise schedule of DIMBA and the forward (noising) process.

Formula (the seed's, used exactly, with no renormalisation by its value at t = 0):

    alpha_bar(t) = cos^2( ((t / T + s) / (1 + s)) * pi / 2 ),   s = 0.008,  t = 0 .. T
    beta_t       = 1 - alpha_bar(t) / alpha_bar(t - 1),          t = 1 .. T

Decisions where the formula leaves a gap (documented and tested):

* alpha_bar(0) = cos^2(s / (1 + s) * pi/2) ~= 0.99984, not 1: the seed does not renormalise, so
  neither do we. The *sampler* treats "time 0" as clean data (alpha_bar_prev = 1 at its last step,
  which simply returns the x0 estimate, as DDPM does).
* alpha_bar(T) = cos^2(pi/2) = 0 makes beta_T = 1. As is usual (Nichol & Dhariwal 2021) beta is
  clipped at `max_beta` = 0.999. To keep alpha_bar and beta consistent (alpha_bar(t) =
  alpha_bar(t-1) * (1 - beta_t) at every t) the clip is applied to alpha_bar too, which only changes
  alpha_bar(T) from 0 to 0.001 * alpha_bar(T-1) (~2e-9 for T = 1000): every stored alpha_bar equals the
  formula to within 1e-8 absolute.
* Tables are computed in float64 numpy and stored as float32.

Log-SNR view. lambda = log(alpha_bar / (1 - alpha_bar)) is the per-channel log signal-to-noise
ratio; the model, the loss and the samplers work with lambda (alpha_bar = sigmoid(lambda)), so the
noise level can also be drawn continuously (diffusion/warp.py). `logsnr_shift` adds a constant to
lambda(t) at every t (alpha_bar(t) <- sigmoid(logit(alpha_bar(t)) + shift)): a negative shift
moves the whole cosine schedule toward more noise. Why it matters: with embedding rows of norm
sqrt(d) the per-token SNR is d * exp(lambda), and the band where tokens are decided (per-token SNR
~0.5 to ~20) sits at lambda ~ log(0.5/d) .. log(20/d) — for d = 512 at t > 0.88 of the unshifted
schedule, so uniform t spends ~85% of training and sampling where there is nothing to learn. A
shift of log(c/d) for a per-token SNR c at the middle of the schedule puts the band in the middle.
With shift = 0 every table equals the formula above exactly.

Noising at level lambda: x_t = sqrt(sigmoid(lambda)) x0 + sqrt(sigmoid(-lambda)) eps
(`add_noise_logsnr`), which at lambda(t) is sqrt(alpha_bar(t)) x0 + sqrt(1 - alpha_bar(t)) eps.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def cosine_alpha_bar(t: np.ndarray, timesteps: int, s: float = 0.008) -> np.ndarray:
    """The raw formula alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), float64, any shape of t."""
    t = np.asarray(t, dtype=np.float64)
    return np.cos(((t / timesteps + s) / (1.0 + s)) * math.pi / 2.0) ** 2


@dataclasses.dataclass(frozen=True)
class CosineSchedule:
    """Discrete cosine schedule with T steps.

    Attributes:
      timesteps: T (training steps; t in 1..T).
      s: the cosine offset.
      max_beta: clip of beta_t (0.999).
      alpha_bar: float32 (T + 1,) — alpha_bar[t] for t = 0..T (see module docstring).
      betas: float32 (T + 1,) — betas[t] = 1 - alpha_bar[t] / alpha_bar[t - 1]; betas[0] = 0.
      logsnr_shift: constant added to the log-SNR at every t (0 = the formula as written).
    """

    timesteps: int
    s: float
    max_beta: float
    alpha_bar: np.ndarray
    betas: np.ndarray
    logsnr_shift: float = 0.0

    def _key(self):
        return (self.timesteps, self.s, self.max_beta, self.logsnr_shift)

    def __hash__(self):  # usable as a static jit argument
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, CosineSchedule) and self._key() == other._key()

    def alpha_bar_at(self, t: jax.Array) -> jax.Array:
        """alpha_bar for integer timesteps t (any shape, int, values 0..T) -> float32, same shape."""
        return jnp.asarray(self.alpha_bar)[t]

    def logsnr_table(self) -> np.ndarray:
        """lambda(t) = log(alpha_bar / (1 - alpha_bar)) for t = 0..T: float32 (T + 1,), decreasing."""
        ab = self.alpha_bar.astype(np.float64)
        return (np.log(ab) - np.log1p(-ab)).astype(np.float32)

    def logsnr_at(self, t: jax.Array) -> jax.Array:
        """lambda at integer timesteps t (any shape, values 0..T) -> float32, same shape."""
        return jnp.asarray(self.logsnr_table())[t]

    def logsnr_range(self) -> tuple[float, float]:
        """(lambda at t = T, lambda at t = 0): the noisiest and the cleanest level of the schedule."""
        table = self.logsnr_table()
        return float(table[-1]), float(table[0])

    def sample_t(self, rng: jax.Array, shape: tuple[int, ...], power: float = 1.0) -> jax.Array:
        """Training timesteps: int32 of `shape` in 1..T.

        power = 1: t ~ U{1..T}. power > 1: t = ceil(T * u**(1/power)), u ~ U(0, 1), so
        P(t <= k) = (k/T)**power and large t (the noisy end, where the denoising task is hard
        when the embedding rows are long: docs/small_run/README.md) is drawn more often;
        power < 1 favours small t. Raises ValueError if power <= 0.
        """
        if not power > 0:
            raise ValueError(f"t sampling power must be > 0, got {power!r}")
        if power == 1.0:
            return jax.random.randint(rng, shape, 1, self.timesteps + 1, dtype=jnp.int32)
        u = jax.random.uniform(rng, shape, jnp.float32)
        t = jnp.ceil(self.timesteps * u ** (1.0 / power)).astype(jnp.int32)
        return jnp.clip(t, 1, self.timesteps)

    def respaced_timesteps(self, steps: int) -> np.ndarray:
        """The `steps` kept timesteps for a respaced reverse process, descending, int32 (steps,).

        A strided subsequence of 1..T that always contains T (start from pure noise) and 1:
        round(linspace(T, 1, steps)); all distinct because steps <= T makes the spacing >= 1.
        Raises ValueError if steps <= 0 or steps > T.
        """
        if not isinstance(steps, (int, np.integer)) or steps <= 0 or steps > self.timesteps:
            raise ValueError(f"steps must be an integer in 1..{self.timesteps} (the training T), got {steps!r}")
        if steps == 1:
            return np.array([self.timesteps], dtype=np.int32)
        ts = np.round(np.linspace(self.timesteps, 1, steps)).astype(np.int32)
        assert len(np.unique(ts)) == steps
        return ts


def cosine_schedule(timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999,
                    logsnr_shift: float = 0.0) -> CosineSchedule:
    """Builds the cosine schedule (see module docstring), its log-SNR shifted by `logsnr_shift`.
    Raises ValueError for timesteps < 1."""
    if timesteps < 1:
        raise ValueError(f"diffusion.timesteps must be >= 1, got {timesteps}")
    ab = cosine_alpha_bar(np.arange(timesteps + 1), timesteps, s)
    for t in range(1, timesteps + 1):  # beta clip, propagated into alpha_bar (only bites at t ~ T)
        ab[t] = max(ab[t], (1.0 - max_beta) * ab[t - 1])
    if logsnr_shift:
        lam = np.log(ab) - np.log1p(-np.minimum(ab, 1.0 - 1e-12)) + float(logsnr_shift)
        ab = 1.0 / (1.0 + np.exp(-lam))
    betas = np.zeros(timesteps + 1)
    betas[1:] = 1.0 - ab[1:] / ab[:-1]
    return CosineSchedule(timesteps, s, max_beta, ab.astype(np.float32), betas.astype(np.float32),
                          float(logsnr_shift))


def schedule_from_config(diffusion_config) -> CosineSchedule:
    """The schedule of `config.diffusion` (fields `timesteps`, `cosine_s`, `logsnr_shift`)."""
    return cosine_schedule(int(diffusion_config.timesteps), float(diffusion_config.cosine_s),
                           logsnr_shift=float(diffusion_config.logsnr_shift))


def add_noise_logsnr(x0: jax.Array, logsnr: jax.Array, noise: jax.Array) -> jax.Array:
    """Forward process at log-SNR lambda: sqrt(sigmoid(lambda)) x0 + sqrt(sigmoid(-lambda)) noise.

    x0, noise: float (b, L, d); logsnr: float (b,) one level per sequence or (b, L) one per
    position. Returns float32 (b, L, d).
    """
    lam = logsnr.astype(jnp.float32)
    lam = lam[:, :, None] if lam.ndim == 2 else lam[:, None, None]
    return (jnp.sqrt(jax.nn.sigmoid(lam)) * x0.astype(jnp.float32)
            + jnp.sqrt(jax.nn.sigmoid(-lam)) * noise.astype(jnp.float32))
