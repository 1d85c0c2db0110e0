"""The fused kernels with one direction, the causal Mamba2 mixer's prologue and epilogue
(layers/fused_conv.py `causal_conv_pallas`, layers/fused_norm.py `gated_norm_pallas`): the
kernels in the Pallas interpreter vs their jnp references (values and every gradient), the
causal mixer with the knobs on "pallas" vs "xla", where "auto" runs them (traced with the
backend reported as "gpu"), their Triton lowering for CUDA, and (marked gpu) the compiled
kernels against the references.

Tolerances as in test_fused_conv / test_fused_norm: bf16 forward values bit for bit (the same
float32 math, one rounding), float32 values and gradients to summation order, bf16 gradients
to ~1 ulp.
"""

import functools
import inspect

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _nnx_jit import check_kernel_knobs, jitted
from dimba_jax.layers import fused_conv as fc
from dimba_jax.layers import fused_norm as fn
from dimba_jax.layers.mamba2 import Mamba2

B, L, H, P, N, K = 2, 16, 2, 8, 8, 4
F32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=2e-2, atol=4e-2)


def _tiles(f, **kw):
    """Tile arguments for the fused function f: each given forward tile also set for the
    backward (f's own backward defaults may differ), only the arguments f takes."""
    params = inspect.signature(f).parameters
    out = {**{k + "_bwd": v for k, v in kw.items()}, **kw}
    return {k: v for k, v in out.items() if k in params}


def _conv_args(dtype, ngroups, seed=0, seqlen=L):
    c = H * P + 2 * ngroups * N
    k = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(k[0], (B, seqlen, c)).astype(dtype),
            jax.random.normal(k[1], (B, seqlen, H)).astype(dtype),
            0.5 * jax.random.normal(k[2], (K, c)), 0.5 * jax.random.normal(k[3], (c,)))


def _norm_args(dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], (B, L, H, P)).astype(dtype),
            jax.random.normal(k[1], (B, L, H * P)).astype(dtype),
            1.0 + 0.3 * jax.random.normal(k[2], (H * P,)))


def _cotangents(f, args, seed=7):
    shapes = jax.eval_shape(f, *args)
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, s.shape).astype(s.dtype)
                                     for k, s in zip(keys, leaves)])


def _conv_case(nd, seqlen=L, seed=5):
    """(the nd-direction conv kernels' function, interpreted; its float32 arguments, the
    backward direction with weights and bias of its own)."""
    args = _conv_args(jnp.float32, 2, seed=seed, seqlen=seqlen)
    if nd == 1:
        return functools.partial(fc.causal_conv_pallas, ngroups=2, d_state=N, interpret=True), args
    k = jax.random.split(jax.random.key(12), 2)
    args = args[:3] + (0.5 * jax.random.normal(k[0], args[2].shape), args[3],
                       0.5 * jax.random.normal(k[1], args[3].shape))
    return (functools.partial(fc.bidirectional_conv_pallas, ngroups=2, d_state=N, interpret=True),
            args)


def _assert_same_values_and_gradients(f, g, args):
    """g's values equal f's bit for bit and its gradients to float32 summation order."""
    cts = _cotangents(f, args)
    want, want_grads = _value_and_grads(f, args, cts)
    got, grads = _value_and_grads(g, args, cts)
    for o, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(o), np.asarray(r))
    for a, b in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **F32_TOL)


def _value_and_grads(f, args, cts):
    """f's values and the gradients of <f, cts> w.r.t. args, forward and backward jitted."""
    def run(args, cts):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(cts)

    return jax.jit(run)(args, cts)


def _check_close(ref_f, pallas_f, args, tol):
    """pallas_f's values and gradients against ref_f's within `tol` (compiled kernels)."""
    cts = _cotangents(ref_f, args, seed=9)
    want, want_grads = _value_and_grads(ref_f, args, cts)
    got, grads = _value_and_grads(pallas_f, args, cts)
    for o, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.float32(o), np.float32(r), **tol)
    for g, r in zip(grads, want_grads):
        np.testing.assert_allclose(np.float32(g), np.float32(r), **tol)


