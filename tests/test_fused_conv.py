"""The fused prologue of the bidirectional mixer (layers/fused_conv.py): the Pallas kernels in the
interpreter vs the jnp reference (values and every gradient; the forward's column splits), the
reference vs the tensors that BidirectionalMamba2 feeds its SSD, the model knob (pallas vs xla,
alone and with the fused norm), and their Triton lowering for CUDA. Also what both kernel knobs (model.conv_impl,
model.norm_impl) share: their values, "auto" and its resolution (layers/triton_common.py).

Tolerances: forward values agree bit for bit in bfloat16 (same float32 summation order, one
rounding to the output dtype) and to 1e-6 in float32 (XLA's CPU backend at optimisation level 0,
tests/conftest.py, compiles the interpreted kernel's SiLU and the reference's differently). float32
gradients agree to float32 summation order (~1e-6). bf16 gradients of xbc and dt may differ by one
bf16 ulp (the reference adds the two directions' contributions as bf16 terms, the kernel in
float32); weight and bias gradients are float32 in both. Compiled on a GPU (Triton's exp / sigmoid,
FMA contraction) the bf16 tolerance applies to everything.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _nnx_jit import check_kernel_knobs, jitted
from dimba_jax.config import default_config
from dimba_jax.layers import fused_conv as fc
from dimba_jax.layers import mamba2 as mamba2_lib
from dimba_jax.layers import triton_common
from dimba_jax.layers.mamba2 import BidirectionalMamba2, Mamba2
from dimba_jax.models.dimba import DimbaModel

B, L, H, P, N, K = 2, 16, 2, 8, 8, 4
F32_TOL = dict(rtol=1e-5, atol=1e-5)
F32_FWD_TOL = dict(rtol=1e-6, atol=1e-6)
BF16_TOL = dict(rtol=2e-2, atol=4e-2)
NAMES = ("xbc", "dt", "w_f", "w_b", "bias_f", "bias_b")


def _args(dtype, ngroups, seed=0, seqlen=L):
    c = H * P + 2 * ngroups * N
    k = jax.random.split(jax.random.key(seed), 6)
    return (jax.random.normal(k[0], (B, seqlen, c)).astype(dtype),
            jax.random.normal(k[1], (B, seqlen, H)).astype(dtype),
            0.5 * jax.random.normal(k[2], (K, c)), 0.5 * jax.random.normal(k[3], (K, c)),
            0.5 * jax.random.normal(k[4], (c,)), 0.5 * jax.random.normal(k[5], (c,)))


def _cotangents(args, ngroups, seed=7):
    shapes = jax.eval_shape(functools.partial(fc.bidirectional_conv_xla, ngroups=ngroups,
                                              d_state=N), *args)
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return tuple(jax.random.normal(k, s.shape).astype(s.dtype) for k, s in zip(keys, shapes))


@functools.partial(jax.jit, static_argnames=("impl", "ngroups", "block_rows"))
def _value_and_grads(args, cts, *, impl, ngroups, block_rows=4):
    if impl == "xla":
        f = functools.partial(fc.bidirectional_conv_xla, ngroups=ngroups, d_state=N)
    else:
        f = functools.partial(fc.bidirectional_conv_pallas, ngroups=ngroups, d_state=N,
                              interpret=True, block_rows=block_rows, block_rows_bwd=block_rows)
    out, vjp = jax.vjp(f, *args)
    return out, vjp(cts)


def _compare(args, ngroups, dtype, block_rows=4):
    cts = _cotangents(args, ngroups)
    ref, ref_grads = _value_and_grads(args, cts, impl="xla", ngroups=ngroups)
    out, grads = _value_and_grads(args, cts, impl="pallas", ngroups=ngroups,
                                  block_rows=block_rows)
    for o, r, want in zip(out, ref, (dtype, dtype, dtype, jnp.float32)):
        assert o.dtype == r.dtype == want and o.shape == r.shape
        if o.dtype == jnp.float32:
            np.testing.assert_allclose(np.asarray(o), np.asarray(r), **F32_FWD_TOL)
        else:
            np.testing.assert_array_equal(np.float32(o), np.float32(r))
    for name, g, r, a in zip(NAMES, grads, ref_grads, args):
        assert g.dtype == a.dtype and g.shape == a.shape, name
        tol = BF16_TOL if a.dtype == jnp.bfloat16 else F32_TOL
        np.testing.assert_allclose(np.float32(g), np.float32(r), err_msg=name, **tol)


@pytest.mark.parametrize("dtype,ngroups,seqlen,block_rows", [
    (jnp.float32, 1, L, 4), (jnp.bfloat16, 1, L, 4), (jnp.bfloat16, 2, L, 4),
    (jnp.float32, 2, 7, 16),  # seqlen 7: one row per program; taps past both ends read zeros
])
def test_kernel_matches_reference_values_and_gradients(dtype, ngroups, seqlen, block_rows):
    _compare(_args(dtype, ngroups, seed=ngroups, seqlen=seqlen), ngroups, dtype, block_rows)


@pytest.mark.parametrize("min_programs", [1, 20, 10**6])
def test_forward_column_splits_write_every_output(min_programs):
    """The forward's grid target (2 batch rows x 4 row blocks = 8 programs, 6 column tiles and
    2 dt heads): no split (1), 3 splits of 2 tiles (20) and one tile per program (10**6) give
    the reference's values (float32; the dt columns are copies, bit for bit)."""
    args = _args(jnp.float32, 2, seed=3)
    f = functools.partial(fc.bidirectional_conv_pallas, ngroups=2, d_state=N, interpret=True,
                          block_rows=4, min_programs=min_programs)
    want = jax.jit(functools.partial(fc.bidirectional_conv_xla, ngroups=2, d_state=N))(*args)
    got = jax.jit(f)(*args)
    for o, r in zip(got[:3], want[:3]):
        np.testing.assert_allclose(np.asarray(o), np.asarray(r), **F32_FWD_TOL)
    np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(want[3]))


