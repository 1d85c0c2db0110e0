"""The Mosaic GPU conv forward (`layers/mosaic_conv.py`): the reference's bits in the Mosaic GPU
interpreter (both directions across row blocks, so both halo paths; the causal mixer's one
direction), the same values and gradients as the Triton forward through `fused_conv`, its
size checks and fallback, its lowering for Hopper at configs/base.py's and small.py's sizes,
the model knob, and (gpu) the compiled kernel against the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimba_jax.layers import fused_conv, mosaic_conv
from dimba_jax.layers.mamba2 import BidirectionalMamba2
from dimba_jax.ssd import hopper

H, P, G, N, K = 2, 16, 1, 16, 4
C = H * P + 2 * G * N


def _args(batch, seqlen, xo, seed=0, width=None):
    k = jax.random.split(jax.random.key(seed), 6)
    xbc = jax.random.normal(k[0], (batch, seqlen, width or xo + C + H), jnp.float32)
    ws = tuple(0.5 * jax.random.normal(k[1 + i], (K, C)) for i in range(2))
    bs = tuple(0.1 * jax.random.normal(k[3 + i], (C,)) for i in range(2))
    return xbc.astype(jnp.bfloat16), ws, bs


@pytest.mark.parametrize("nd", [2, 1])
def test_interpreter_gives_the_reference_bits(nd):
    """Two row blocks of 64 (block 0 reads zero halos, block 1 its neighbours' rows), xBC at
    column 8 of a wider array: x, B, C (both halves, the backward one in scan time) are the
    jnp reference's bits but for rare one-ulp bf16 roundings (the float32 sums are the
    reference's order; the interpreter compiles the kernel's SiLU in one program)."""
    xbc, ws, bs = _args(2, 128, 8)
    got = mosaic_conv.conv_fwd_mosaic(xbc, ws[:nd], bs[:nd], nheads=H, ngroups=G, d_state=N,
                                      xo=8, interpret=True)
    dt = xbc[..., 8 + C:].astype(jnp.float32)
    if nd == 2:
        want = fused_conv.bidirectional_conv_xla(xbc[..., 8:8 + C], dt, *ws, *bs, ngroups=G,
                                                 d_state=N)
    else:
        want = fused_conv.causal_conv_xla(xbc[..., 8:8 + C], dt, ws[0], bs[0], ngroups=G,
                                          d_state=N)
    for g, w in zip(got, want[:3]):
        assert g.dtype == w.dtype
        g, w = np.float32(g), np.float32(w.reshape(g.shape))
        np.testing.assert_allclose(g, w, rtol=2.0 ** -7, atol=0)
        assert np.mean(g != w) < 1e-3


def test_fused_conv_forward_kernel_mosaic_equals_triton():
    """`bidirectional_conv_pallas(forward_kernel="mosaic")` reading xBC and dt from the packed
    projection output: the Triton forward's outputs (dt_cat included) and every gradient."""
    xbc, ws, bs = _args(1, 64, H * P)
    kw = dict(ngroups=G, d_state=N, interpret=True, xbc_offset=H * P, dt_offset=H * P + C,
              nheads=H)
    ct_key = jax.random.key(7)

    def value_and_grads(kernel):
        def loss(*a):
            outs = fused_conv.bidirectional_conv_pallas(a[0], a[0], *a[1:], forward_kernel=kernel,
                                                        **kw)
            cts = [jax.random.normal(jax.random.fold_in(ct_key, i), o.shape)
                   for i, o in enumerate(outs)]
            return sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(outs, cts)), outs
        return jax.value_and_grad(loss, argnums=tuple(range(5)), has_aux=True)(xbc, *ws, *bs)

    want, got = value_and_grads("triton"), value_and_grads("mosaic")
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert w.shape == g.shape and w.dtype == g.dtype
        np.testing.assert_array_equal(np.float32(g), np.float32(w))