def _check(ref_f, pallas_f, args, names):
    cts = _cotangents(ref_f, args)
    ref, ref_grads = _value_and_grads(ref_f, args, cts)
    out, grads = _value_and_grads(pallas_f, args, cts)
    for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        assert o.dtype == r.dtype and o.shape == r.shape
        if o.dtype == jnp.bfloat16:
            np.testing.assert_array_equal(np.float32(o), np.float32(r))
        else:  # the norm's mean of squares sums in another order
            np.testing.assert_allclose(o, r, **F32_TOL)
    for name, g, r, a in zip(names, grads, ref_grads, args):
        assert g.dtype == a.dtype and g.shape == a.shape, name
        tol = BF16_TOL if a.dtype == jnp.bfloat16 else F32_TOL
        np.testing.assert_allclose(np.float32(g), np.float32(r), err_msg=name, **tol)


@pytest.mark.parametrize("dtype,ngroups,seqlen,block_rows", [
    (jnp.float32, 1, L, 4), (jnp.bfloat16, 2, L, 4),
    (jnp.float32, 2, 7, 16),  # seqlen 7: one row per program; taps before row 0 read zeros
])
def test_causal_conv_kernel_matches_reference(dtype, ngroups, seqlen, block_rows):
    args = _conv_args(dtype, ngroups, seed=ngroups, seqlen=seqlen)
    ref = functools.partial(fc.causal_conv_xla, ngroups=ngroups, d_state=N)
    pallas = functools.partial(fc.causal_conv_pallas, ngroups=ngroups, d_state=N,
                               interpret=True, block_rows=block_rows, block_rows_bwd=block_rows)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: sum(jnp.sum(o.astype(jnp.float32) ** 2)
                                                       for o in pallas(*a))))(*args))
    assert [jaxpr.count(f"name={k}") for k in ("conv_fwd", "conv_bwd_g", "conv_bwd_dx")] == [1, 1, 1]
    assert "bidir" not in jaxpr
    _check(ref, pallas, args, ("xbc", "dt", "w", "bias"))


def test_causal_conv_reference_is_the_mixer_xla_prologue():
    """causal_conv_xla = Mamba2's XLA conv + split, and dt in float32."""
    mixer = Mamba2(32, rngs=nnx.Rngs(1), ssd_impl="xla", d_state=N, headdim=8, ngroups=2,
                   d_conv=K, chunk_size=4)
    k = jax.random.split(jax.random.key(2), 2)
    xbc = jax.random.normal(k[0], (B, L, mixer.conv_dim))
    dt = jax.random.normal(k[1], (B, L, mixer.nheads)).astype(jnp.bfloat16)
    want = mixer._split_xbc(mixer._conv(xbc, None))
    got = fc.causal_conv_xla(xbc, dt, mixer.conv_weight[...], mixer.conv_bias[...], ngroups=2,
                             d_state=N)
    for g, w in zip(got[:3], want[:3]):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(dt, np.float32))


@pytest.mark.parametrize("dtype,ngroups", [(jnp.float32, 1), (jnp.bfloat16, 2)])
def test_gated_norm_kernel_matches_reference(dtype, ngroups):
    args = _norm_args(dtype, seed=ngroups)
    ref = functools.partial(fn.gated_norm_xla, ngroups=ngroups)
    pallas = functools.partial(fn.gated_norm_pallas, ngroups=ngroups, interpret=True,
                               block_rows=4)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(pallas(*a).astype(jnp.float32) ** 2),
                                        argnums=(0, 1, 2)))(*args))
    assert [jaxpr.count(f"name={k}") for k in ("gated_norm_fwd", "gated_norm_bwd")] == [1, 1]
    assert "bidir" not in jaxpr
    _check(ref, pallas, args, ("y", "z", "w"))


