"""The Mosaic GPU conv kernels (`layers/mosaic_conv.py`), forward and the backward's first: the
reference's values in the Mosaic GPU interpreter (both directions across row blocks, so both
halo paths; the causal mixer's one direction), the all-Triton values and gradients through
`fused_conv`, the size checks and fallback, lowering for Hopper at configs/base.py's and
small.py's sizes, the model knobs, and (gpu) the compiled kernels against the reference."""

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
    reference's order; the interpreter compiles the kernel's SiLU in one program). Both
    directions here with one direction per program (`split`); `fused_conv`'s tests below run
    the kernels with both per program."""
    xbc, ws, bs = _args(2, 128, 8)
    got = mosaic_conv.conv_fwd_mosaic(xbc, ws[:nd], bs[:nd], ngroups=G, d_state=N,
                                      xo=8, interpret=True, split=nd == 2)
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


def test_forward_rows_follow_the_grid_target():
    """fwd_rows: 64 rows where batch x row blocks x column tiles reaches the target (the base
    train step: 16 x 16 x 14 programs), halved down to 16 where it does not (the base sampler:
    1 x 16 x 14); target 1 keeps 64."""
    assert mosaic_conv.fwd_rows(16, 1024, 14, 1024) == 64
    assert mosaic_conv.fwd_rows(1, 1024, 14, 1024) == 16
    assert mosaic_conv.fwd_rows(4, 1024, 14, 1024) == 32
    assert mosaic_conv.fwd_rows(1, 1024, 14, 1) == 64
    assert mosaic_conv.fwd_rows(1, 64, 2, 10 ** 6) == mosaic_conv.MIN_FWD_ROWS


@pytest.mark.parametrize("nd", [2, 1])
def test_forward_with_fewer_rows_per_program_gives_the_same_bits(nd):
    """A grid target that halves the rows per program (16 and 32 rows: more halo reads, more
    programs, the flip in shorter loops) gives the 64-row forward's outputs bit for bit (each
    row's taps and their order do not depend on the blocking)."""
    xbc, ws, bs = _args(1, 128, 8, seed=5)
    run = functools.partial(mosaic_conv.conv_fwd_mosaic, xbc, ws[:nd], bs[:nd], ngroups=G,
                            d_state=N, xo=8, interpret=True)
    want = run()
    ncols = 32 // 16 + 2 * (16 // 16)  # 16-column tiles: x's two, B's one, C's one
    assert [mosaic_conv.fwd_rows(1, 128, ncols, t) for t in (16, 2 ** 30)] == [32, 16]
    for target in (16, 2 ** 30):
        for g, w in zip(run(min_programs=target), want):
            np.testing.assert_array_equal(np.float32(g), np.float32(w))


