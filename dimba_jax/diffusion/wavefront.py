"""Position-dependent noise levels: a wavefront that denoises the generated span left to right.

With one noise level per sequence every position is equally noisy, so where the tokens are
decided no neighbour is yet clean and context barely helps (the denoiser learns to read each
position off its own x_t). A wavefront of width W gives every generated position i its own
progress u_i in [0, 1] (1 = pure noise, 0 = clean, the scale of the noise warp's quantiles) on a
shared clock s in [0, 1] (1 = start, 0 = end):

    u_i(s) = clip(s (1 + W) - W (1 - r_i), 0, 1),   r_i = rank of i among the generated
                                                    positions / (their count - 1) in [0, 1].

W = 0 is the usual single level (u_i = s). For W > 0 the first generated position runs its
whole range while s goes from 1 to W / (1 + W), the last while s goes from 1 / (1 + W) to 0:
positions on the left are cleaner than those on their right at every moment (AR-Diffusion's
idea), and each position spends 1 / (1 + W) of the clock, so of T sampling steps, T / (1 + W).
Training draws s ~ U(0, 1) and, with probability `prob`, a width W ~ U(0, W_max) per example
(else W = 0), so one model samples at any width up to W_max and still has the single-level
examples its likelihood bound is computed on. Known (prompt) positions get rank 0 and are
ignored by every user (the denoiser re-imposes them).

The order ("left_to_right" or "random", ORDERS) says which rank a position has: its place in
the span, or its place in a random permutation of the span drawn per sequence (`random_rank`);
a random order at a large W resembles masked diffusion (clean tokens scattered among noisy
ones, revealed in random order), where left to right resembles autoregression.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def generation_rank(cond_mask: jax.Array) -> jax.Array:
    """r_i: each generated position's rank among its row's generated positions, scaled to [0, 1]
    (0 = first, 1 = last; a single generated position has r = 0); 0 at known positions.
    cond_mask bool (b, L), True = known -> float32 (b, L)."""
    gen = ~cond_mask.astype(bool)
    return _scaled(jnp.cumsum(gen, axis=1) - 1, gen)


def _scaled(place: jax.Array, gen: jax.Array) -> jax.Array:
    """Places 0..n-1 of a row's n generated positions -> place / max(n - 1, 1), 0 where not gen."""
    count = jnp.sum(gen, axis=1, keepdims=True)
    r = place.astype(jnp.float32) / jnp.maximum(count - 1, 1).astype(jnp.float32)
    return jnp.where(gen, r, 0.0)


ORDERS = ("left_to_right", "random")


def random_rank(rng: jax.Array, cond_mask: jax.Array) -> jax.Array:
    """Like `generation_rank`, but the generated positions of each row in a random order (a
    uniform permutation per row): float32 (b, L) in [0, 1], 0 at known positions."""
    gen = ~cond_mask.astype(bool)
    keys = jnp.where(gen, jax.random.uniform(rng, cond_mask.shape), 2.0)  # known positions last
    return _scaled(jnp.argsort(jnp.argsort(keys, axis=1), axis=1), gen)  # each position's place


def order_rank(order: str, rng: jax.Array, cond_mask: jax.Array) -> jax.Array:
    """The ranks of `order` (ORDERS): `generation_rank` or `random_rank` (which uses rng)."""
    if order == "left_to_right":
        return generation_rank(cond_mask)
    if order == "random":
        return random_rank(rng, cond_mask)
    raise ValueError(f"wavefront order must be one of {ORDERS}, got {order!r}")


def progress(clock: jax.Array, rank: jax.Array, width: jax.Array) -> jax.Array:
    """u_i(s) = clip(s (1 + W) - W (1 - r_i), 0, 1) (module docstring).
    clock s float (b,) or scalar; rank r float (b, L) or (L,); width W float (b,) or scalar, >= 0.
    -> float32 broadcast of the three ((b, L))."""
    s = jnp.asarray(clock, jnp.float32)
    w = jnp.asarray(width, jnp.float32)
    if s.ndim:
        s = s[..., None]
    if w.ndim:
        w = w[..., None]
    return jnp.clip(s * (1.0 + w) - w * (1.0 - rank.astype(jnp.float32)), 0.0, 1.0)


def sample_widths(rng: jax.Array, batch: int, max_width: float, prob: float) -> jax.Array:
    """Training widths: W ~ U(0, max_width) with probability `prob`, else 0. -> float32 (batch,)."""
    if max_width < 0 or not 0.0 <= prob <= 1.0:
        raise ValueError(f"diffusion.wavefront must be >= 0 and diffusion.wavefront_prob in [0, 1], "
                         f"got {max_width}, {prob}")
    r_on, r_w = jax.random.split(rng)
    on = jax.random.bernoulli(r_on, prob, (batch,))
    return jnp.where(on, jax.random.uniform(r_w, (batch,), jnp.float32, 0.0, float(max_width)), 0.0)


def clock_grid(steps: int) -> tuple[jax.Array, jax.Array]:
    """The sampler's clock: (s at each step = 1, (S-1)/S, ..., 1/S; s after it = (S-1)/S, ..., 0),
    float32 (S,) each. At W = 0, u = s, so the levels are the warp grid's quantiles."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s = 1.0 - jnp.arange(steps, dtype=jnp.float32) / steps
    return s, s - 1.0 / steps