@pytest.mark.parametrize("ngroups", [1, 2])
def test_gated_norm_backward_from_the_output_keeps_the_gradients(ngroups):
    """The causal backward's first pass reads (dout, out) (`bwd_call`'s out): against the same
    kernel reading (y, z, dout), float32, 4-column tiles (2 or 4 per group): the weight's
    gradient bit for bit (the same sums, moved to the second pass), dy and dz to float32
    summation order; the custom VJP takes that path (its backward kernel reads one more
    operand than the plain one)."""
    y, z, w = _norm_args(jnp.float32, seed=5 + ngroups)
    pallas = functools.partial(fn.gated_norm_pallas, ngroups=ngroups, interpret=True,
                               block_rows=4, block_cols=4, block_cols_bwd=4, min_programs=1)
    cfg = fn._config(y, ngroups, 1e-5, None, True, dict(
        block_rows=4, num_warps=4, block_rows_bwd=4, num_warps_bwd=None, num_stages=2,
        num_stages_bwd=1, block_cols=4, block_cols_bwd=4, min_programs=1, passes=1,
        passes_bwd=2))
    out, rstd = fn.fwd_call(y, z, (w,), cfg)
    dout = jax.random.normal(jax.random.key(3), out.shape)
    plain = fn.bwd_call(y, z, (w,), rstd, dout, cfg)
    from_out = fn.bwd_call(y, z, (w,), rstd, dout, cfg, out=out)
    np.testing.assert_array_equal(np.asarray(from_out[2]), np.asarray(plain[2]))
    for g, r in zip(from_out[:2], plain[:2]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)
    jaxpr = jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(pallas(*a) ** 2), argnums=(0, 1, 2)))(
        y, z, w)
    calls = {}

    def walk(jp):
        for e in jp.eqns:
            if e.primitive.name == "pallas_call":
                calls[str(e.params.get("name_and_src_info", e.params.get("name"))).split()[0]] = (
                    len(e.invars))
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert calls == {"gated_norm_fwd": 3, "gated_norm_bwd": 6}, calls


def test_gated_norm_rejects_bad_shapes():
    y, z, w = _norm_args(jnp.float32)
    with pytest.raises(ValueError, match=r"^z_offset 0 \+ d_inner 16 must fit z's columns"):
        fn.gated_norm_pallas(y, z[..., :-1], w, interpret=True)
    with pytest.raises(ValueError, match=r"^expected y \(batch, L, nheads, headdim\)"):
        fn.gated_norm_pallas(y, z, w[:-1], interpret=True)
    with pytest.raises(ValueError, match=r"^nheads 2 must be divisible by ngroups 3$"):
        fn.gated_norm_pallas(y, z, w, ngroups=3, interpret=True)


def _causal(conv_impl="xla", norm_impl="xla", d_state=N, headdim=8):
    return Mamba2(32, rngs=nnx.Rngs(6), ssd_impl="xla", conv_impl=conv_impl,
                  norm_impl=norm_impl, d_state=d_state, expand=2, headdim=headdim, ngroups=2,
                  d_conv=K, chunk_size=4)


def test_causal_mixer_pallas_equals_xla_values_and_gradients():
    check_kernel_knobs(_causal, "conv_fwd", "gated_norm_fwd")


def test_causal_mixer_with_seq_idx_takes_the_xla_conv():
    u = jax.random.normal(jax.random.key(3), (B, L, 32))
    seq_idx = jnp.broadcast_to((jnp.arange(L) >= 9).astype(jnp.int32), (B, L))
    np.testing.assert_array_equal(jitted(_causal("pallas"))(u, seq_idx=seq_idx),
                                  jitted(_causal("xla"))(u, seq_idx=seq_idx))


