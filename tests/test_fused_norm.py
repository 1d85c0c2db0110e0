"""The fused epilogue of the bidirectional mixer (layers/fused_norm.py): the Pallas kernel in the
interpreter vs the jnp reference (values and every gradient), the reference vs today's
BidirectionalMamba2, the model knob (pallas vs xla), and its Triton lowering for CUDA.

Tolerances: float32 agrees to float32 summation order (~1e-6). bfloat16 forward values agree
bit for bit (each half is rounded to bf16 before the mean, as in XLA); bf16 gradients of y and z
may differ by one bf16 ulp (the reference adds the two directions' dz as bf16 terms, the
kernel in float32).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _nnx_jit import jitted, loss_and_grads
from dimba_jax.layers import fused_norm as fn
from dimba_jax.layers.mamba2 import BidirectionalMamba2
from dimba_jax.ssd import ssd

B, L, H, P = 2, 16, 2, 8
F32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=2e-2, atol=4e-2)


def _args(dtype, seed=0, seqlen=L):
    k = jax.random.split(jax.random.key(seed), 4)
    y = jax.random.normal(k[0], (B, seqlen, 2 * H, P)).astype(dtype)
    z = jax.random.normal(k[1], (B, seqlen, H * P)).astype(dtype)
    w_f = 1.0 + 0.3 * jax.random.normal(k[2], (H * P,))
    w_b = 1.0 + 0.3 * jax.random.normal(k[3], (H * P,))
    return y, z, w_f, w_b


@functools.partial(jax.jit, static_argnames=("impl", "ngroups", "block_rows"))
def _value_and_grads(y, z, w_f, w_b, ct, *, impl, ngroups, block_rows=4):
    if impl == "xla":
        f = functools.partial(fn.bidirectional_gated_norm_xla, ngroups=ngroups)
    else:
        f = functools.partial(fn.bidirectional_gated_norm_pallas, ngroups=ngroups,
                              interpret=True, block_rows=block_rows)
    out, vjp = jax.vjp(f, y, z, w_f, w_b)
    return out, vjp(ct)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_kernel_matches_reference_values_and_gradients(dtype, ngroups):
    args = _args(dtype, seed=ngroups)
    ct = jax.random.normal(jax.random.key(7), (B, L, H * P)).astype(dtype)
    ref, ref_grads = _value_and_grads(*args, ct, impl="xla", ngroups=ngroups)
    out, grads = _value_and_grads(*args, ct, impl="pallas", ngroups=ngroups)
    assert out.dtype == ref.dtype == dtype
    if dtype == jnp.bfloat16:
        np.testing.assert_array_equal(np.float32(out), np.float32(ref))
    else:
        np.testing.assert_allclose(out, ref, **F32_TOL)
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    for name, g, r, a in zip(("y", "z", "w_f", "w_b"), grads, ref_grads, args):
        assert g.dtype == a.dtype and g.shape == a.shape, name
        np.testing.assert_allclose(np.float32(g), np.float32(r), err_msg=name, **tol)


@pytest.mark.parametrize("min_programs", [1, 16, 10**6])
def test_forward_narrower_rows_keep_the_values(min_programs):
    """The forward's grid target (2 batch rows x 4 row blocks of 4): rows 4 (1), 2 rows x twice
    the columns (16), one row (10**6): float32 values equal the reference's."""
    args = _args(jnp.float32, seed=5)
    f = functools.partial(fn.bidirectional_gated_norm_pallas, ngroups=2, interpret=True,
                          block_rows=4, block_cols=8, min_programs=min_programs)
    want = jax.jit(functools.partial(fn.bidirectional_gated_norm_xla, ngroups=2))(*args)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(*args)), np.asarray(want), **F32_TOL)


def test_odd_seqlen_uses_single_rows():
    """seqlen 7: one row per program; the flipped half still lines up."""
    args = _args(jnp.float32, seed=3, seqlen=7)
    ct = jax.random.normal(jax.random.key(8), (B, 7, H * P))
    ref, ref_grads = _value_and_grads(*args, ct, impl="xla", ngroups=1)
    out, grads = _value_and_grads(*args, ct, impl="pallas", ngroups=1, block_rows=16)
    np.testing.assert_allclose(out, ref, **F32_TOL)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, **F32_TOL)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_one_pass_kernels_give_the_two_pass_bits(ngroups):
    """passes 1 (a group's tiles read once, kept) against 2 (read twice), forward and backward,
    bidirectional and causal, at 4-column tiles (2 or 4 per group; the forward's grid target
    off, so its tiles stay that narrow): the same bits, values and every gradient."""
    args = _args(jnp.bfloat16, seed=11)
    ct = jax.random.normal(jax.random.key(12), (B, L, H * P)).astype(jnp.bfloat16)
    causal = (args[0][:, :, :H], args[1], args[2])
    got = {}
    for passes in (1, 2):
        bidi = functools.partial(fn.bidirectional_gated_norm_pallas, ngroups=ngroups,
                                 interpret=True, block_rows=4, block_cols=4, passes=passes,
                                 min_programs=1)
        one = functools.partial(fn.gated_norm_pallas, ngroups=ngroups, interpret=True,
                                block_rows=4, block_cols=4, passes=passes, min_programs=1)
        out, vjp = jax.vjp(bidi, *args)
        c_out, c_vjp = jax.vjp(one, *causal)
        got[passes] = jax.tree.leaves((out, vjp(ct), c_out, c_vjp(ct)))
    assert len(got[1]) == 9  # two outputs, seven gradients
    for a, b in zip(got[1], got[2]):
        np.testing.assert_array_equal(np.float32(a), np.float32(b))


