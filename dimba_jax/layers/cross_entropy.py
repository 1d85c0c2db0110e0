"""Token cross-entropy over vocabulary-sized logits, with a backward of one elementwise pass.

    nll[i] = logsumexp(logits[i]) - logits[i, t_i],    hit[i] = logits[i, t_i] >= max(logits[i])

`token_nll_and_hit(logits, targets)` is that pair with a custom VJP whose backward is

    d logits[i, v] = g[i] * (exp(logits[i, v] - logsumexp(logits[i])) - [v == t_i])

as one fusion over the logits (the one-hot an iota compare inside it). Differentiating the
plain jnp form instead (log_softmax, then take_along_axis) scatters the picked gradient into a
zero array of the logits' size and, behind a slice of the logits, pads the cotangent back:
full-size passes over a (batch, L, V) float32 array each. `hit` reads the target's logit
against the row maximum the log-sum-exp takes anyway, so the accuracy needs no argmax pass (a
target tied with another maximum counts as a hit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def token_nll_and_hit(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits float (..., V), targets int (...) in [0, V) -> (nll float32 (...), hit bool (...)).

    nll is -log softmax(logits)[target] in float32; hit whether the target's logit is the row's
    maximum. Gradients flow to logits only (float32 cotangent, cast to logits' dtype)."""
    return _forward(logits, targets)[0]


def _forward(logits, targets):
    x = logits.astype(jnp.float32)
    top = jnp.max(x, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(x - top[..., None]), axis=-1))
    picked = jnp.take_along_axis(x, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return (lse - picked, picked >= top), lse


def _fwd(logits, targets):
    out, lse = _forward(logits, targets)
    return out, (logits, targets, lse)


def _bwd(res, cotangents):
    logits, targets, lse = res
    g = cotangents[0].astype(jnp.float32)
    x = logits.astype(jnp.float32)
    vocab = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    onehot = (vocab == targets[..., None].astype(jnp.int32)).astype(jnp.float32)
    dx = (jnp.exp(x - lse[..., None]) - onehot) * g[..., None]
    return dx.astype(logits.dtype), None


token_nll_and_hit.defvjp(_fwd, _bwd)