@pytest.mark.parametrize("d_state,headdim", [(N, 8), (12, 8), (N, 12)])
def test_causal_mixer_on_gpu_uses_each_kernel_where_it_applies(d_state, headdim, monkeypatch):
    """Backend reported as "gpu" (traced only): "pallas" and "auto" run both kernels under
    differentiation and without it (no conv kernel with seq_idx); where a size does not fit
    "pallas" raises and "auto" runs XLA."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

    def mixer(impl):
        return Mamba2(24, rngs=nnx.Rngs(5), ssd_impl="xla", d_state=d_state, expand=2,
                      headdim=headdim, d_conv=K, chunk_size=4, conv_impl=impl, norm_impl=impl)

    u0 = jnp.zeros((B, L, 24))
    seq_idx = jnp.zeros((B, L), jnp.int32)

    def counts(m, **kw):
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda u: jnp.sum(m(u, **kw) ** 2)))(u0))
        return jaxpr.count("name=conv_fwd"), jaxpr.count("name=gated_norm_fwd")

    auto = mixer("auto")
    fwd_only = str(jax.make_jaxpr(auto)(u0))
    assert (fwd_only.count("name=conv_fwd"), fwd_only.count("name=gated_norm_fwd")) == (
        int(d_state == N and headdim == 8), int(headdim == 8))
    if d_state == N and headdim == 8:
        for m in (mixer("pallas"), auto):
            assert counts(m) == (1, 1)
            assert counts(m, seq_idx=seq_idx) == (0, 1)
    else:
        assert counts(auto) == (0, int(headdim == 8))
        with pytest.raises(ValueError):
            mixer("pallas")(u0)


def test_causal_kernels_lower_to_triton_for_cuda():
    """Forward and backward of both one-direction kernels lower through the Pallas Triton
    backend (no GPU needed) at configs/ar_base.py's mixer widths (24 heads of 64, one group of
    d_state 128)."""
    from dimba_jax.ssd.hopper import cuda_lowering_context

    c, d = 24 * 64 + 2 * 128, 24 * 64
    conv_shapes = (jax.ShapeDtypeStruct((2, 64, c), jnp.bfloat16),
                   jax.ShapeDtypeStruct((2, 64, 24), jnp.bfloat16),
                   jax.ShapeDtypeStruct((K, c), jnp.float32), jax.ShapeDtypeStruct((c,), jnp.float32))
    norm_shapes = (jax.ShapeDtypeStruct((2, 64, 24, 64), jnp.bfloat16),
                   jax.ShapeDtypeStruct((2, 64, d), jnp.bfloat16),
                   jax.ShapeDtypeStruct((d,), jnp.float32))

    def both(conv_args, norm_args):
        out, vjp = jax.vjp(functools.partial(fc.causal_conv_pallas, ngroups=1, d_state=128),
                           *conv_args)
        n, nvjp = jax.vjp(fn.gated_norm_pallas, *norm_args)
        return out, n, vjp(tuple(jnp.ones_like(o) for o in out)), nvjp(jnp.ones_like(n))

    with cuda_lowering_context():
        text = jax.jit(both).trace(conv_shapes, norm_shapes).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_compiled_causal_kernels_match_reference_on_gpu(dtype):
    tol = BF16_TOL if dtype == jnp.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for ref, pallas, args in (
            (functools.partial(fc.causal_conv_xla, ngroups=2, d_state=N),
             functools.partial(fc.causal_conv_pallas, ngroups=2, d_state=N, block_rows=4),
             _conv_args(dtype, 2, seed=4)),
            (functools.partial(fn.gated_norm_xla, ngroups=2),
             functools.partial(fn.gated_norm_pallas, ngroups=2, block_rows=4),
             _norm_args(dtype, seed=4))):
        _check_close(ref, pallas, args, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("nd", [1, 2])
def test_compiled_backward_tile_sums_match_the_plain_backward_on_gpu(nd):
    """The compiled kernels with the backward's tile sums and column splits (float32): the
    plain backward's gradients to float32 summation order."""
    f, args = _conv_case(nd, seqlen=64)
    f = functools.partial(f.func, **{**f.keywords, "interpret": False})
    plain = functools.partial(f, block_rows=4, block_rows_bwd=4, step_rows_bwd=0)
    tiled = functools.partial(f, block_rows=4, block_rows_bwd=32, step_rows_bwd=8,
                              sums_bwd="tile", min_programs_bwd=10**6)
    cts = _cotangents(plain, args)
    (_, want), (_, got) = (_value_and_grads(g, args, cts) for g in (plain, tiled))
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("cols", [32])  # narrowed to 16 in each region: tiles of two heads
def test_wider_column_tiles_compute_the_same(nd, cols):
    """block_cols wider than headdim / d_state (tiles spanning heads and groups; the kernels
    narrow it to each region) and num_stages (a compile parameter) give the values of the
    natural tiling (the conv bit for bit; the norm's sums of squares add in another order) and
    its gradients to float32 summation order."""
    plain = _plain_conv(nd)[0]
    _assert_same_as_plain_conv(nd, functools.partial(plain, **_tiles(
        plain.func, block_rows=4, block_cols=cols, num_stages=2, step_rows=0)))
    norm_args = _norm_args(jnp.float32, seed=3)
    if nd == 2:
        y, z, w = norm_args
        norm_args = (jnp.concatenate([y, y[:, ::-1]], axis=2), z, w,
                     1.0 + 0.3 * jax.random.normal(jax.random.key(11), w.shape))
        norm_fn = fn.bidirectional_gated_norm_pallas
    else:
        norm_fn = fn.gated_norm_pallas
    f = functools.partial(norm_fn, ngroups=1)
    natural = functools.partial(f, interpret=True, **_tiles(
        f, block_rows=4, block_cols=0, num_stages=1, step_rows=0))
    wide = functools.partial(f, interpret=True, **_tiles(
        f, block_rows=4, block_cols=cols, num_stages=2, step_rows=0))
    cts = _cotangents(natural, norm_args)
    want, want_grads = _value_and_grads(natural, norm_args, cts)
    got, grads = _value_and_grads(wide, norm_args, cts)
    for o, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), **F32_TOL)