def test_sizes_are_checked_and_the_triton_forward_takes_what_it_cannot():
    assert "multiple of 64" in mosaic_conv.size_error(96, 1536, 128, 1536, 2, False)
    assert "power-of-two" in mosaic_conv.size_error(64, 1536, 96, 1536, 2, False)
    assert "16-byte" in mosaic_conv.size_error(64, 1536, 128, 3, 2, False)
    assert mosaic_conv.size_error(64, 32, 16, 3, 2, True) == ""  # the interpreter takes any
    with pytest.raises(ValueError, match="multiple of 64"):
        mosaic_conv.conv_fwd_mosaic(*_args(1, 32, 0), nheads=H, ngroups=G, d_state=N,
                                    interpret=True)
    xbc, ws, bs = _args(1, 32, 0)
    cfg = fused_conv.kernel_config(xbc, xbc, ws, bs, ngroups=G, d_state=N, dtype=jnp.bfloat16,
                                   interpret=True, dt_offset=C, nheads=H,
                                   forward_kernel="mosaic")
    assert cfg[3][0].kernel == "triton"  # L = 32: no 64-row block
    xbc, ws, bs = _args(1, 64, 0)
    cfg = fused_conv.kernel_config(xbc, xbc, ws, bs, ngroups=G, d_state=N, dtype=jnp.bfloat16,
                                   interpret=True, dt_offset=C, nheads=H,
                                   forward_kernel="mosaic")
    assert cfg[3][0].kernel == "mosaic"
    with pytest.raises(ValueError, match="model.conv_forward must be one of"):
        fused_conv.bidirectional_conv_pallas(xbc, xbc, *ws, *bs, ngroups=G, d_state=N,
                                             dt_offset=C, nheads=H, interpret=True,
                                             forward_kernel="cuda")


@pytest.mark.parametrize("nheads,d_state,nd", [(24, 128, 2), (16, 64, 1)])
def test_lowers_for_hopper(nheads, d_state, nd):
    """configs/base.py's mixer (128-column tiles, both directions) and small.py's d_state 64
    (64-column tiles, one direction) lower to one Mosaic GPU kernel for sm_90a."""
    d_inner = nheads * 64
    conv_dim = d_inner + 2 * d_state
    f = functools.partial(mosaic_conv.conv_fwd_mosaic, nheads=nheads, ngroups=1,
                          d_state=d_state, xo=d_inner)
    shapes = (jax.ShapeDtypeStruct((2, 256, d_inner + conv_dim + nheads), jnp.bfloat16),
              (jax.ShapeDtypeStruct((K, conv_dim), jnp.float32),) * nd,
              (jax.ShapeDtypeStruct((conv_dim,), jnp.float32),) * nd)
    with hopper.cuda_lowering_context():
        text = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 1 and "conv_fwd" in text


def test_model_knob_reaches_the_mixers_and_is_checked():
    from flax import nnx
    mixer = BidirectionalMamba2(32, d_state=16, headdim=16, conv_forward="mosaic",
                                rngs=nnx.Rngs(0))
    assert (mixer.fwd.conv_forward, mixer.bwd.conv_forward) == ("mosaic", "mosaic")
    with pytest.raises(ValueError, match="model.conv_forward must be one of"):
        BidirectionalMamba2(32, d_state=16, headdim=16, conv_forward="triton2", rngs=nnx.Rngs(0))


@pytest.mark.gpu
@pytest.mark.parametrize("batch,seqlen", [(1, 1024), (4, 256)])
def test_compiled_kernel_matches_the_reference_on_gpu(batch, seqlen):
    """configs/base.py's mixer sizes compiled: within a bf16 rounding of the jnp reference
    (both compute float32 sums; the compilers may contract them differently)."""
    nheads, d_state = 24, 128
    d_inner = nheads * 64
    conv_dim = d_inner + 2 * d_state
    k = jax.random.split(jax.random.key(3), 5)
    zx = jax.random.normal(k[0], (batch, seqlen, d_inner + conv_dim + nheads), jnp.bfloat16)
    ws = tuple(0.5 * jax.random.normal(k[1 + i], (K, conv_dim)) for i in range(2))
    bs = tuple(0.1 * jax.random.normal(k[3 + i], (conv_dim,)) for i in range(2))
    got = jax.jit(functools.partial(mosaic_conv.conv_fwd_mosaic, nheads=nheads, ngroups=1,
                                    d_state=d_state, xo=d_inner))(zx, ws, bs)
    dt = zx[..., d_inner + conv_dim:].astype(jnp.float32)
    want = jax.jit(functools.partial(fused_conv.bidirectional_conv_xla, ngroups=1,
                                     d_state=d_state))(zx[..., d_inner:d_inner + conv_dim], dt,
                                                       *ws, *bs)
    for g, w in zip(got, want[:3]):
        np.testing.assert_allclose(np.float32(g), np.float32(w.reshape(g.shape)), rtol=1e-2,
                                   atol=1e-2)
