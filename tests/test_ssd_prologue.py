"""The SSD step-size prologue kernel (ssd/pallas_prologue.py) in the Pallas interpreter against
its XLA reference (`_common.prepare_dt`): values, gradients, padding, the fallback for head
counts it does not take, its place in the Mosaic path (KernelConfig.prologue), and its Triton
lowering for CUDA."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimba_jax.ssd import (KernelConfig, _common, pallas_gpu, pallas_mosaic, pallas_mosaic_fwd,
                           pallas_prologue)
from dimba_jax.ssd import ssd as ssd_api


def _args(seqlen=40, nh=16, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    dt = (2.0 * jax.random.normal(k[0], (2, seqlen, nh))).astype(dtype)
    A = -jnp.exp(jax.random.normal(k[1], (nh,)))
    bias = 0.5 * jax.random.normal(k[2], (nh,))
    return dt, A, bias


@pytest.mark.parametrize("seqlen,q,dtype,kw,dec_cols", [
    (40, 16, jnp.float32, dict(dt_softplus=True), 0),  # 40 -> 48: padded rows are zero
    (64, 32, jnp.bfloat16, dict(dt_softplus=True, dt_limit=(0.01, 2.0)), 0),
    (32, 16, jnp.float32, dict(dt_softplus=False, dt_limit=(0.0, math.inf)), 0),  # clip at 0
    (40, 16, jnp.float32, dict(dt_softplus=True), 8),  # decays repeated along 8 columns
])
def test_kernel_matches_reference_values_and_gradients(seqlen, q, dtype, kw, dec_cols):
    """dtk, sk (and with weights the state pass's w and the chunk-end decays, against
    `pallas_mosaic_fwd.state_weights` and exp of each chunk's last cumulative sum, repeated
    along dec_cols columns where asked) and the gradients of all of them."""
    dt, A, bias = _args(seqlen, dtype=dtype, seed=seqlen)
    lp = -(-seqlen // q) * q
    dec_shape = (2, 16, lp // q) + ((dec_cols,) if dec_cols else ())
    cts = tuple(jax.random.normal(jax.random.key(i), (2, 16, lp)) for i in (1, 2, 3)) + (
        jax.random.normal(jax.random.key(4), dec_shape),)
    fused = functools.partial(pallas_prologue.prepare_dt_pallas, q=q, weights=True,
                              dec_cols=dec_cols, interpret=True, **kw)

    def ref(d, a, dt_bias):
        dtk, sk = _common.prepare_dt(d, a, q, dt_bias=dt_bias, **kw)
        dec = jnp.exp(sk.reshape(2, 16, lp // q, q)[..., -1])
        dec = jnp.broadcast_to(dec[..., None], dec_shape) if dec_cols else dec
        return dtk, sk, pallas_mosaic_fwd.state_weights(dtk, sk, q), dec

    def run(f):
        out, vjp = jax.vjp(lambda d, a, b: f(d, a, dt_bias=b), dt, A, bias)
        return out, vjp(cts)

    want, want_g = jax.jit(lambda: run(ref))()
    got, g = jax.jit(lambda: run(fused))()
    for name, o, w in zip(("dtk", "sk", "w", "dec"), got, want):
        np.testing.assert_allclose(np.asarray(o), np.asarray(w), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert not np.asarray(got[0])[:, :, seqlen:].any()
    two = jax.jit(functools.partial(pallas_prologue.prepare_dt_pallas, q=q, interpret=True,
                                    **kw))(dt, A, dt_bias=bias)
    for o, w in zip(two, got[:2]):  # without weights: the same two outputs
        np.testing.assert_array_equal(np.asarray(o), np.asarray(w))
    for got_g, want_g_ in zip(g, want_g):  # sums over (b, L): to float32 summation order
        assert got_g.dtype == want_g_.dtype
        scale = float(np.abs(np.float32(want_g_)).max())
        np.testing.assert_allclose(np.float32(got_g), np.float32(want_g_), rtol=1e-5,
                                   atol=1e-5 * scale)


@pytest.mark.parametrize("directions", [1, 2])
def test_kernel_reads_a_column_window_in_place(directions):
    """With layout (offset, directions) the kernel reads 16 heads' step sizes from a wider
    array (columns [5, 5 + 16 / directions); a second direction's in reversed time): values
    and gradients (to the wide array, zero outside the window) equal those of the kernel on
    `_common.window_dt`'s (b, L, 16) array; an out-of-range window is refused."""
    k = jax.random.split(jax.random.key(7), 2)
    wide = 2.0 * jax.random.normal(k[0], (2, 40, 24))
    _, A, bias = _args()
    layout = (5, directions)
    kw = dict(q=16, dt_bias=bias, dt_softplus=True, weights=True, dec_cols=8, interpret=True)
    cts = jax.tree.map(lambda a: jax.random.normal(k[1], a.shape),
                       pallas_prologue.prepare_dt_pallas(jnp.zeros((2, 40, 16)), A, **kw))

    def windowed(w):
        return pallas_prologue.prepare_dt_pallas(_common.window_dt(w, layout, 16), A, **kw)

    def in_place(w):
        return pallas_prologue.prepare_dt_pallas(w, A, layout=layout, **kw)

    def run(f):
        out, vjp = jax.vjp(f, wide)
        return out, vjp(cts)[0]

    want, want_g = jax.jit(lambda: run(windowed))()
    got, g = jax.jit(lambda: run(in_place))()
    for o, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(o), np.asarray(w))
    np.testing.assert_allclose(np.asarray(g), np.asarray(want_g), rtol=1e-6, atol=1e-6)
    outside = np.ones(24, bool)
    outside[5:5 + 16 // directions] = False
    assert not np.asarray(g)[..., outside].any() and np.asarray(g)[..., ~outside].any()
    with pytest.raises(ValueError, match="dt_layout"):
        pallas_prologue.prepare_dt_pallas(wide, A, layout=(20, directions), **kw)


def test_sizes_it_does_not_take_raise_and_prepare_chunks_takes_given_chunks():
    dt, A, bias = _args(nh=12)
    assert not pallas_prologue.prologue_supported(12, 16)
    assert not pallas_prologue.prologue_supported(16, 24)
    with pytest.raises(ValueError, match="multiple of 8"):
        pallas_prologue.prepare_dt_pallas(dt, A, 16, interpret=True)
    with pytest.raises(ValueError, match="dec_cols"):
        pallas_prologue.prepare_dt_pallas(jnp.zeros((2, 40, 16)), A[:1].repeat(16), 16,
                                          weights=True, dec_cols=6, interpret=True)
    with pytest.raises(ValueError, match="dt_bias"):
        pallas_prologue.prepare_dt_pallas(dt, A, 16, dt_bias=bias[:4], interpret=True)
    x = jnp.zeros((2, 40, 12, 8))
    bc = jnp.zeros((2, 40, 1, 8))
    given = (jnp.ones((2, 12, 48)), 2 * jnp.ones((2, 12, 48)))
    got = pallas_gpu.prepare_chunks(x, dt, A, bc, bc, 16, jnp.float32, dt_chunks=given)
    assert got[3] is given[0] and got[4] is given[1]  # precomputed dt chunks are used as given


def test_kernel_config_prologue_routes_the_mosaic_path(monkeypatch):
    """KernelConfig(prologue="pallas"), and "auto" (the default) in a call without a gradient,
    make ssd_mosaic_forward take its dt chunks (and the state pass's weights) from the
    prologue; "xla" forms them in XLA; an unknown value is refused."""
    seen = []

    def spy(*a, **k):
        seen.append(k.get("dt_chunks") is not None)
        raise RuntimeError("stop")  # the Mosaic kernels themselves are not the point here

    monkeypatch.setattr(pallas_gpu, "prepare_chunks", spy)
    dt, A, bias = _args(seqlen=64)
    x = jnp.zeros((2, 64, 16, 64), jnp.bfloat16)
    bc = jnp.zeros((2, 64, 1, 64), jnp.bfloat16)
    assert KernelConfig().prologue == "auto"
    for prologue in ("xla", "auto", "pallas"):
        with pytest.raises(RuntimeError, match="stop"):
            pallas_mosaic.ssd_mosaic_forward(x, dt, A, bc, bc, 64, dt_bias=bias, dt_softplus=True,
                                             kernels=KernelConfig(prologue=prologue),
                                             interpret=True)
    assert seen == [False, True, True]
    with pytest.raises(ValueError, match="KernelConfig.prologue"):
        KernelConfig(prologue="cuda")


@pytest.mark.parametrize("layout", [None, (3328, 2)])
def test_kernel_lowers_to_triton_for_cuda(layout):
    """The forward lowers through the Pallas Triton backend (no GPU needed) at the base
    config's SSD call (48 heads: both directions, L 1024, chunk 128, the decays repeated over
    headdim 64 as ssd_mosaic_forward asks), from dt_cat or in place from the mixer's
    projection output [z 1536 | xBC 1792 | dt 24] (the forward-only mixer core's call); its
    backward is XLA's."""
    from dimba_jax.ssd.hopper import cuda_lowering_context

    dt = jax.ShapeDtypeStruct((1, 1024, 48 if layout is None else 3352), jnp.float32)
    A = jax.ShapeDtypeStruct((48,), jnp.float32)

    def f(dt, A, bias):
        out, vjp = jax.vjp(lambda d, a, b: pallas_prologue.prepare_dt_pallas(
            d, a, 128, dt_bias=b, dt_softplus=True, weights=True, dec_cols=64, layout=layout),
            dt, A, bias)
        return out, vjp(jax.tree.map(jnp.ones_like, out))

    with cuda_lowering_context():
        text = jax.jit(f).trace(dt, A, A).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1


@pytest.mark.gpu
def test_compiled_kernel_matches_reference_on_gpu():
    """Compiled (48 heads, L 200 padded to 256, chunk 128): dtk, sk, the state pass's weights
    and the chunk-end decays against the XLA reference."""
    dt, A, bias = _args(seqlen=200, nh=48, seed=3)
    kw = dict(dt_bias=bias, dt_softplus=True, dt_limit=(0.0, math.inf))

    def ref():
        dtk, sk = _common.prepare_dt(dt, A, 128, **kw)
        dec = jnp.exp(sk.reshape(2, 48, 2, 128)[..., -1])
        return dtk, sk, pallas_mosaic_fwd.state_weights(dtk, sk, 128), dec

    want = jax.jit(ref)()
    got = jax.jit(lambda: pallas_prologue.prepare_dt_pallas(dt, A, 128, weights=True, **kw))()
    for g, w in zip(got, want):  # the Triton scan sums in another order than XLA's cumsum
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
    rows = jax.jit(lambda: pallas_prologue.prepare_dt_pallas(dt, A, 128, weights=True,
                                                             dec_cols=64, **kw))()[3]
    assert rows.shape == (2, 48, 2, 64)
    np.testing.assert_allclose(np.asarray(rows), np.asarray(want[3])[..., None].repeat(64, -1),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_compiled_kernel_reads_a_column_window_on_gpu():
    """Compiled, reading 48 heads' step sizes in place from a (2, 200, 3352) projection output
    (columns [3328, 3352), the second direction in reversed time): the same bits as the
    kernel on `_common.window_dt`'s (2, 200, 48) array."""
    wide = 2.0 * jax.random.normal(jax.random.key(5), (2, 200, 3352))
    _, A, bias = _args(nh=48, seed=3)
    kw = dict(dt_bias=bias, dt_softplus=True, weights=True, dec_cols=64)
    want = jax.jit(lambda: pallas_prologue.prepare_dt_pallas(
        _common.window_dt(wide, (3328, 2), 48), A, 128, **kw))()
    got = jax.jit(lambda: pallas_prologue.prepare_dt_pallas(wide, A, 128, layout=(3328, 2),
                                                            **kw))()
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_mosaic_forward_with_the_prologue_kernel_equals_xla_values_and_gradients():
    """ssd_mosaic_forward with KernelConfig(prologue="pallas") against "xla" (both in the
    interpreters; 8 heads, a length that pads): the same y and every gradient, forward-only
    and differentiated. "auto" runs the kernel only where no gradient is taken: its
    forward-only y is "pallas"'s, its differentiated y and gradients "xla"'s (the kernel's
    pallas_call is in the forward-only program and not in the gradient's)."""
    from _ssd_testing import rel_error

    ks = jax.random.split(jax.random.key(4), 7)
    b, l, h, p, n = 1, 100, 8, 64, 64
    x = jax.random.normal(ks[0], (b, l, h, p)).astype(jnp.bfloat16)
    dt = jax.random.normal(ks[1], (b, l, h)) - 1.0
    A = -jnp.exp(jax.random.uniform(ks[2], (h,), minval=-1.0, maxval=1.0))
    B, C = (jax.random.normal(k, (b, l, 1, n)).astype(jnp.bfloat16) for k in ks[3:5])
    kw = dict(dt_bias=0.5 * jax.random.normal(ks[5], (h,)), dt_softplus=True)
    dy = jax.random.normal(ks[6], (b, l, h, p)).astype(jnp.bfloat16)

    def run(prologue):
        f = functools.partial(pallas_mosaic.ssd_mosaic_forward, chunk_size=64, interpret=True,
                              kernels=KernelConfig(block_len=64, backward="triton",
                                                   prologue=prologue), **kw)
        def value_and_grads(*a):
            y, vjp = jax.vjp(f, *a)
            return y, vjp(dy)

        # jitted: one dispatch each instead of an eager op-by-op vjp through the interpreters
        y_only = jax.jit(f)(x, dt, A, B, C)
        y, grads = jax.jit(value_and_grads)(x, dt, A, B, C)
        kernel_in = ["ssd_dt_prologue" in str(jax.make_jaxpr(g)(x, dt, A, B, C))
                     for g in (f, value_and_grads)]
        return y_only, y, grads, kernel_in

    want = run("xla")
    got = run("pallas")
    assert rel_error(got[0], want[0]) < 1e-3 and rel_error(got[1], want[1]) < 1e-3
    for g, w in zip(got[2], want[2]):
        assert rel_error(g, w) < 1e-3
    auto = run("auto")
    assert (want[3], got[3], auto[3]) == ([False, False], [True, True], [True, False])
    np.testing.assert_array_equal(np.float32(auto[0]), np.float32(got[0]))
    assert rel_error(auto[1], want[1]) < 1e-6
    for g, w in zip(auto[2], want[2]):
        assert rel_error(g, w) < 1e-6


def test_ssd_reads_dt_through_its_layout_values_and_gradients():
    """`ssd(..., dt_layout=(offset, 2))` on a wider dt equals `ssd` on `_common.window_dt`'s
    array, values and the gradient to the wide array (XLA path; and the Mosaic forward in its
    interpreter with its prologue kernel reading the wide array in place, differentiated);
    a layout outside the array is a one-line error."""
    from _ssd_testing import rel_error

    ks = jax.random.split(jax.random.key(11), 7)
    b, l, h, p, n = 1, 64, 16, 64, 64
    x = jax.random.normal(ks[0], (b, l, h, p)).astype(jnp.bfloat16)
    wide = jax.random.normal(ks[1], (b, l, 13)) - 1.0
    A = -jnp.exp(jax.random.uniform(ks[2], (h,), minval=-1.0, maxval=1.0))
    B, C = (jax.random.normal(k, (b, l, 1, n)).astype(jnp.bfloat16) for k in ks[3:5])
    kw = dict(dt_bias=0.5 * jax.random.normal(ks[5], (h,)), dt_softplus=True)
    dy = jax.random.normal(ks[6], (b, l, h, p)).astype(jnp.bfloat16)
    layout = (3, 2)

    def grads(f):
        y, vjp = jax.vjp(f, wide)
        return y, vjp(dy)[0]

    def via_window(fn):
        return lambda w: fn(x, _common.window_dt(w, layout, h), A, B, C)

    xla = functools.partial(ssd_api, chunk_size=32, impl="xla", **kw)
    want = jax.jit(lambda: grads(via_window(xla)))()
    got = jax.jit(lambda: grads(lambda w: xla(x, w, A, B, C, dt_layout=layout)))()
    for g, w_ in zip(got, want):
        np.testing.assert_array_equal(np.float32(g), np.float32(w_))
    assert not np.asarray(got[1])[..., 11:].any() and np.asarray(got[1])[..., 3:11].any()

    mosaic = functools.partial(pallas_mosaic.ssd_mosaic_forward, chunk_size=64, interpret=True,
                               kernels=KernelConfig(block_len=64, backward="triton",
                                                    prologue="pallas"), **kw)
    want = jax.jit(lambda: grads(via_window(mosaic)))()
    got = jax.jit(lambda: grads(lambda w: mosaic(x, _common.window_dt(w, layout, h), A, B, C,
                                                 dt_source=(w, layout))))()
    np.testing.assert_array_equal(np.float32(got[0]), np.float32(want[0]))
    assert rel_error(got[1], want[1]) < 1e-5
    with pytest.raises(ValueError, match="dt_layout"):
        ssd_api(x, wide, A, B, C, 32, dt_layout=(8, 2), **kw)