@functools.cache
def _plain_conv(nd):
    """The nd-direction conv kernels at the natural tiling (4 rows, one step, no column
    splits, sums per step) on `_conv_case(nd)`'s arguments: (function, arguments, cotangents,
    values, gradients), computed once per nd for the tests that compare tilings against it."""
    f, args = _conv_case(nd)
    plain = functools.partial(f, **_tiles(f, block_rows=4, block_cols=0, num_stages=1,
                                          step_rows=0))
    cts = _cotangents(plain, args)
    return (plain, args, cts, *_value_and_grads(plain, args, cts))


def _assert_same_as_plain_conv(nd, f):
    """f (nd-direction conv kernels) against `_plain_conv(nd)`: its values bit for bit and its
    gradients to float32 summation order."""
    _, args, cts, want, want_grads = _plain_conv(nd)
    got, grads = _value_and_grads(f, args, cts)
    for o, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(o), np.asarray(r))
    for a, b in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **F32_TOL)


# each tile configuration once and each direction count (one kernel code, parametrized by nd)
@pytest.mark.parametrize("nd,rows,step,programs", [
    (1, 16, 4, 10**6), (1, 8, 2, 1), (2, 16, 16, 3)])
def test_backward_tile_sums_and_column_splits_compute_the_same(nd, rows, step, programs):
    """The backward's weight sums elementwise over row steps (sums_bwd "tile") and its column
    tiles split over a third grid axis (min_programs_bwd: one tile per program at 10**6, none
    at 1, two splits at 3) give the gradients of the plain backward (4 rows, one step, sums
    per step) to float32 summation order, and the same forward values."""
    plain = _plain_conv(nd)[0]
    _assert_same_as_plain_conv(nd, functools.partial(
        plain, block_rows_bwd=rows, step_rows_bwd=step, sums_bwd="tile",
        min_programs_bwd=programs))


