"""The custom-VJP depthwise conv (`dimba_jax.layers.conv`) vs the autodiff one in `Mamba2`.

Both implementations compute silu(bias + causal depthwise conv(x)); the custom one has a
hand-written backward. Checked: forward and every gradient (x, w, bias) agree with JAX's
autodiff of the plain formula, with and without packed-sequence masks, in float32 and bfloat16,
and a whole bidirectional Mamba-2 mixer gives the same output and parameter gradients with either
`conv_impl`.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from dimba_jax.layers.conv import causal_depthwise_conv_silu, conv_keep_masks
from dimba_jax.layers.mamba2 import BidirectionalMamba2, Mamba2


def _plain(x, w, bias, seq_idx):
    """The conv written directly (independent of both implementations)."""
    width, seqlen = w.shape[0], x.shape[1]
    xf = x.astype(jnp.float32)
    out = jnp.broadcast_to(bias, xf.shape)
    for k in range(width):
        shift = width - 1 - k  # w[k] multiplies x[t - shift]
        xs = jnp.pad(xf, ((0, 0), (shift, 0), (0, 0)))[:, :seqlen]
        if seq_idx is not None:
            ss = jnp.pad(seq_idx, ((0, 0), (shift, 0)), constant_values=-1)[:, :seqlen]
            xs = jnp.where((ss == seq_idx)[..., None], xs, 0.0)
        out = out + w[k] * xs
    return jax.nn.silu(out).astype(x.dtype)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("packed", [False, True])
def test_custom_vjp_matches_autodiff(dtype, tol, packed):
    ks = jax.random.split(jax.random.key(20261204), 4)
    b, l, c, width = 2, 13, 6, 4
    x = jax.random.normal(ks[0], (b, l, c)).astype(dtype)
    w = jax.random.normal(ks[1], (width, c))
    bias = jax.random.normal(ks[2], (c,))
    dy = jax.random.normal(ks[3], (b, l, c)).astype(dtype)
    seq_idx = jnp.asarray([[0] * 5 + [1] * 8, [0] * 13]) if packed else None

    y, vjp = jax.vjp(lambda *a: causal_depthwise_conv_silu(*a, conv_keep_masks(seq_idx, width)),
                     x, w, bias)
    y_ref, vjp_ref = jax.vjp(lambda *a: _plain(*a, seq_idx), x, w, bias)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                               rtol=tol, atol=tol)
    for name, g, g_ref in zip(("x", "w", "bias"), vjp(dy), vjp_ref(dy)):
        assert g.dtype == g_ref.dtype, name
        err = np.linalg.norm(np.asarray(g, np.float64) - np.asarray(g_ref, np.float64))
        assert err <= tol * np.linalg.norm(np.asarray(g_ref, np.float64)), name


def test_keep_masks_drop_terms_across_sequences():
    keep = conv_keep_masks(jnp.asarray([[0, 0, 1, 1, 1]]), 3)
    assert keep.shape == (2, 1, 5)
    # tap 0 reads x[t-2], tap 1 reads x[t-1]; position 2 starts sequence 1; before t=0 is padding
    np.testing.assert_array_equal(keep[0, 0], [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(keep[1, 0], [0, 1, 0, 1, 1])
    assert conv_keep_masks(None, 4) is None


@pytest.mark.parametrize("cls", [Mamba2, BidirectionalMamba2])
def test_mixer_is_the_same_with_either_conv(cls):
    def build(conv_impl):
        return cls(32, d_state=16, headdim=16, chunk_size=8, ssd_impl="xla",
                   conv_impl=conv_impl, rngs=nnx.Rngs(0))

    u = jax.random.normal(jax.random.key(3), (2, 11, 32))
    seq_idx = jnp.asarray([[0] * 4 + [1] * 7, [0] * 11])

    def loss_and_grads(model):
        def loss(m):
            return jnp.sum(m(u, seq_idx=seq_idx) ** 2)
        return nnx.value_and_grad(loss)(model)

    (l_a, g_a), (l_c, g_c) = loss_and_grads(build("autodiff")), loss_and_grads(build("custom_vjp"))
    np.testing.assert_allclose(l_c, l_a, rtol=1e-5)
    flat_a = jax.tree_util.tree_leaves(nnx.state(g_a))
    flat_c = jax.tree_util.tree_leaves(nnx.state(g_c))
    assert len(flat_a) == len(flat_c) > 0
    for a, c in zip(flat_a, flat_c):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)


def test_unknown_conv_impl_is_refused():
    with pytest.raises(ValueError, match="conv_impl"):
        Mamba2(32, d_state=16, headdim=16, conv_impl="cudnn", rngs=nnx.Rngs(0))
