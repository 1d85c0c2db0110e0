"""token_nll_and_hit (layers/cross_entropy.py) against the plain jnp cross-entropy: values,
gradients in float32 and bfloat16, the AR task's masked loss against the sliced one, and the
differentiated program free of the scatter and pad the plain form lowers to (CPU, tiny)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dimba_jax.layers.cross_entropy import token_nll_and_hit
from dimba_jax.models.ar import MambaLM, next_token_metrics


def _plain_nll(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _draw(shape=(3, 5, 37), seed=0, scale=3.0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    logits = scale * jax.random.normal(k1, shape, jnp.float32)
    return logits, jax.random.randint(k2, shape[:-1], 0, shape[-1])


def test_values_match_log_softmax_and_argmax():
    logits, targets = _draw()
    nll, hit = jax.jit(token_nll_and_hit)(logits, targets)
    assert nll.dtype == jnp.float32 and hit.dtype == jnp.bool_ and nll.shape == targets.shape
    np.testing.assert_allclose(nll, _plain_nll(logits, targets), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(hit, jnp.argmax(logits, -1) == targets)
    targets = jnp.argmax(logits, -1)  # every target the maximum: all hits, nll = -log max prob
    assert bool(jnp.all(token_nll_and_hit(logits, targets)[1]))


def test_a_tied_maximum_counts_as_a_hit():
    logits = jnp.array([[0.0, 2.0, 2.0, -1.0]])
    _, hit = token_nll_and_hit(logits, jnp.array([2]))
    assert bool(hit[0])  # argmax would say 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradient_matches_the_plain_form(dtype):
    logits, targets = _draw(seed=1)
    logits = logits.astype(dtype)
    w = jax.random.uniform(jax.random.key(2), targets.shape)  # any cotangent per position

    def ours(x):
        return jnp.sum(token_nll_and_hit(x, targets)[0] * w)

    def plain(x):
        return jnp.sum(_plain_nll(x, targets) * w)

    g, want = jax.jit(jax.grad(ours))(logits), jax.jit(jax.grad(plain))(logits)
    assert g.dtype == dtype
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(want, np.float32), rtol=tol,
                               atol=tol)
    # rows sum to zero (softmax minus one-hot, times the row's cotangent)
    np.testing.assert_allclose(np.asarray(g, np.float32).sum(-1), 0.0, atol=10 * tol)


def test_ar_loss_masks_the_last_position_like_the_slice():
    model = MambaLM(50, rngs=nnx.Rngs(0), d_model=32, n_layers=1, d_state=8, expand=2, headdim=8,
                    ngroups=2, d_conv=4, chunk_size=4, ssd_impl="reference")
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, 50)

    def masked(p):
        valid = jnp.broadcast_to(jnp.arange(8) < 7, tokens.shape)
        return next_token_metrics(nnx.merge(graphdef, p)(tokens), jnp.roll(tokens, -1, 1), valid)[0]

    def sliced(p):
        logits = nnx.merge(graphdef, p)(tokens)[:, :-1]
        return jnp.mean(_plain_nll(logits, tokens[:, 1:]))

    (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(f))(params) for f in (masked, sliced))
    assert abs(float(a) - float(b)) < 1e-5
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_differentiated_program_has_no_scatter_or_pad():
    logits, targets = _draw()
    w = jnp.ones(targets.shape).at[:, -1].set(0.0)

    def text(f):
        return jax.jit(jax.grad(f)).lower(logits).as_text()

    ours = text(lambda x: jnp.sum(token_nll_and_hit(x, targets)[0] * w))
    plain = text(lambda x: jnp.mean(_plain_nll(x[:, :-1], targets[:, :-1])))
    assert "scatter" in plain and "pad" in plain  # what the custom backward avoids
    assert "scatter" not in ours and "pad" not in ours