@pytest.mark.parametrize("min_programs", [1, 10**6])
def test_dt_columns_move_in_power_of_two_pieces(min_programs):
    """Six heads (not a power of two): dt_cat and ddt move as column pieces of 4 and 2
    (`_pieces`), unsplit and one piece per split program; dt_cat and the dt gradient are the
    reference's bit for bit (copies and one float32 add), the rest within float32 rounding."""
    assert fc._pieces(6) == [(0, 4), (4, 2)] and fc._pieces(24) == [(0, 16), (16, 8)]
    assert fc._pieces(7) == [(0, 4), (4, 2), (6, 1)] and fc._pieces(8) == [(0, 8)]
    h, c = 6, 6 * P + 2 * N
    k = jax.random.split(jax.random.key(11), 7)
    args = (jax.random.normal(k[0], (B, L, c)), jax.random.normal(k[1], (B, L, h)),
            *(0.5 * jax.random.normal(kk, (K, c)) for kk in k[2:4]),
            *(0.5 * jax.random.normal(kk, (c,)) for kk in k[4:6]))
    kw = dict(ngroups=1, d_state=N)
    cts = tuple(jax.random.normal(kk, s.shape) for kk, s in zip(
        jax.random.split(k[6], 4), jax.eval_shape(functools.partial(
            fc.bidirectional_conv_xla, **kw), *args)))

    def value_and_grads(f):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(cts)

    want = jax.jit(lambda: value_and_grads(functools.partial(fc.bidirectional_conv_xla, **kw)))()
    got = jax.jit(lambda: value_and_grads(functools.partial(
        fc.bidirectional_conv_pallas, **kw, interpret=True, block_rows=4,
        min_programs=min_programs)))()
    np.testing.assert_array_equal(np.asarray(got[0][3]), np.asarray(want[0][3]))  # dt_cat
    np.testing.assert_array_equal(np.asarray(got[1][1]), np.asarray(want[1][1]))  # ddt
    for o, r in zip(got[0][:3], want[0][:3]):
        np.testing.assert_allclose(np.asarray(o), np.asarray(r), **F32_FWD_TOL)
    for name, g, r in zip(NAMES, got[1], want[1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), err_msg=name, **F32_TOL)