def test_passes_other_than_one_or_two_are_refused():
    with pytest.raises(ValueError, match="passes must be 1 or 2"):
        fn.bidirectional_gated_norm_pallas(*_args(jnp.float32), interpret=True, passes_bwd=3)


def _bidi(norm_impl, share=True, dtype=jnp.float32):
    bidi = BidirectionalMamba2(32, share_projections=share, rngs=nnx.Rngs(5), ssd_impl="xla",
                               norm_impl=norm_impl, d_state=8, expand=2, headdim=8, ngroups=2,
                               d_conv=4, chunk_size=4, dtype=dtype)
    for block, seed in ((bidi.fwd, 1), (bidi.bwd, 2)):  # non-trivial norm weights
        w = block.norm.weight
        w[...] = 1.0 + 0.3 * jax.random.normal(jax.random.key(seed), w[...].shape)
    return bidi


@functools.partial(jax.jit, static_argnums=0)
def _epilogue_by_reference(graphdef, state, u):
    """out_proj(reference(SSD output of both directions, gate)), built from the mixer's parts."""
    bidi = nnx.merge(graphdef, state)
    f, bk = bidi.fwd, bidi.bwd
    zxf = f.in_proj(u)
    z, xbc_f, dt_f = f._split_proj(zxf)
    _, xbc_b, dt_b = bk._split_proj(zxf)
    ys = []
    for m, xbc, dt in ((f, f._conv(xbc_f, None), dt_f),
                       (bk, bk._conv(jnp.flip(xbc_b, 1), None), jnp.flip(dt_b, 1))):
        x, b, c = m._split_xbc(xbc)
        a, d, bias = m.ssm_constants()
        ys.append(ssd(x, dt, a, b, c, m.chunk_size, D=d, dt_bias=bias, dt_softplus=True,
                      impl="xla"))
    ref = fn.bidirectional_gated_norm_xla(jnp.concatenate(ys, axis=2), z, f.norm.weight[...],
                                          bk.norm.weight[...], ngroups=f.ngroups, eps=f.norm.eps)
    return f.out_proj(ref)


def test_reference_equals_the_mixer_epilogue():
    bidi, u = _bidi("xla"), jax.random.normal(jax.random.key(0), (B, L, 32))
    np.testing.assert_allclose(_epilogue_by_reference(*nnx.split(bidi), u), jitted(bidi)(u),
                               rtol=1e-5, atol=1e-5)


def test_mixer_pallas_equals_xla_values_and_gradients():
    u = jax.random.normal(jax.random.key(1), (B, L, 32))
    ct = jax.random.normal(jax.random.key(2), (B, L, 32))
    results = []
    for impl in ("xla", "pallas"):
        graphdef, state = nnx.split(_bidi(impl), nnx.Param)
        jaxpr = str(jax.make_jaxpr(loss_and_grads, static_argnums=0)(graphdef, state, u, ct))
        assert ("pallas_call" in jaxpr) == (impl == "pallas")
        results.append(loss_and_grads(graphdef, state, u, ct))
    (l_x, (g_x, du_x)), (l_p, (g_p, du_p)) = results
    np.testing.assert_allclose(l_p, l_x, rtol=1e-5)
    np.testing.assert_allclose(du_p, du_x, rtol=1e-4, atol=1e-5)
    flat_x, flat_p = jax.tree.leaves(g_x), jax.tree.leaves(g_p)
    assert len(flat_x) == len(flat_p)
    for a, b in zip(flat_x, flat_p):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_mixer_falls_back_to_xla_without_shared_projections_or_with_seq_idx():
    u = jax.random.normal(jax.random.key(3), (B, L, 32))
    seq_idx = jnp.broadcast_to((jnp.arange(L) >= 9).astype(jnp.int32), (B, L))
    for share, kw in ((False, {}), (True, {"seq_idx": seq_idx})):
        np.testing.assert_array_equal(jitted(_bidi("pallas", share))(u, **kw),
                                      jitted(_bidi("xla", share))(u, **kw))


@pytest.mark.parametrize("passes", [2, 1])
def test_kernels_lower_to_triton_for_cuda(passes):
    """Forward and backward lower through the Pallas Triton backend (no GPU needed), at the
    base config's widths (24 heads of 64: not a power of two), in two passes or one."""
    from dimba_jax.ssd.hopper import cuda_lowering_context

    shapes = (jax.ShapeDtypeStruct((2, 64, 48, 64), jnp.bfloat16),
              jax.ShapeDtypeStruct((2, 64, 24 * 64), jnp.bfloat16),
              jax.ShapeDtypeStruct((24 * 64,), jnp.float32),
              jax.ShapeDtypeStruct((24 * 64,), jnp.float32))

    def f(*args):
        out, vjp = jax.vjp(functools.partial(fn.bidirectional_gated_norm_pallas, ngroups=2,
                                             passes=passes), *args)
        return out, vjp(jnp.ones_like(out))

    with cuda_lowering_context():
        text = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2


@pytest.mark.gpu
@pytest.mark.parametrize("passes", [2, 1])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_compiled_kernels_match_reference_on_gpu(dtype, passes):
    args = _args(dtype, seed=4)
    ct = jax.random.normal(jax.random.key(9), (B, L, H * P)).astype(dtype)
    tol = BF16_TOL if dtype == jnp.bfloat16 else dict(rtol=1e-4, atol=1e-4)

    def run(f):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(ct)

    ref, ref_grads = jax.jit(lambda: run(functools.partial(
        fn.bidirectional_gated_norm_xla, ngroups=2)))()
    out, grads = jax.jit(lambda: run(functools.partial(
        fn.bidirectional_gated_norm_pallas, ngroups=2, block_rows=4, passes=passes)))()
    np.testing.assert_allclose(np.float32(out), np.float32(ref), **tol)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.float32(g), np.float32(r), **tol)
