"""A block's pre-norm (`layers/norms.prenorm`): the residual add, RMSNorm and conditioning the
DIMBA and AR stacks run in front of each mixer, against the modules it stands for, and its
one-line shape errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dimba_jax.config import default_config
from dimba_jax.layers.norms import prenorm
from dimba_jax.models.dimba import DimbaBlock

B, L, D = 2, 16, 32


def _args(seed=0, delta_dtype=jnp.bfloat16):
    k = jax.random.split(jax.random.key(seed), 4)
    h = 2.0 * jax.random.normal(k[0], (B, L, D))
    delta = jax.random.normal(k[1], (B, L, D)).astype(delta_dtype)
    w = 1.0 + 0.3 * jax.random.normal(k[2], (D,))
    mod = 0.5 * jax.random.normal(k[3], (B, 2, D))
    return h, delta, w, mod


@pytest.mark.parametrize("conditioning", ["film", "additive"])
def test_prenorm_equals_the_block_norm_and_conditioning(conditioning):
    """prenorm with the block's norm weight and its conditioning's [scale; shift] is
    DimbaBlock's norm + cond exactly (float32), and u is h + delta."""
    cfg = default_config()
    with cfg.unlocked():
        cfg.model.update(d_model=D, n_layers=2, d_state=8, headdim=16, chunk_size=8,
                         ssd_impl="xla", conv_impl="xla", norm_impl="xla",
                         conditioning=conditioning)
    block = DimbaBlock(cfg.model, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    block.cond.proj.kernel[...] = 0.1 * jax.random.normal(jax.random.key(1),
                                                           block.cond.proj.kernel.shape)
    h, delta, _, _ = _args(seed=2, delta_dtype=jnp.float32)
    c = jax.random.normal(jax.random.key(4), (B, 32))
    want = block.cond(block.norm(h + delta), c)
    u, got = prenorm(h, delta, block.norm.weight[...], block.cond.modulation(c))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(u), np.asarray(h + delta))


def test_prenorm_without_delta_or_conditioning_is_the_norm():
    """delta None: u is h itself; mod None: x is the RMSNorm alone, in `dtype`."""
    h, _, w, _ = _args(seed=3)
    u, x = prenorm(h, None, w, None, dtype=jnp.bfloat16)
    assert u is h and x.dtype == jnp.bfloat16
    want = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(np.float32(x), np.asarray(want), rtol=1e-2, atol=2e-2)


def test_bad_shapes_raise_one_line_errors():
    h, delta, w, mod = _args()
    with pytest.raises(ValueError, match="delta must have h's shape"):
        prenorm(h, delta[:, :8], w, mod)
    with pytest.raises(ValueError, match="weight must be"):
        prenorm(h, delta, w[:8], mod)
    with pytest.raises(ValueError, match="mod must be"):
        prenorm(h, delta, w, mod[:, :1])
    with pytest.raises(ValueError, match="h must be"):
        prenorm(h[0], None, w, None)
