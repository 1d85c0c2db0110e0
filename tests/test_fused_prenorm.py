"""The fused pre-norm of a DIMBA block (layers/fused_prenorm.py): the Pallas kernels in the
interpreter vs the jnp reference (values and every gradient), the reference vs today's
DimbaBlock, the model knob (pallas vs xla), and the Triton lowering for CUDA.

Tolerances: float32 agrees to float32 summation order (~1e-6); x in bfloat16 may differ by one
bf16 ulp where the float32 values straddle a rounding boundary.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dimba_jax.config import default_config
from dimba_jax.layers import fused_prenorm as fp
from dimba_jax.models.dimba import DimbaBlock, DimbaModel

B, L, D = 2, 16, 32
F32_TOL = dict(rtol=2e-5, atol=2e-5)
BF16_TOL = dict(rtol=1e-2, atol=2e-2)


def _args(seed=0, delta_dtype=jnp.bfloat16, with_mod=True, seqlen=L):
    k = jax.random.split(jax.random.key(seed), 4)
    h = 2.0 * jax.random.normal(k[0], (B, seqlen, D))
    delta = None if delta_dtype is None else jax.random.normal(k[1], (B, seqlen, D)).astype(
        delta_dtype)
    w = 1.0 + 0.3 * jax.random.normal(k[2], (D,))
    mod = 0.5 * jax.random.normal(k[3], (B, 2, D)) if with_mod else None
    return h, delta, w, mod


@functools.partial(jax.jit, static_argnames=("impl", "dtype", "tiles"))
def _value_and_grads(h, delta, w, mod, cts, *, impl, dtype, tiles=(4, 16, 10**6)):
    if impl == "xla":
        f = functools.partial(fp.prenorm_xla, dtype=dtype)
    else:
        rows, cols, programs = tiles
        f = functools.partial(fp.prenorm_pallas, dtype=dtype, interpret=True, block_rows=rows,
                              block_cols=cols, min_programs=programs)
    out, vjp = jax.vjp(f, h, delta, w, mod)
    return out, vjp(cts)


@pytest.mark.parametrize("delta_dtype", [None, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("with_mod", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_reference_values_and_gradients(delta_dtype, with_mod, dtype):
    args = _args(seed=3, delta_dtype=delta_dtype, with_mod=with_mod)
    k = jax.random.split(jax.random.key(11), 2)
    cts = (jax.random.normal(k[0], (B, L, D)), jax.random.normal(k[1], (B, L, D)).astype(dtype))
    (u_ref, x_ref), g_ref = _value_and_grads(*args, cts, impl="xla", dtype=dtype)
    (u, x), g = _value_and_grads(*args, cts, impl="pallas", dtype=dtype)
    assert u.dtype == jnp.float32 and x.dtype == dtype
    np.testing.assert_array_equal(np.asarray(u), np.asarray(u_ref))
    np.testing.assert_allclose(np.float32(x), np.float32(x_ref),
                               **(F32_TOL if dtype == jnp.float32 else BF16_TOL))
    for name, got, want, a in zip(("h", "delta", "w", "mod"), g, g_ref, args):
        if a is None:
            assert got is None and want is None, name
            continue
        assert got.dtype == a.dtype and got.shape == a.shape, name
        tol = BF16_TOL if got.dtype == jnp.bfloat16 else dict(rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.float32(got), np.float32(want), err_msg=name, **tol)


@pytest.mark.parametrize("tiles", [(4, 16, 1), (16, 8, 1), (4, 32, 10**6)])
def test_tiles_keep_the_values(tiles):
    """Row blocks of 4 or 16, column tiles of 8/16/32, the forward's grid target narrowing rows
    to 1: float32 values and gradients equal the reference's."""
    args = _args(seed=5, delta_dtype=jnp.float32)
    cts = (jnp.ones((B, L, D)), jnp.linspace(-1.0, 1.0, B * L * D).reshape(B, L, D))
    (u_ref, x_ref), g_ref = _value_and_grads(*args, cts, impl="xla", dtype=jnp.float32)
    (u, x), g = _value_and_grads(*args, cts, impl="pallas", dtype=jnp.float32, tiles=tiles)
    np.testing.assert_allclose(np.asarray(x), np.asarray(x_ref), **F32_TOL)
    for got, want in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_bad_shapes_raise_one_line_errors():
    h, delta, w, mod = _args()
    with pytest.raises(ValueError, match="delta must have h's shape"):
        fp.prenorm_xla(h, delta[:, :8], w, mod)
    with pytest.raises(ValueError, match="weight must be"):
        fp.prenorm_pallas(h, delta, w[:8], mod, interpret=True)
    with pytest.raises(ValueError, match="mod must be"):
        fp.prenorm_xla(h, delta, w, mod[:, :1])
    with pytest.raises(ValueError, match="multiple of 16"):
        fp.prenorm_pallas(h[..., :24], None, w[:24], None, interpret=True)


