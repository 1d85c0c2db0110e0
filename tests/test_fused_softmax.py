"""The vocabulary softmax's numerator as one Pallas kernel (layers/fused_softmax.py): against its
jnp reference in the interpreter (values, gradients in scores and temperature, -inf scores,
several rows per program), the sizes it refuses, its Triton lowering for CUDA at the sampler's
size, the model's knob (`model.softmax_impl`) and the compiled kernel on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dimba_jax.layers import fused_softmax
from dimba_jax.models.dimba import DimbaModel
from test_dimba_model import model_cfg


def _scores(shape, seed=0, masked=True):
    s = 4.0 * jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    return jnp.where(jnp.arange(shape[-1]) % 5 == 2, -jnp.inf, s) if masked else s


@pytest.mark.parametrize("shape,dtype", [((2, 3, 64), jnp.bfloat16),  # 64 rows a program
                                         ((1, 4, 8192), jnp.float32),  # one row a program
                                         ((5, 256), jnp.bfloat16)])
def test_kernel_matches_reference_values_and_gradients(shape, dtype):
    """The same e as the reference to one rounding of its dtype, its row sums to float32
    summation order, and through a normalised GEMM the same gradients in the scores
    (the -inf entries get none) and, without -inf scores, in the temperature."""
    table = jax.random.normal(jax.random.key(9), (shape[-1], 8))
    t = jnp.float32(0.9)

    def x0(fn, s, temp):
        e, total = fn(s, temp, dtype)
        return (e.astype(jnp.float32) @ table) / total[..., None]

    fused = lambda s, temp, d: fused_softmax.softmax_numerator_pallas(  # noqa: E731
        s, temp, d, interpret=True)
    for masked in (True, False):
        s = _scores(shape, seed=len(shape), masked=masked)
        want = jax.jit(lambda: fused_softmax.softmax_numerator_xla(s, t, dtype))()
        got = jax.jit(lambda: fused(s, t, dtype))()
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
        # s / t may differ in its last bit (XLA may divide by multiplying by 1 / t), which
        # exp(s / t - m) carries as ~|s / t| ulps: one bf16 rounding, or 1e-5 in float32
        rtol = 2.0 ** -7 if dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(np.float32(got[0]), np.float32(want[0]), rtol=rtol, atol=0)
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5)
        cot = jax.random.normal(jax.random.key(1), shape[:-1] + (8,))
        grad = lambda fn: jax.jit(jax.grad(  # noqa: E731
            lambda s_, t_: jnp.sum(x0(fn, s_, t_) * cot), argnums=(0, 1)))(s, t)
        (gs, gt), (ws, wt) = grad(fused), grad(fused_softmax.softmax_numerator_xla)
        np.testing.assert_allclose(np.asarray(gs), np.asarray(ws), rtol=1e-4,
                                   atol=1e-5 * float(np.abs(ws).max()))
        if masked:
            assert not np.asarray(gs)[..., 2::5].any() and np.isfinite(float(gt))
        else:
            np.testing.assert_allclose(float(gt), float(wt), rtol=1e-4)


def test_sizes_it_does_not_take_raise():
    for vocab in (50, 8, 32768):
        assert fused_softmax.numerator_size_error(vocab)
        with pytest.raises(ValueError, match="power of two"):
            fused_softmax.softmax_numerator_pallas(jnp.zeros((2, vocab)), 1.0, jnp.float32,
                                                   interpret=True)
    assert not fused_softmax.numerator_size_error(8192)


def test_kernel_lowers_to_triton_for_cuda():
    """The forward and its (XLA) backward lower through the Pallas Triton backend (no GPU
    needed) at the batch-1 sampler's size: 1024 positions over an 8192-token vocabulary."""
    from dimba_jax.ssd.hopper import cuda_lowering_context

    s = jax.ShapeDtypeStruct((1, 1024, 8192), jnp.float32)

    def f(s, t):
        out, vjp = jax.vjp(lambda a, b: fused_softmax.softmax_numerator_pallas(
            a, b, jnp.bfloat16), s, t)
        return out, vjp(jax.tree.map(jnp.ones_like, out))

    with cuda_lowering_context():
        text = jax.jit(f).trace(s, jnp.float32(0.9)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1


@pytest.mark.parametrize("impl", ["pallas", "auto"])
def test_model_knob_routes_softmax_embedding(impl):
    """model.softmax_impl "pallas" runs the kernel (the interpreter on the CPU) with the XLA
    path's result; "auto" stays on XLA off a GPU (and for a vocabulary the kernel refuses);
    an unknown value is refused."""
    vocab = 64
    xla = DimbaModel(model_cfg(head_dtype="bfloat16"), vocab, rngs=nnx.Rngs(0))
    knob = DimbaModel(model_cfg(head_dtype="bfloat16", softmax_impl=impl), vocab,
                      rngs=nnx.Rngs(0))
    s = _scores((2, 5, vocab), seed=3)
    t = jnp.float32(0.8)
    want = jax.jit(lambda: xla.softmax_embedding(s, t))()
    jaxpr = str(jax.make_jaxpr(lambda: knob.softmax_embedding(s, t))())
    assert ("softmax_numerator" in jaxpr) == (impl == "pallas")
    got = jax.jit(lambda: knob.softmax_embedding(s, t))()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="model.softmax_impl"):
        DimbaModel(model_cfg(softmax_impl="triton"), vocab, rngs=nnx.Rngs(0))


@pytest.mark.gpu
def test_compiled_kernel_matches_reference_on_gpu():
    """Compiled at the sampler's size (1024 x 8192, bf16 e): e within one bf16 rounding of the
    reference's, the row sums to float32 summation order."""
    s = _scores((1, 1024, 8192), seed=5)
    t = jnp.float32(0.9)
    want = jax.jit(lambda: fused_softmax.softmax_numerator_xla(s, t, jnp.bfloat16))()
    got = jax.jit(lambda: fused_softmax.softmax_numerator_pallas(s, t, jnp.bfloat16))()
    np.testing.assert_allclose(np.float32(got[0]), np.float32(want[0]), rtol=1e-2, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5)