@pytest.mark.parametrize("nd", [2, 1])
def test_backward_g_kernel_gives_the_reference_in_the_interpreter(nd):
    """`conv_bwd_g_mosaic` over two row blocks, xBC at column 8: g = dout * silu'(a) per
    direction (both halves in original time) within a bf16 rounding of jnp's, and the
    programs' weight and bias partial sums adding up to jnp's sums over the sequence (both
    directions: one direction per program, `split`)."""
    xbc, ws, bs = _args(2, 128, 8)
    k = jax.random.split(jax.random.key(5), 3)
    douts = [jax.random.normal(k[0], (2, 128, nd * H * P), jnp.bfloat16),
             jax.random.normal(k[1], (2, 128, nd * G * N), jnp.bfloat16),
             jax.random.normal(k[2], (2, 128, nd * G * N), jnp.bfloat16)]
    g, dw = mosaic_conv.conv_bwd_g_mosaic(xbc, ws[:nd], bs[:nd], *douts, ngroups=G, d_state=N,
                                          xo=8, interpret=True, split=nd == 2)
    assert g.shape == (2, 128, nd, C) and g.dtype == jnp.bfloat16
    assert dw.shape == (2, 2, nd, K + 1, C) and dw.dtype == jnp.float32
    x = xbc[..., 8:8 + C].astype(jnp.float32)
    for h in range(nd):
        dout = jnp.concatenate([d[..., h * w:(h + 1) * w] for d, w in
                                zip(douts, (H * P, G * N, G * N))], -1).astype(jnp.float32)
        xs = jnp.pad(x if h == 0 else x[:, ::-1], ((0, 0), (K - 1, 0), (0, 0)))  # scan time
        taps = [xs[:, i:i + 128] for i in range(K)]
        a = bs[h] + sum(ws[h][i] * taps[i] for i in range(K))
        sig = jax.nn.sigmoid(a)
        want = dout * sig * (1 + a * (1 - sig))
        got = g[:, :, h] if h == 0 else g[:, ::-1, h]  # to scan time
        np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=2.0 ** -7, atol=1e-6)
        sums = jnp.stack([jnp.sum(want * t, axis=(0, 1)) for t in taps]
                         + [jnp.sum(want, axis=(0, 1))])
        np.testing.assert_allclose(np.asarray(jnp.sum(dw[:, :, h], axis=(0, 1))),
                                   np.asarray(sums), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("nd", [2, 1])
def test_fused_conv_with_mosaic_kernels_equals_triton(nd, fwd="mosaic", bwd="mosaic"):
    """`bidirectional_conv_pallas` / `causal_conv_pallas` with the Mosaic forward and the
    Mosaic backward's first kernel, reading xBC and dt from the packed projection output (two
    row blocks): the all-Triton outputs (dt_cat included) and the xbc gradient bit for bit
    (the same float32 g, rounded alike); the weight and bias gradients to float32 rounding
    (the Mosaic kernel sums its 64 rows in another order than Triton's row steps)."""
    xbc, ws, bs = _args(1, 128, H * P)
    kw = dict(ngroups=G, d_state=N, interpret=True, xbc_offset=H * P, dt_offset=H * P + C,
              nheads=H)
    ct_key = jax.random.key(7)
    fn = fused_conv.bidirectional_conv_pallas if nd == 2 else fused_conv.causal_conv_pallas

    def value_and_grads(kernels):
        def loss(*a):
            outs = fn(a[0], a[0], *a[1:1 + nd], *a[1 + nd:], forward_kernel=kernels[0],
                      backward_kernel=kernels[1], **kw)
            cts = [jax.random.normal(jax.random.fold_in(ct_key, i), o.shape)
                   for i, o in enumerate(outs)]
            return sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(outs, cts)), outs
        return jax.value_and_grad(loss, argnums=tuple(range(1 + 2 * nd)), has_aux=True)(
            xbc, *ws[:nd], *bs[:nd])

    (want_loss, want_outs), want_grads = value_and_grads(("triton", "triton"))
    (got_loss, got_outs), got_grads = value_and_grads((fwd, bwd))
    for w, g in zip(jax.tree.leaves(want_outs) + [want_grads[0]],
                    jax.tree.leaves(got_outs) + [got_grads[0]]):
        assert w.shape == g.shape and w.dtype == g.dtype
        np.testing.assert_array_equal(np.float32(g), np.float32(w))
    np.testing.assert_array_equal(got_loss, want_loss)
    for w, g in zip(want_grads[1:], got_grads[1:]):
        assert w.shape == g.shape and w.dtype == g.dtype
        np.testing.assert_allclose(np.float32(g), np.float32(w), rtol=1e-5, atol=1e-4)