def test_tile_arguments_are_checked():
    from dimba_jax.layers import triton_common as tc

    assert tc.tile_width(1536, 64, 0) == 64 and tc.tile_width(1536, 64, 256) == 256
    assert tc.tile_width(1536, 64, 1024) == 512 and tc.tile_width(128, 128, 512) == 128
    fwd, bwd = tc.kernel_tiles(1024, 16, 4, 8, None, num_stages=2, block_cols=256)
    assert fwd == tc.Tiles(16, 4, 2, 256, programs=1024) and bwd == tc.Tiles(8, 4, 2, 256)
    with pytest.raises(ValueError, match=r"^num_stages must be >= 1"):
        tc.kernel_tiles(64, 16, 4, None, None, num_stages=0)
    with pytest.raises(ValueError, match=r"^min_programs must be >= 1, got 0$"):
        tc.kernel_tiles(64, 16, 4, None, None, min_programs=0)
    with pytest.raises(ValueError, match=r"^min_programs_bwd must be >= 1, got 0$"):
        tc.kernel_tiles(64, 16, 4, None, None, min_programs_bwd=0)
    with pytest.raises(ValueError, match=r"^sums_bwd must be one of"):
        tc.kernel_tiles(64, 16, 4, None, None, sums_bwd="row")
    assert tc.kernel_tiles(64, 16, 4, 32, 8, step_rows_bwd=4, min_programs_bwd=512,
                           sums_bwd="tile")[1] == tc.Tiles(32, 8, 1, 0, 4, 512, "tile")
    # the grid targets at a small batch: configs/base.py's conv at batch 1 (64 row blocks of
    # 16, 26 column tiles) takes one tile per program; batch 16 is untouched
    assert tc.split_count(1024, 64, 26) == 26 and tc.split_count(1024, 1024, 26) == 1
    assert tc.split_count(20, 8, 6) == 3 and tc.split_count(10**6, 8, 1) == 1
    assert tc.narrower_rows(fwd, 16, 1024) == fwd
    assert tc.narrower_rows(fwd, 1, 1024) == fwd._replace(rows=1, cols=4096)
    assert tc.narrower_rows(fwd._replace(cols=0, step=8), 2, 1024).rows == 2
    with pytest.raises(ValueError, match=r"^block_cols must be 0 or a power of two"):
        fc.causal_conv_pallas(*_conv_args(jnp.float32, 1), ngroups=1, d_state=N, interpret=True,
                              block_cols=24)


@pytest.mark.parametrize("nd", [1, 2])
def test_wide_pipelined_tiles_lower_to_triton_for_cuda(nd):
    """256-column tiles (4 heads of 64; B and C narrowed to d_state 128) with 3 pipeline
    stages lower through the Pallas Triton backend at configs/base.py's widths."""
    from dimba_jax.ssd.hopper import cuda_lowering_context

    c, d = 24 * 64 + 2 * 128, 24 * 64
    f32 = jnp.float32
    conv_shapes = (jax.ShapeDtypeStruct((2, 64, c), jnp.bfloat16),
                   jax.ShapeDtypeStruct((2, 64, 24), jnp.bfloat16),
                   *[jax.ShapeDtypeStruct((K, c), f32)] * nd, *[jax.ShapeDtypeStruct((c,), f32)] * nd)
    norm_shapes = (jax.ShapeDtypeStruct((2, 64, 24 * nd, 64), jnp.bfloat16),
                   jax.ShapeDtypeStruct((2, 64, d), jnp.bfloat16), *[jax.ShapeDtypeStruct((d,), f32)] * nd)
    conv = fc.bidirectional_conv_pallas if nd == 2 else fc.causal_conv_pallas
    norm = fn.bidirectional_gated_norm_pallas if nd == 2 else fn.gated_norm_pallas

    def both(conv_args, norm_args):
        out, vjp = jax.vjp(functools.partial(conv, ngroups=1, d_state=128, **_tiles(
            conv, block_cols=256, num_stages=3)), *conv_args)
        n, nvjp = jax.vjp(functools.partial(norm, **_tiles(norm, block_cols=256, num_stages=3)),
                          *norm_args)
        return out, n, vjp(tuple(jnp.ones_like(o) for o in out)), nvjp(jnp.ones_like(n))

    with cuda_lowering_context():
        text = jax.jit(both).trace(conv_shapes, norm_shapes).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 5


@pytest.mark.parametrize("nd", [1, 2])
def test_row_steps_compute_the_same(nd):
    """Programs of 16 rows walked in steps of 4 (weights loaded once per column tile, the
    weight gradients summed over the steps in registers) give the one-step kernels' values bit
    for bit and their gradients to float32 summation order, at a length with two programs."""
    f, args = _conv_case(nd, seqlen=32)
    one = functools.partial(f, **_tiles(f, block_rows=16, block_cols=0, num_stages=1,
                                        step_rows=0))
    stepped = functools.partial(f, **_tiles(f, block_rows=16, block_cols=0, num_stages=1,
                                            step_rows=4))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: sum(jnp.sum(o ** 2) for o in stepped(*a))))(*args))
    assert jaxpr.count("pallas_call") == 3
    _assert_same_values_and_gradients(one, stepped, args)
    with pytest.raises(ValueError, match=r"^step_rows must be 0 or a power of two"):
        f(*args, step_rows=3)