def test_bf16_gradients_are_as_close_to_float32_math_as_xla_bf16():
    """The backward stores g in xbc's dtype (bf16 here): every gradient must stay as close to
    the float32 computation of the same bf16 inputs as XLA's bf16 autodiff is (dxbc: ~3e-3 of
    its largest entry for both)."""
    args = _args(jnp.bfloat16, 1)
    cts = _cotangents(args, 1)
    _, ref = _value_and_grads(args, cts, impl="xla", ngroups=1)
    _, got = _value_and_grads(args, cts, impl="pallas", ngroups=1)
    f32 = functools.partial(fc.bidirectional_conv_xla, ngroups=1, d_state=N, dtype=jnp.float32)
    _, vjp = jax.vjp(f32, *(jnp.float32(a) for a in args))
    truth = vjp(tuple(jnp.float32(c) for c in cts))
    for name, g, r, t in zip(NAMES, got, ref, truth):
        t = np.float32(t)
        err = lambda x: np.abs(np.float32(x) - t).max() / np.abs(t).max()  # noqa: E731
        assert err(g) <= 1.1 * err(r) + 1e-6, (name, err(g), err(r))


def _bidi(conv_impl="xla", norm_impl="xla", share=True, dtype=jnp.float32):
    return BidirectionalMamba2(32, share_projections=share, rngs=nnx.Rngs(5), ssd_impl="xla",
                               conv_impl=conv_impl, norm_impl=norm_impl, d_state=N, expand=2,
                               headdim=8, ngroups=2, d_conv=K, chunk_size=4, dtype=dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reference_equals_the_mixer_ssd_inputs(dtype, monkeypatch):
    """The reference's outputs are the x, B, C, dt the XLA mixer hands its one SSD call."""
    seen = []
    real_ssd = mamba2_lib.ssd

    def recording_ssd(x, dt, a, b, c, *args, **kwargs):
        seen.append((x, b, c, dt))
        return real_ssd(x, dt, a, b, c, *args, **kwargs)

    monkeypatch.setattr(mamba2_lib, "ssd", recording_ssd)
    graphdef, state = nnx.split(_bidi(dtype=dtype))

    @jax.jit
    def inputs_and_reference(state, u):
        bidi = nnx.merge(graphdef, state)
        bidi(u)
        f, bk = bidi.fwd, bidi.bwd
        _, xbc, dt = f._split_proj(f.in_proj(u.astype(dtype)))
        ref = fc.bidirectional_conv_xla(xbc, dt, f.conv_weight[...], bk.conv_weight[...],
                                        f.conv_bias[...], bk.conv_bias[...], ngroups=f.ngroups,
                                        d_state=f.d_state, dtype=dtype)
        (inputs,) = seen
        return inputs, ref

    inputs, ref = inputs_and_reference(state, jax.random.normal(jax.random.key(0), (B, L, 32)))
    for got, want in zip(inputs, ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.float32(got), np.float32(want))


def test_mixer_pallas_equals_xla_values_and_gradients():
    """conv_impl="pallas" alone and with norm_impl="pallas" against the all-XLA mixer."""
    check_kernel_knobs(_bidi, "bidir_conv_fwd", "bidir_gated_norm_fwd")


def test_mixer_falls_back_to_xla_without_shared_projections_or_with_seq_idx():
    u = jax.random.normal(jax.random.key(3), (B, L, 32))
    seq_idx = jnp.broadcast_to((jnp.arange(L) >= 9).astype(jnp.int32), (B, L))
    for share, kw in ((False, {}), (True, {"seq_idx": seq_idx})):
        np.testing.assert_array_equal(jitted(_bidi("pallas", share=share))(u, **kw),
                                      jitted(_bidi("xla", share=share))(u, **kw))


@pytest.mark.parametrize("knob", ["conv_impl", "norm_impl"])
def test_dimba_model_kernel_knob_pallas_equals_xla(knob):
    """A DIMBA model with one fused kernel on equals the XLA model (and runs a pallas_call)."""
    c = default_config()
    x_t = jax.random.normal(jax.random.key(4), (B, L, 16))
    tokens = jax.random.randint(jax.random.key(5), (B, L), 0, 20, dtype=jnp.int32)
    logsnr, mask = jnp.zeros((B,)), jnp.zeros((B, L), bool)
    outs = []
    for impl in ("xla", "pallas"):
        with c.unlocked():
            c.model.update(d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=8,
                           time_embed_dim=16, ssd_impl="xla", **{knob: impl})
        model = DimbaModel(c.model, 20, rngs=nnx.Rngs(0))
        jaxpr = str(jax.make_jaxpr(lambda *a: model(*a))(x_t, logsnr, tokens, mask))
        assert ("pallas_call" in jaxpr) == (impl == "pallas")
        outs.append(jitted(model)(x_t, logsnr, tokens, mask))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def _raise(*args, **kwargs):
    raise AssertionError("the fused kernel was called")


@pytest.mark.parametrize("knob", ["conv_impl", "norm_impl"])
def test_dimba_model_kernel_knob_auto_is_xla_off_gpu(knob, monkeypatch):
    """On CPU "auto" is the XLA path (bit for bit; no fused kernel, no interpreter)."""
    monkeypatch.setattr(mamba2_lib, "bidirectional_conv_pallas", _raise)
    monkeypatch.setattr(mamba2_lib, "bidirectional_gated_norm_pallas", _raise)
    assert jax.default_backend() == "cpu"
    c = default_config()
    x_t = jax.random.normal(jax.random.key(4), (B, L, 16))
    tokens = jax.random.randint(jax.random.key(5), (B, L), 0, 20, dtype=jnp.int32)
    logsnr, mask = jnp.zeros((B,)), jnp.zeros((B, L), bool)
    outs = []
    for impl in ("xla", "auto"):
        with c.unlocked():
            c.model.update(d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=8,
                           time_embed_dim=16, ssd_impl="xla", **{knob: impl})
        model = DimbaModel(c.model, 20, rngs=nnx.Rngs(0))
        assert "pallas_call" not in str(jax.make_jaxpr(lambda *a: model(*a))(x_t, logsnr, tokens,
                                                                             mask))
        outs.append(jitted(model)(x_t, logsnr, tokens, mask))
    np.testing.assert_array_equal(outs[1], outs[0])


@pytest.mark.parametrize("backend", ["gpu", "cpu"])
def test_use_fused_truth_table(backend, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    gpu = backend == "gpu"
    for supported in (True, False):
        for shape_supported in (True, False):
            got = {impl: triton_common.use_fused(impl, supported, shape_supported=shape_supported)
                   for impl in triton_common.IMPLS}
            assert got == {"xla": False, "pallas": supported,
                           "auto": gpu and supported and shape_supported}, (supported,
                                                                            shape_supported)
    assert triton_common.use_fused("auto", True) == gpu
    with pytest.raises(ValueError):
        triton_common.use_fused("triton", True)


@pytest.mark.parametrize("share,d_state,headdim,want", [
    (True, N, 8, (1, 1)),  # both kernels take the call and the sizes
    (True, 12, 8, (0, 1)),  # d_state 12: the conv kernel's tiles cannot; the norm's can
    (True, N, 12, (0, 0)),  # headdim 12: neither kernel
    (False, N, 8, (0, 0)),  # separate projections: neither
])
def test_mixer_auto_on_gpu_uses_each_kernel_where_it_applies(share, d_state, headdim, want,
                                                             monkeypatch):
    """With the backend reported as "gpu" (traced only, no GPU needed), "auto" routes each knob
    through use_fused with its kernel's size constraints, differentiated or not (sampling runs
    the forward kernels); with seq_idx neither kernel runs."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    bidi = BidirectionalMamba2(24, share_projections=share, rngs=nnx.Rngs(5), ssd_impl="xla",
                               d_state=d_state, expand=2, headdim=headdim, d_conv=K,
                               chunk_size=4)
    assert (bidi.fwd.conv_impl, bidi.fwd.norm_impl) == ("auto", "auto")
    u0 = jnp.zeros((B, L, 24))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda u: jnp.sum(bidi(u) ** 2)))(u0))
    assert (jaxpr.count("name=bidir_conv_fwd"), jaxpr.count("name=bidir_gated_norm_fwd")) == want
    jaxpr = str(jax.make_jaxpr(lambda u: bidi(u))(u0))
    assert (jaxpr.count("name=bidir_conv_fwd"), jaxpr.count("name=bidir_gated_norm_fwd")) == want
    seq_idx = jnp.zeros((B, L), jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda u: bidi(u, seq_idx=seq_idx))(jnp.zeros((B, L, 24))))
    assert "pallas_call" not in jaxpr


def test_config_without_the_keys_builds_the_default():
    c = default_config()
    with c.unlocked():
        c.model.update(d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=8,
                       time_embed_dim=16, ssd_impl="xla")
        del c.model["conv_impl"]
        del c.model["norm_impl"]
    model = DimbaModel(c.model, 20, rngs=nnx.Rngs(0))
    for m in (model.blocks[0].mixer.fwd, model.blocks[0].mixer.bwd):
        assert (m.conv_impl, m.norm_impl) == ("auto", "auto")


@pytest.mark.parametrize("knob", ["conv_impl", "norm_impl"])
def test_unknown_kernel_knob_raises(knob):
    want = r"^model\.%s must be one of \('auto', 'xla', 'pallas'\), got 'triton'$" % knob
    for cls in (Mamba2, BidirectionalMamba2):
        with pytest.raises(ValueError, match=want):
            cls(16, headdim=8, rngs=nnx.Rngs(0), **{knob: "triton"})
    assert default_config().model[knob] == "auto"
    assert triton_common.IMPLS == ("auto", "xla", "pallas")


def test_throughput_variants_parse():
    from benchmarks.train_throughput import parse_variant
    from dimba_jax.train.overrides import apply_overrides

    for text, want in (("xla:model.conv_impl=xla,model.norm_impl=xla", ("xla", "xla")),
                       ("fusedconv:model.conv_impl=pallas,model.norm_impl=xla", ("pallas", "xla")),
                       ("both:model.conv_impl=pallas,model.norm_impl=pallas",
                        ("pallas", "pallas"))):
        _, pairs = parse_variant(text)
        m = apply_overrides(default_config(), pairs).model
        assert (m.conv_impl, m.norm_impl) == want


@pytest.mark.parametrize("bwd", [{}, dict(block_rows_bwd=64, step_rows_bwd=8, sums_bwd="tile",
                                          min_programs_bwd=1024)])
def test_kernels_lower_to_triton_for_cuda(bwd):
    """The forward and both backward kernels lower through the Pallas Triton
    backend (no GPU needed), at the base config's widths (24 heads of 64, one group of d_state
    128), with the default backward tiles and with the tile sums over column splits."""
    from dimba_jax.ssd.hopper import cuda_lowering_context

    c = 24 * 64 + 2 * 128
    shapes = (jax.ShapeDtypeStruct((2, 64, c), jnp.bfloat16),
              jax.ShapeDtypeStruct((2, 64, 24), jnp.bfloat16),
              *(jax.ShapeDtypeStruct(s, jnp.float32) for s in ((K, c), (K, c), (c,), (c,))))

    def f(*args):
        out, vjp = jax.vjp(functools.partial(fc.bidirectional_conv_pallas, ngroups=1,
                                             d_state=128, **bwd), *args)
        return out, vjp(tuple(jnp.ones_like(o) for o in out))

    with cuda_lowering_context():
        text = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_compiled_kernels_match_reference_on_gpu(dtype):
    args = _args(dtype, 2, seed=4)
    tol = BF16_TOL if dtype == jnp.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    cts = _cotangents(args, 2, seed=9)

    def run(f):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(cts)

    ref, ref_grads = jax.jit(lambda: run(functools.partial(
        fc.bidirectional_conv_xla, ngroups=2, d_state=N)))()
    out, grads = jax.jit(lambda: run(functools.partial(
        fc.bidirectional_conv_pallas, ngroups=2, d_state=N, block_rows=4)))()
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype
        np.testing.assert_allclose(np.float32(o), np.float32(r), **tol)
    for name, g, r in zip(NAMES, grads, ref_grads):
        np.testing.assert_allclose(np.float32(g), np.float32(r), err_msg=name, **tol)