def _model_config(impl, conditioning="film"):
    cfg = default_config()
    with cfg.unlocked():
        cfg.model.update(d_model=32, n_layers=2, d_state=8, headdim=16, chunk_size=8,
                         time_embed_dim=32, compute_dtype="float32", ssd_impl="xla",
                         conditioning=conditioning, prenorm_impl=impl)
    return cfg.model


def test_reference_equals_the_block_prenorm():
    """prenorm_xla with the block's norm weight and FiLM's [scale; shift] is DimbaBlock's
    norm + cond exactly (float32)."""
    block = DimbaBlock(_model_config("xla"), dtype=jnp.float32, param_dtype=jnp.float32,
                       rngs=nnx.Rngs(0))
    block.cond.proj.kernel[...] = 0.1 * jax.random.normal(jax.random.key(1),
                                                           block.cond.proj.kernel.shape)
    h, delta, _, _ = _args(seed=2, delta_dtype=jnp.float32)
    c = jax.random.normal(jax.random.key(4), (B, 32))
    want = block.cond(block.norm(h + delta), c)
    _, got = fp.prenorm_xla(h, delta, block.norm.weight[...], block.cond.modulation(c))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("conditioning", ["film", "additive"])
def test_model_pallas_equals_xla_values_and_gradients(conditioning):
    """DimbaModel.predict with model.prenorm_impl "pallas" (interpreter) against "xla": same
    x0 and logits, same gradients of every parameter."""
    def build(impl):
        model = DimbaModel(_model_config(impl, conditioning), vocab_size=11, rngs=nnx.Rngs(0))
        for block in model.blocks:  # non-zero conditioning (it is zero-initialised)
            block.cond.proj.kernel[...] = 0.1 * jnp.ones_like(block.cond.proj.kernel[...])
        return model

    k = jax.random.split(jax.random.key(0), 2)
    x_t = jax.random.normal(k[0], (B, L, 32))
    tokens = jax.random.randint(k[1], (B, L), 0, 11)
    mask = jnp.arange(L)[None, :].repeat(B, 0) < 4
    logsnr = jnp.array([0.5, -2.0])

    def loss(model):
        x0, logits = model.predict(x_t, logsnr, tokens, mask)
        return jnp.sum(x0 ** 2) + jnp.sum(jax.nn.log_softmax(logits) * 0.01)

    results = []
    for impl in ("xla", "pallas"):
        model = build(impl)
        value, grads = jax.jit(nnx.value_and_grad(loss))(model)
        results.append((value, jax.tree.leaves(nnx.state(grads))))
    (v0, g0), (v1, g1) = results
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-5)


def test_ar_model_pallas_equals_xla_values_and_gradients():
    """MambaLM with prenorm_impl "pallas" (each layer's residual add + RMSNorm fused,
    interpreter) against "xla": same logits and parameter gradients (float32)."""
    from dimba_jax.models.ar import MambaLM

    ids = jax.random.randint(jax.random.key(3), (B, L), 0, 50)

    def loss(model):
        return jnp.mean(jax.nn.logsumexp(model(ids), axis=-1))

    results = []
    for impl in ("xla", "pallas"):
        model = MambaLM(50, d_model=32, n_layers=2, d_state=8, headdim=16, chunk_size=8,
                        ssd_impl="xla", conv_impl="xla", norm_impl="xla", prenorm_impl=impl,
                        rngs=nnx.Rngs(0))
        value, grads = jax.jit(nnx.value_and_grad(loss))(model)
        results.append((value, jax.tree.leaves(nnx.state(grads))))
    (v0, g0), (v1, g1) = results
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-6)


def test_kernels_lower_to_triton_for_cuda():
    """Forward and backward lower through the Pallas Triton backend (no GPU needed), at the
    base config's width (768: three tiles of 256), with and without delta."""
    from dimba_jax.ssd.hopper import cuda_lowering_context

    h = jax.ShapeDtypeStruct((2, 64, 768), jnp.float32)
    delta = jax.ShapeDtypeStruct((2, 64, 768), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((768,), jnp.float32)
    mod = jax.ShapeDtypeStruct((2, 2, 768), jnp.float32)

    def f(*args):
        out, vjp = jax.vjp(functools.partial(fp.prenorm_pallas, dtype=jnp.bfloat16), *args)
        return out, vjp(jax.tree.map(jnp.ones_like, out))

    with cuda_lowering_context():
        for args in ((h, delta, w, mod), (h, None, w, mod)):
            text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            assert text.count("xla.gpu.triton") == 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_compiled_kernels_match_reference_on_gpu(dtype):
    args = _args(seed=4)
    k = jax.random.split(jax.random.key(9), 2)
    cts = (jax.random.normal(k[0], (B, L, D)), jax.random.normal(k[1], (B, L, D)).astype(dtype))

    def run(f):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(cts)

    ref = jax.jit(lambda: run(functools.partial(fp.prenorm_xla, dtype=dtype)))()
    got = jax.jit(lambda: run(functools.partial(fp.prenorm_pallas, dtype=dtype,
                                                block_rows=4)))()
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.float32(g), np.float32(r), **BF16_TOL)