@pytest.mark.parametrize("knob", ["conv_impl", "norm_impl"])
def test_ar_model_takes_the_kernel_knobs_from_the_config(knob):
    """config.model.conv_impl / norm_impl reach the AR baseline's mixers: "pallas" runs the
    one-direction kernel under differentiation and gives the "xla" model's loss; "auto" is XLA
    on the CPU."""
    from dimba_jax.config import default_config
    from dimba_jax.models.ar import lm_from_config

    ids = jax.random.randint(jax.random.key(3), (B, L), 0, 40, dtype=jnp.int32)
    losses = {}
    for impl in ("xla", "pallas", "auto"):
        c = default_config()
        c.model.update(d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=8,
                       ssd_impl="xla", **{knob: impl})
        model = lm_from_config(c.model, 40, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model, nnx.Param)

        def loss(state, graphdef=graphdef):
            return jnp.mean(nnx.merge(graphdef, state)(ids) ** 2)

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(state))
        assert ("pallas_call" in jaxpr) == (impl == "pallas"), impl
        losses[impl] = float(jax.jit(loss)(state))
    assert losses["auto"] == losses["xla"]
    assert losses["pallas"] == pytest.approx(losses["xla"], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("nd", [1, 2])
def test_compiled_tile_options_match_reference_on_gpu(nd):
    """Compiled with pipeline stages, 256-column tiles and 4-row steps of 16-row programs (the
    options fused_bench sweeps), the kernels still match their references, at headdim 64 and
    d_state 128 (so the tiles span several heads)."""
    kw = dict(block_rows=16, num_stages=2, block_cols=256, step_rows=4)
    k = jax.random.split(jax.random.key(8), 8)
    c, d, bf16 = 8 * 64 + 2 * 128, 8 * 64, jnp.bfloat16
    ws = [0.5 * jax.random.normal(k[2 + h], (K, c)) for h in range(nd)]
    bs = [0.1 * jax.random.normal(k[4 + h], (c,)) for h in range(nd)]
    conv_args = (jax.random.normal(k[0], (2, 64, c), bf16),
                 jax.random.normal(k[1], (2, 64, 8), bf16), *ws, *bs)
    norm_args = (jax.random.normal(k[6], (2, 64, 8 * nd, 64), bf16),
                 jax.random.normal(k[7], (2, 64, d), bf16),
                 *[1.0 + 0.1 * jax.random.normal(k[2 + h], (d,)) for h in range(nd)])
    if nd == 2:
        cases = ((functools.partial(fc.bidirectional_conv_xla, ngroups=1, d_state=128),
                  functools.partial(fc.bidirectional_conv_pallas, ngroups=1, d_state=128,
                                    **_tiles(fc.bidirectional_conv_pallas, **kw)),
                  conv_args),
                 (fn.bidirectional_gated_norm_xla,
                  functools.partial(fn.bidirectional_gated_norm_pallas,
                                    **_tiles(fn.bidirectional_gated_norm_pallas, **kw)), norm_args))
    else:
        cases = ((functools.partial(fc.causal_conv_xla, ngroups=1, d_state=128),
                  functools.partial(fc.causal_conv_pallas, ngroups=1, d_state=128,
                                    **_tiles(fc.causal_conv_pallas, **kw)),
                  conv_args),
                 (functools.partial(fn.gated_norm_xla, ngroups=1),
                  functools.partial(fn.gated_norm_pallas, **_tiles(fn.gated_norm_pallas, **kw)),
                  norm_args))
    for ref, pallas, args in cases:
        _check_close(ref, pallas, args, BF16_TOL)


def _check_packed(nd, interpret):
    """The kernels reading xBC, dt and the gate straight from the projection's output
    [z | xBC | dt] (column offsets, no slice copies) give the values of the kernels fed the
    slices, and the projection output's gradient is the slices' gradients in their columns."""
    d, c = H * P, H * P + 2 * 2 * N
    width = d + c + H
    k = jax.random.split(jax.random.key(21), 8)
    zx = jax.random.normal(k[0], (B, L, width))
    ws = tuple(0.5 * jax.random.normal(k[1 + h], (K, c)) for h in range(nd))
    bs = tuple(0.1 * jax.random.normal(k[3 + h], (c,)) for h in range(nd))
    nws = tuple(1.0 + 0.3 * jax.random.normal(k[5 + h], (d,)) for h in range(nd))
    y = jax.random.normal(k[7], (B, L, nd * H, P))
    conv = fc.bidirectional_conv_pallas if nd == 2 else fc.causal_conv_pallas
    norm = fn.bidirectional_gated_norm_pallas if nd == 2 else fn.gated_norm_pallas
    kw = dict(ngroups=2, d_state=N, interpret=interpret, block_rows=4, block_rows_bwd=4)

    def packed(zx):
        outs = conv(zx, zx, *ws, *bs, **kw, xbc_offset=d, dt_offset=d + c, nheads=H)
        return outs, norm(y, zx, *nws, ngroups=1, interpret=interpret, block_rows=4)

    def sliced(zx):
        outs = conv(zx[..., d:d + c], zx[..., d + c:], *ws, *bs, **kw)
        return outs, norm(y, zx[..., :d], *nws, ngroups=1, interpret=interpret, block_rows=4)

    cts = _cotangents(sliced, (zx,))
    want, want_grad = _value_and_grads(sliced, (zx,), cts)
    got, grad = _value_and_grads(packed, (zx,), cts)
    for o, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(o), np.asarray(r))
    np.testing.assert_allclose(np.asarray(grad[0]), np.asarray(want_grad[0]), **F32_TOL)
    with pytest.raises(ValueError, match=r"^xbc_offset 20 \+ conv_dim 48 must fit"):
        conv(zx, zx, *ws, *bs, **kw, xbc_offset=d + 4, dt_offset=d + c, nheads=H)