def test_sizes_are_checked_and_the_triton_forward_takes_what_it_cannot(monkeypatch):
    assert "multiple of 64" in mosaic_conv.size_error(96, 1536, 128, 1536, 2, False)
    assert "power-of-two" in mosaic_conv.size_error(64, 1536, 96, 1536, 2, False)
    assert "16-byte" in mosaic_conv.size_error(64, 1536, 128, 3, 2, False)
    assert mosaic_conv.size_error(64, 32, 16, 3, 2, True) == ""  # the interpreter takes any
    with pytest.raises(ValueError, match="multiple of 64"):
        mosaic_conv.conv_fwd_mosaic(*_args(1, 32, 0), ngroups=G, d_state=N,
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
    # compiled (not interpreted), the Mosaic kernels run on a Hopper GPU only
    nheads, d_state, d_inner, conv_dim, zx, wb, bb = _base_args(1, 64, 0)
    for hopper_gpu in (True, False):
        monkeypatch.setattr(hopper, "on_hopper_gpu", lambda v=hopper_gpu: v)
        cfg = fused_conv.kernel_config(zx, zx, wb, bb, ngroups=1, d_state=d_state,
                                       dtype=jnp.bfloat16, interpret=False, xbc_offset=d_inner,
                                       dt_offset=d_inner + conv_dim, nheads=nheads,
                                       forward_kernel="mosaic", backward_kernel="mosaic")
        assert {t.kernel for t in cfg[3]} == {"mosaic" if hopper_gpu else "triton"}
    with pytest.raises(ValueError, match="model.conv_forward must be one of"):
        fused_conv.bidirectional_conv_pallas(xbc, xbc, *ws, *bs, ngroups=G, d_state=N,
                                             dt_offset=C, nheads=H, interpret=True,
                                             forward_kernel="cuda")


@pytest.mark.parametrize("nheads,d_state,nd", [(24, 128, 2), (16, 64, 1)])
def test_lowers_for_hopper(nheads, d_state, nd):
    """configs/base.py's mixer (128-column tiles, both directions) and small.py's d_state 64
    (64-column tiles, one direction): the forward and the backward's first kernel each lower
    to one Mosaic GPU kernel for sm_90a."""
    d_inner = nheads * 64
    conv_dim = d_inner + 2 * d_state
    f = functools.partial(mosaic_conv.conv_fwd_mosaic, ngroups=1,
                          d_state=d_state, xo=d_inner)
    shapes = (jax.ShapeDtypeStruct((2, 256, d_inner + conv_dim + nheads), jnp.bfloat16),
              (jax.ShapeDtypeStruct((K, conv_dim), jnp.float32),) * nd,
              (jax.ShapeDtypeStruct((conv_dim,), jnp.float32),) * nd)
    douts = (jax.ShapeDtypeStruct((2, 256, nd * d_inner), jnp.bfloat16),
             *(jax.ShapeDtypeStruct((2, 256, nd * d_state), jnp.bfloat16),) * 2)
    bwd = functools.partial(mosaic_conv.conv_bwd_g_mosaic, ngroups=1, d_state=d_state,
                            xo=d_inner)
    with hopper.cuda_lowering_context():
        text = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
        bwd_text = jax.jit(bwd).trace(*shapes, *douts).lower(
            lowering_platforms=("cuda",)).as_text()
        for kernel, args in ((f, shapes), (bwd, shapes + douts)):  # one direction per program
            split = jax.jit(functools.partial(kernel, split=True)).trace(*args).lower(
                lowering_platforms=("cuda",)).as_text()
            assert split.count("mosaic_gpu") >= 1
    assert text.count("mosaic_gpu") >= 1 and "conv_fwd" in text
    assert bwd_text.count("mosaic_gpu") >= 1 and "conv_bwd_g" in bwd_text
    with hopper.cuda_lowering_context():  # the sampler's batch 1: 16 rows per program
        one = tuple(jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype) for a in shapes[:1])
        small = jax.jit(functools.partial(f, min_programs=2 ** 20)).trace(
            *one, *shapes[1:]).lower(lowering_platforms=("cuda",)).as_text()
    assert small.count("mosaic_gpu") >= 1


