"""The Mamba-2 mixer, its recurrent step, the bidirectional wrapper and the norms (CPU, tiny).

Every module call is one jitted program (`_nnx_jit.jitted`); shapes are shared between tests
(u is (2, 12, 32) throughout) so that compilations are reused.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _nnx_jit import jitted, run_steps
from dimba_jax.layers.mamba2 import BidirectionalMamba2, Mamba2
from dimba_jax.layers.norms import GatedRMSNorm, RMSNorm

SMALL = dict(d_state=8, expand=2, headdim=8, ngroups=2, d_conv=4, chunk_size=4)
LOGICAL_NAMES = {"batch", "embed", "mlp", "heads", "vocab", "state", "conv", "seq"}
TOL = dict(rtol=1e-4, atol=1e-5)


def _u(seed=0):
    return jax.random.normal(jax.random.key(seed), (2, 12, 32))


def _randomise(block, seed):
    """D, the norm weight and the conv bias have trivial inits; perturb them so misuse shows."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    for var, key, mean, std in ((block.D, k1, 1.0, 0.5), (block.norm.weight, k2, 1.0, 0.3),
                                (block.conv_bias, k3, 0.0, 0.3)):
        old = var[...]
        var[...] = (mean + std * jax.random.normal(key, old.shape)).astype(old.dtype)
    return block


def _block(seed=0, **kw):
    args = dict(SMALL, ssd_impl="xla")
    args.update(kw)
    return _randomise(Mamba2(32, rngs=nnx.Rngs(seed), **args), seed + 100)


def _bidi(share, seed=5):
    bidi = BidirectionalMamba2(32, share_projections=share, rngs=nnx.Rngs(seed), ssd_impl="xla",
                               **SMALL)
    _randomise(bidi.fwd, seed + 1)
    _randomise(bidi.bwd, seed + 2)
    return bidi


def test_step_by_step_equals_parallel_forward():
    block, u = _block(), _u(1)
    y = jitted(block)(u)
    # steps from a zero cache over the first half
    y_steps, cache_steps = run_steps(block, u[:, :6], block.init_cache(2))
    np.testing.assert_allclose(y_steps, y[:, :6], **TOL)
    # a parallel prefill of the same half yields the same cache ...
    y_pre, cache_pre = jitted(block, "forward", return_cache=True)(u[:, :6])
    np.testing.assert_allclose(y_pre, y[:, :6], **TOL)
    np.testing.assert_allclose(cache_pre.ssm_state, cache_steps.ssm_state, **TOL)
    np.testing.assert_allclose(cache_pre.conv_state, cache_steps.conv_state, **TOL)
    # ... from which steps continue the sequence exactly
    y_rest, _ = run_steps(block, u[:, 6:], cache_pre)
    np.testing.assert_allclose(y_rest, y[:, 6:], **TOL)


def test_prefill_shorter_than_conv_window_then_steps():
    block, u = _block(), _u(1)
    _, cache = jitted(block, "forward", return_cache=True)(u[:, :2])  # 2 < d_conv - 1
    y_rest, _ = run_steps(block, u[:, 2:8], cache)
    np.testing.assert_allclose(y_rest, jitted(block)(u)[:, 2:8], **TOL)


def test_perturbation_causal_never_sees_future_bidirectional_does():
    u, j = _u(2), 7
    u2 = u.at[:, j].add(1.0)
    causal = _block()
    y, y2 = jitted(causal)(u), jitted(causal)(u2)
    np.testing.assert_array_equal(np.asarray(y[:, :j]), np.asarray(y2[:, :j]))
    assert float(jnp.abs(y[:, j:] - y2[:, j:]).max()) > 1e-3
    for share in (True, False):
        bidi = _bidi(share)
        change = jnp.abs(jitted(bidi)(u) - jitted(bidi)(u2)).max(axis=-1)  # (b, L)
        assert bool(jnp.all(change[:, :j] > 1e-5)), change  # earlier positions see position j
        assert bool(jnp.all(change[:, j:] > 1e-5)), change


@pytest.mark.parametrize("share", [True, False])
def test_bidirectional_is_mean_of_forward_and_flipped_scans(share):
    bidi, u = _bidi(share), _u(3)
    fwd, bwd = jitted(bidi.fwd), jitted(bidi.bwd)
    want = 0.5 * (fwd(u) + jnp.flip(bwd(jnp.flip(u, 1)), 1))
    np.testing.assert_allclose(jitted(bidi)(u), want, **TOL)
    # with packed sequences (the two-call path) the same definition holds
    seq_idx = jnp.array([[0] * 6 + [1] * 6, [0] * 12])
    want = 0.5 * (fwd(u, seq_idx=seq_idx)
                  + jnp.flip(bwd(jnp.flip(u, 1), seq_idx=jnp.flip(seq_idx, 1)), 1))
    np.testing.assert_allclose(jitted(bidi)(u, seq_idx=seq_idx), want, **TOL)


def _n_params(module):
    return sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_bidirectional_weight_sharing():
    shared = BidirectionalMamba2(32, share_projections=True, rngs=nnx.Rngs(0), **SMALL)
    separate = BidirectionalMamba2(32, share_projections=False, rngs=nnx.Rngs(0), **SMALL)
    causal = Mamba2(32, rngs=nnx.Rngs(0), **SMALL)
    assert shared.bwd.in_proj is shared.fwd.in_proj and shared.bwd.out_proj is shared.fwd.out_proj
    assert separate.bwd.in_proj is not separate.fwd.in_proj
    proj = causal.in_proj.kernel[...].size + causal.out_proj.kernel[...].size
    assert _n_params(separate) == 2 * _n_params(causal)
    assert _n_params(shared) == 2 * _n_params(causal) - proj
    assert not np.array_equal(shared.fwd.A_log[...], shared.bwd.A_log[...])  # own dynamics


def test_seq_idx_resets_conv_and_state():
    block, u = _block(), _u(4)
    seq_idx = jnp.array([[0] * 6 + [1] * 6] * 2)
    y = jitted(block)(u, seq_idx=seq_idx)
    separate = jnp.concatenate([jitted(block)(u[:, :6]), jitted(block)(u[:, 6:])], axis=1)
    np.testing.assert_allclose(y, separate, **TOL)


def test_reference_and_xla_impls_agree():
    u = _u(5)
    np.testing.assert_allclose(jitted(_block(ssd_impl="reference"))(u), jitted(_block())(u),
                               **TOL)


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
    assert np.abs(np.asarray(block.conv_weight[...])).max() <= 1 / math.sqrt(block.d_conv)
    assert np.abs(np.asarray(block.in_proj.kernel[...])).max() <= 1 / math.sqrt(256)


def test_params_logical_axes_and_bf16():
    f32 = _block()
    bf16 = _block(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    for path, var in nnx.to_flat_state(nnx.state(bf16, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names and set(names) <= LOGICAL_NAMES and len(names) == var[...].ndim, path
        assert var[...].dtype == jnp.bfloat16
    # same (rounded) parameters: the bf16 block stays close to the float32 one
    nnx.update(bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(f32, nnx.Param)))
    u = _u(6)
    y16, cache = jitted(bf16, "forward", return_cache=True)(u)
    assert y16.dtype == jnp.bfloat16 and cache.ssm_state.dtype == jnp.float32
    y32 = jitted(f32)(u)
    rel = float(jnp.linalg.norm(y16.astype(jnp.float32) - y32) / jnp.linalg.norm(y32))
    assert rel < 3e-2, rel


def test_bad_inputs_raise():
    block = Mamba2(32, rngs=nnx.Rngs(0), **SMALL)
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