@pytest.mark.parametrize("nd", [1, 2])
def test_packed_projection_output_equals_its_slices(nd):
    _check_packed(nd, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("nd", [1, 2])
def test_compiled_packed_kernels_equal_their_slices_on_gpu(nd):
    _check_packed(nd, interpret=False)


@pytest.mark.parametrize("nd", [1, 2])
def test_packed_kernels_lower_to_triton_for_cuda(nd):
    """With the projection's whole output as input (configs/base.py widths: [z 1536 | xBC
    1792 | dt 24]) the kernels lower through the Pallas Triton backend."""
    from dimba_jax.ssd.hopper import cuda_lowering_context

    d, c = 24 * 64, 24 * 64 + 2 * 128
    f32 = jnp.float32
    zx = jax.ShapeDtypeStruct((2, 64, d + c + 24), jnp.bfloat16)
    ws = [jax.ShapeDtypeStruct((K, c), f32)] * nd + [jax.ShapeDtypeStruct((c,), f32)] * nd
    y = jax.ShapeDtypeStruct((2, 64, 24 * nd, 64), jnp.bfloat16)
    nws = [jax.ShapeDtypeStruct((d,), f32)] * nd
    conv = fc.bidirectional_conv_pallas if nd == 2 else fc.causal_conv_pallas
    norm = fn.bidirectional_gated_norm_pallas if nd == 2 else fn.gated_norm_pallas

    def both(zx, ws, y, nws):
        out, vjp = jax.vjp(lambda a: conv(a, a, *ws, ngroups=1, d_state=128, xbc_offset=d,
                                          dt_offset=d + c, nheads=24), zx)
        n, nvjp = jax.vjp(lambda a: norm(y, a, *nws), zx)
        return out, n, vjp(tuple(jnp.ones_like(o) for o in out)), nvjp(jnp.ones_like(n))

    with cuda_lowering_context():
        text = jax.jit(both).trace(zx, ws, y, nws).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 5
