"""The Mamba-2 mixer, its recurrent step, the bidirectional wrapper and the norms (CPU, tiny)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dimba_jax.layers.mamba2 import BidirectionalMamba2, Mamba2
from dimba_jax.layers.norms import GatedRMSNorm, RMSNorm

SMALL = dict(d_state=8, expand=2, headdim=8, ngroups=2, d_conv=4, chunk_size=4)
LOGICAL_NAMES = {"batch", "embed", "mlp", "heads", "vocab", "state", "conv", "seq"}


def _block(impl="xla", seed=0, **kw):
    args = dict(SMALL, ssd_impl=impl)
    args.update(kw)
    return Mamba2(32, rngs=nnx.Rngs(seed), **args)


def _randomise_skip_and_norm(block, seed):
    """D and the norm weight are 1 at init; perturb them so mistakes in their use show."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    block.D[...] = 1.0 + 0.5 * jax.random.normal(k1, block.D[...].shape)
    block.norm.weight[...] = 1.0 + 0.3 * jax.random.normal(k2, block.norm.weight[...].shape)
    block.conv_bias[...] = 0.3 * jax.random.normal(k3, block.conv_bias[...].shape)


def _run_steps(block, u, cache):
    def body(c, u_t):
        y_t, c = block.step(u_t, c)
        return c, y_t

    cache, ys = jax.lax.scan(body, cache, jnp.swapaxes(u, 0, 1))
    return jnp.swapaxes(ys, 0, 1), cache


def test_step_by_step_equals_parallel_forward():
    block = _block()
    _randomise_skip_and_norm(block, 1)
    u = jax.random.normal(jax.random.key(2), (2, 11, 32))  # 11: not a multiple of chunk 4
    y = block(u)
    y_steps, cache = _run_steps(block, u, block.init_cache(2))
    np.testing.assert_allclose(y_steps, y, rtol=1e-4, atol=1e-5)
    # prefill (parallel) of a prefix, then steps: same outputs and same final cache
    y_pre, cache_pre = block.forward(u[:, :6], return_cache=True)
    y_rest, cache_end = _run_steps(block, u[:, 6:], cache_pre)
    np.testing.assert_allclose(jnp.concatenate([y_pre, y_rest], 1), y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cache_end.ssm_state, cache.ssm_state, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cache_end.conv_state, cache.conv_state, rtol=1e-6, atol=1e-6)


def test_prefill_shorter_than_conv_window():
    block = _block()
    u = jax.random.normal(jax.random.key(3), (1, 5, 32))
    _, cache = block.forward(u[:, :2], return_cache=True)  # 2 < d_conv - 1 = 3
    y_rest, _ = _run_steps(block, u[:, 2:], cache)
    np.testing.assert_allclose(y_rest, block(u)[:, 2:], rtol=1e-4, atol=1e-5)


def test_perturbation_causal_never_sees_future_bidirectional_does():
    u = jax.random.normal(jax.random.key(4), (1, 12, 32))
    j = 7
    u2 = u.at[:, j].add(1.0)
    causal = _block()
    y, y2 = causal(u), causal(u2)
    np.testing.assert_array_equal(np.asarray(y[:, :j]), np.asarray(y2[:, :j]))
    assert float(jnp.abs(y[:, j:] - y2[:, j:]).max()) > 1e-3
    for share in (True, False):
        bidi = BidirectionalMamba2(32, share_projections=share, rngs=nnx.Rngs(5),
                                   ssd_impl="xla", **SMALL)
        b, b2 = bidi(u), bidi(u2)
        change = jnp.abs(b - b2).max(axis=-1)[0]  # (L,)
        assert bool(jnp.all(change[:j] > 1e-5)), change  # every earlier position sees it
        assert bool(jnp.all(change[j:] > 1e-5))


@pytest.mark.parametrize("share", [True, False])
def test_bidirectional_is_mean_of_forward_and_flipped_scans(share):
    bidi = BidirectionalMamba2(32, share_projections=share, rngs=nnx.Rngs(6), ssd_impl="xla",
                               **SMALL)
    _randomise_skip_and_norm(bidi.fwd, 7)
    _randomise_skip_and_norm(bidi.bwd, 8)
    u = jax.random.normal(jax.random.key(9), (2, 10, 32))
    want = 0.5 * (bidi.fwd(u) + jnp.flip(bidi.bwd(jnp.flip(u, 1)), 1))
    np.testing.assert_allclose(bidi(u), want, rtol=1e-4, atol=1e-5)
    # the seq_idx path (two separate scans) agrees with the per-direction definition too
    seq_idx = jnp.array([[0] * 4 + [1] * 6, [0] * 10])
    want = 0.5 * (bidi.fwd(u, seq_idx=seq_idx)
                  + jnp.flip(bidi.bwd(jnp.flip(u, 1), seq_idx=jnp.flip(seq_idx, 1)), 1))
    np.testing.assert_allclose(bidi(u, seq_idx=seq_idx), want, rtol=1e-4, atol=1e-5)