def test_model_knob_reaches_the_mixers_and_is_checked():
    from flax import nnx
    mixer = BidirectionalMamba2(32, d_state=16, headdim=16, conv_forward="mosaic",
                                conv_backward="mosaic", rngs=nnx.Rngs(0))
    assert (mixer.fwd.conv_forward, mixer.bwd.conv_forward) == ("mosaic", "mosaic")
    assert (mixer.fwd.conv_backward, mixer.bwd.conv_backward) == ("mosaic", "mosaic")
    with pytest.raises(ValueError, match="model.conv_forward must be one of"):
        BidirectionalMamba2(32, d_state=16, headdim=16, conv_forward="triton2", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.conv_backward must be one of"):
        BidirectionalMamba2(32, d_state=16, headdim=16, conv_backward="cuda", rngs=nnx.Rngs(0))


def _base_args(batch, seqlen, seed):
    """configs/base.py's mixer sizes: (H, N, H*P, C, the projection output zx (batch, seqlen,
    H*P + C + H) bf16, both directions' conv weights and biases)."""
    nheads, d_state = 24, 128
    d_inner = nheads * 64
    conv_dim = d_inner + 2 * d_state
    k = jax.random.split(jax.random.key(seed), 5)
    zx = jax.random.normal(k[0], (batch, seqlen, d_inner + conv_dim + nheads), jnp.bfloat16)
    ws = tuple(0.5 * jax.random.normal(k[1 + i], (K, conv_dim)) for i in range(2))
    bs = tuple(0.1 * jax.random.normal(k[3 + i], (conv_dim,)) for i in range(2))
    return nheads, d_state, d_inner, conv_dim, zx, ws, bs


@pytest.mark.gpu
@pytest.mark.parametrize("batch,seqlen,split", [(1, 1024, False), (4, 256, True)])
def test_compiled_kernel_matches_the_reference_on_gpu(batch, seqlen, split):
    """configs/base.py's mixer sizes compiled (both directions per program, or one):
    within a bf16 rounding of the jnp reference (both compute float32 sums; the compilers may
    contract them differently)."""
    nheads, d_state, d_inner, conv_dim, zx, ws, bs = _base_args(batch, seqlen, 3)
    got = jax.jit(functools.partial(mosaic_conv.conv_fwd_mosaic, ngroups=1,
                                    d_state=d_state, xo=d_inner, split=split))(zx, ws, bs)
    dt = zx[..., d_inner + conv_dim:].astype(jnp.float32)
    want = jax.jit(functools.partial(fused_conv.bidirectional_conv_xla, ngroups=1,
                                     d_state=d_state))(zx[..., d_inner:d_inner + conv_dim], dt,
                                                       *ws, *bs)
    for g, w in zip(got, want[:3]):
        np.testing.assert_allclose(np.float32(g), np.float32(w.reshape(g.shape)), rtol=1e-2,
                                   atol=1e-2)


@pytest.mark.gpu
def test_compiled_forward_at_16_rows_gives_the_64_row_bits_on_gpu():
    """The sampler's shape (batch 1, base mixer): the forward at the grid target's 16 rows per
    program equals the 64-row forward bit for bit."""
    nheads, d_state, d_inner, conv_dim, zx, ws, bs = _base_args(1, 1024, 4)
    run = lambda target: jax.jit(functools.partial(  # noqa: E731
        mosaic_conv.conv_fwd_mosaic, ngroups=1, d_state=d_state, xo=d_inner,
        min_programs=target))(zx, ws, bs)
    ncols = mosaic_conv.column_tiles(d_inner, d_state, 128)
    assert mosaic_conv.fwd_rows(1, 1024, ncols, 1024) == 16
    for g, w in zip(run(1024), run(1)):
        np.testing.assert_array_equal(np.float32(g), np.float32(w))


@pytest.mark.gpu
@pytest.mark.parametrize("batch,seqlen,nd", [(2, 1024, 2), (4, 256, 2), (2, 1024, 1)])
def test_compiled_backward_matches_the_reference_on_gpu(batch, seqlen, nd):
    """configs/base.py's mixer sizes (nd 2; nd 1: the causal mixer of configs/ar_base.py),
    the Mosaic forward and backward's first kernel compiled inside `bidirectional_conv_pallas`
    / `causal_conv_pallas`: outputs (dt_cat exact) and gradients against autodiff of the jnp
    reference, within bf16 roundings (g is rounded to bf16 before the Triton dxbc kernel)."""
    nheads, d_state, d_inner, conv_dim, zx, ws, bs = _base_args(batch, seqlen, 4)
    ws, bs = ws[:nd], bs[:nd]
    ct_key = jax.random.key(5)
    kw = dict(ngroups=1, d_state=d_state)
    pallas = fused_conv.bidirectional_conv_pallas if nd == 2 else fused_conv.causal_conv_pallas
    xla = fused_conv.bidirectional_conv_xla if nd == 2 else fused_conv.causal_conv_xla

    def outputs(fused, zx, *wb):
        if fused:
            return pallas(zx, zx, *wb, xbc_offset=d_inner, dt_offset=d_inner + conv_dim,
                          nheads=nheads, forward_kernel="mosaic", backward_kernel="mosaic", **kw)
        return xla(zx[..., d_inner:d_inner + conv_dim], zx[..., d_inner + conv_dim:], *wb, **kw)

    def loss(fused, zx, *wb):
        outs = outputs(fused, zx, *wb)
        cts = [jax.random.normal(jax.random.fold_in(ct_key, i), o.shape) for i, o in
               enumerate(outs[:3])]
        return sum(jnp.sum(o.astype(jnp.float32).reshape(c.shape) * c)
                   for o, c in zip(outs[:3], cts))

    dtc = [jax.jit(functools.partial(outputs, fused))(zx, *ws, *bs)[3] for fused in (True, False)]
    np.testing.assert_array_equal(np.float32(dtc[0]), np.float32(dtc[1]).reshape(dtc[0].shape))
    grads = [jax.jit(jax.grad(functools.partial(loss, fused), argnums=tuple(range(1 + 2 * nd))))(
        zx, *ws, *bs) for fused in (True, False)]
    for g, w in zip(*grads):
        g, w = np.float32(g), np.float32(w)
        scale = np.max(np.abs(w))
        np.testing.assert_allclose(g, w, rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.gpu
def test_compiled_backward_kernel_split_gives_the_same_bits_on_gpu():
    """The backward's first kernel compiled with one direction per program (`split`) gives
    the bits of both directions per program (the same float32 sums in the same order)."""
    nheads, d_state, d_inner, conv_dim, zx, ws, bs = _base_args(2, 512, 6)
    k = jax.random.split(jax.random.key(7), 3)
    douts = (jax.random.normal(k[0], (2, 512, 2 * d_inner), jnp.bfloat16),
             jax.random.normal(k[1], (2, 512, 2 * d_state), jnp.bfloat16),
             jax.random.normal(k[2], (2, 512, 2 * d_state), jnp.bfloat16))
    got = [jax.jit(functools.partial(mosaic_conv.conv_bwd_g_mosaic, ngroups=1, d_state=d_state,
                                     xo=d_inner, split=split))(zx, ws, bs, *douts)
           for split in (False, True)]
    for a, b in zip(*got):
        np.testing.assert_array_equal(np.float32(a), np.float32(b))
