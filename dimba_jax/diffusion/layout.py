"""Random prompt layouts over one sequence [known | generated] of length L.

`cond_mask` (b, L) bool marks *known* (clean, never noised) positions with True and positions to
generate with False. Each training example draws one layout (probabilities `layout_probs` =
(none, prefix, infill)) so one model serves unconditional, prompted and infilling generation:

* none   — nothing known: unconditional generation of the whole window.
* prefix — the first k tokens known, k ~ U{1 .. K}.
* infill — k tokens known, split into a left part a ~ U{1 .. k-1} and a right part k - a; the middle
           span is generated (needs K >= 2; otherwise it falls back to a prefix of k = K).

K = max(1, floor(max_prompt_frac * L)), capped at L - 1 so at least one position is generated.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

LAYOUT_NONE, LAYOUT_PREFIX, LAYOUT_INFILL = 0, 1, 2


def max_known(seq_len: int, max_prompt_frac: float) -> int:
    """K: the largest number of known positions in a window of `seq_len` (>= 1, <= seq_len - 1)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 for prompt layouts, got {seq_len}")
    if not 0.0 < max_prompt_frac < 1.0:
        raise ValueError(f"diffusion.max_prompt_frac must be in (0, 1), got {max_prompt_frac}")
    return int(min(max(1, int(max_prompt_frac * seq_len)), seq_len - 1))


def mask_from_spans(left: jax.Array, right: jax.Array, seq_len: int) -> jax.Array:
    """Known mask from per-example known-prefix length `left` and known-suffix length `right`.

    left, right: int (b,). Returns bool (b, seq_len): pos < left or pos >= seq_len - right.
    """
    pos = jnp.arange(seq_len)[None, :]
    return (pos < left[:, None]) | (pos >= seq_len - right[:, None])


def sample_layout(rng: jax.Array, batch: int, seq_len: int, layout_probs: Sequence[float],
                  max_prompt_frac: float) -> tuple[jax.Array, jax.Array]:
    """Draws one layout per example.

    Returns (cond_mask bool (batch, seq_len), kind int32 (batch,) in {0 none, 1 prefix, 2 infill}).
    Raises ValueError for probabilities that are not 3 non-negative numbers with a positive sum.
    """
    probs = [float(p) for p in layout_probs]
    if len(probs) != 3 or min(probs) < 0 or sum(probs) <= 0:
        raise ValueError(f"diffusion.layout_probs must be 3 non-negative weights (none, prefix, infill), got {layout_probs}")
    k_max = max_known(seq_len, max_prompt_frac)
    r_kind, r_k, r_split = jax.random.split(rng, 3)
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    kind = jax.random.categorical(r_kind, logits, shape=(batch,)).astype(jnp.int32)
    if k_max < 2:  # infill impossible: treat as prefix
        kind = jnp.where(kind == LAYOUT_INFILL, LAYOUT_PREFIX, kind)
    # prefix: k in 1..K ; infill: k in 2..K, left a in 1..k-1
    u_k = jax.random.uniform(r_k, (batch,))
    u_a = jax.random.uniform(r_split, (batch,))
    k_prefix = 1 + jnp.floor(u_k * k_max).astype(jnp.int32)
    k_infill = 2 + jnp.floor(u_k * max(k_max - 1, 1)).astype(jnp.int32)
    a_infill = 1 + jnp.floor(u_a * (k_infill - 1)).astype(jnp.int32)
    left = jnp.where(kind == LAYOUT_PREFIX, k_prefix, jnp.where(kind == LAYOUT_INFILL, a_infill, 0))
    right = jnp.where(kind == LAYOUT_INFILL, k_infill - a_infill, 0)
    return mask_from_spans(left, right, seq_len), kind