def _n_params(module):
    return sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_bidirectional_weight_sharing():
    shared = BidirectionalMamba2(32, share_projections=True, rngs=nnx.Rngs(0), **SMALL)
    separate = BidirectionalMamba2(32, share_projections=False, rngs=nnx.Rngs(0), **SMALL)
    causal = _block()
    assert shared.bwd.in_proj is shared.fwd.in_proj and shared.bwd.out_proj is shared.fwd.out_proj
    assert separate.bwd.in_proj is not separate.fwd.in_proj
    proj = causal.in_proj.kernel[...].size + causal.out_proj.kernel[...].size
    assert _n_params(separate) == 2 * _n_params(causal)
    assert _n_params(shared) == 2 * _n_params(causal) - proj
    # the directions' dynamics are independent parameters
    assert not np.array_equal(shared.fwd.A_log[...], shared.bwd.A_log[...])


def test_seq_idx_resets_conv_and_state():
    block = _block()
    _randomise_skip_and_norm(block, 10)
    u = jax.random.normal(jax.random.key(11), (1, 11, 32))
    seq_idx = jnp.array([[0] * 5 + [1] * 6])
    y = block(u, seq_idx=seq_idx)
    separate = jnp.concatenate([block(u[:, :5]), block(u[:, 5:])], axis=1)
    np.testing.assert_allclose(y, separate, rtol=1e-4, atol=1e-5)


def test_reference_and_xla_impls_agree():
    u = jax.random.normal(jax.random.key(12), (2, 9, 32))
    a, b = _block("reference"), _block("xla")
    np.testing.assert_allclose(a(u), b(u), rtol=1e-4, atol=1e-5)


def test_init_statistics():
    block = Mamba2(256, d_state=4, expand=2, headdim=4, chunk_size=8, rngs=nnx.Rngs(0))  # 128 heads
    a = -np.exp(np.asarray(block.A_log[...]))
    assert a.min() >= -16.0 and a.max() <= -1.0
    assert a.min() < -12 and a.max() > -3  # spread over the range, not a constant
    dt = np.asarray(jax.nn.softplus(block.dt_bias[...]))
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    log_dt = np.log(dt)  # log-uniform: mean of log dt near the middle of [log 1e-3, log 0.1]
    assert abs(log_dt.mean() - 0.5 * (math.log(1e-3) + math.log(0.1))) < 0.5
    np.testing.assert_array_equal(np.asarray(block.D[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(block.norm.weight[...]), 1.0)
    bound = 1 / math.sqrt(block.d_conv)
    assert np.abs(np.asarray(block.conv_weight[...])).max() <= bound
    assert np.abs(np.asarray(block.in_proj.kernel[...])).max() <= 1 / math.sqrt(256)


def test_params_have_logical_axes_and_dtypes():
    block = _block(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    for path, var in nnx.to_flat_state(nnx.state(block, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names and set(names) <= LOGICAL_NAMES and len(names) == var[...].ndim, path
        assert var[...].dtype == jnp.bfloat16
    u = jax.random.normal(jax.random.key(0), (1, 6, 32))
    y = block(u)
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    _, cache = block.forward(u, return_cache=True)
    assert cache.ssm_state.dtype == jnp.float32


def test_bf16_compute_close_to_float32():
    f32 = _block()
    bf16 = _block(dtype=jnp.bfloat16)
    u = jax.random.normal(jax.random.key(13), (1, 8, 32))
    y32, y16 = f32(u), bf16(u).astype(jnp.float32)
    rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
    assert rel < 3e-2, rel


def test_bad_inputs_raise():
    block = _block()
    with pytest.raises(ValueError, match="d_model"):
        block(jnp.zeros((1, 4, 31)))
    with pytest.raises(ValueError, match="d_model"):
        block.step(jnp.zeros((1, 4, 32)), block.init_cache(1))
    with pytest.raises(ValueError, match="cache"):
        block.step(jnp.zeros((2, 32)), block.init_cache(1))
    with pytest.raises(ValueError, match="seq_idx"):
        block(jnp.zeros((1, 4, 32)), seq_idx=jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(30, headdim=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2(32, headdim=8, ngroups=3, rngs=nnx.Rngs(0))


def test_rmsnorm_and_gated_rmsnorm_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 12)).astype(np.float32)
    z = rng.normal(size=(2, 3, 12)).astype(np.float32)
    w = rng.normal(size=(12,)).astype(np.float32)
    norm = RMSNorm(12, rngs=nnx.Rngs(0))
    norm.weight[...] = w
    want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(norm(jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)
    gated = GatedRMSNorm(12, ngroups=3, rngs=nnx.Rngs(0))
    gated.weight[...] = w
    g = (x * z / (1 + np.exp(-z))).reshape(2, 3, 3, 4)
    want = (g / np.sqrt((g ** 2).mean(-1, keepdims=True) + 1e-5)).reshape(2, 3, 12) * w
    np.testing.assert_allclose(gated(jnp.asarray(x), jnp.asarray(z)), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        GatedRMSNorm(12, ngroups=5, rngs=nnx.Rngs(0))
