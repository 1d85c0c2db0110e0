"""Tests of the Mosaic GPU SSD chunk-backward kernel (`dimba_jax/ssd/pallas_mosaic_bwd.py`).

CPU: `supported_bwd` reasons and ValueErrors; the kernel in the Mosaic GPU interpreter vs
pallas_gpu's Triton kernel in the Triton interpreter (same inputs) and vs an independent float64
NumPy computation of the per-chunk formulas; lowering for cuda without a GPU (Mosaic GPU's layout
inference and wgmma checks run there), both lowering semantics.
End to end in the interpreters: the full SSD gradient with the Mosaic kernel swapped in for
pallas_gpu's `_chunk_bwd_call` (monkeypatched in the test only) vs the sequential reference,
and at chunk 128 with two warpgroups against one (in a subprocess with 8 host devices).
GPU (`gpu` marker): the compiled kernel vs the compiled Triton kernel, bf16 and f16; two
warpgroups against one, kernel and full gradient.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dimba_jax.ssd import KernelConfig, hopper, pallas_gpu, pallas_mosaic, pallas_mosaic_bwd, ssd
from _ssd_testing import check_kernel_knob, plain_ssd_args, rel_error as _rel, ssd_args

NAMES = ("dx", "db", "dc", "ddt", "ds", "dd")


def _inputs(seed, bsz, nc, q, nh, g, p, n, dtype):
    """Random chunk-backward operands (no zeros): x, b, c, dt, s, dy, hprev, dstates, d."""
    lp = nc * q
    ks = jax.random.split(jax.random.key(seed), 9)
    x = jax.random.normal(ks[0], (bsz, lp, nh, p)).astype(dtype)
    bm = jax.random.normal(ks[1], (bsz, lp, g, n)).astype(dtype)
    cm = jax.random.normal(ks[2], (bsz, lp, g, n)).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(ks[3], (bsz, nh, lp)) - 1.0)
    a = -jnp.exp(jax.random.uniform(ks[4], (nh,), minval=-1.0, maxval=1.0))
    s = jnp.cumsum((dt * a[None, :, None]).reshape(bsz, nh, nc, q), -1).reshape(bsz, nh, lp)
    dy = jax.random.normal(ks[5], (bsz, lp, nh, p)).astype(dtype)
    hprev = (0.3 * jax.random.normal(ks[6], (bsz, nh, nc, p, n))).astype(dtype)
    dst = 0.3 * jax.random.normal(ks[7], (bsz, nh, nc, p, n))
    d = jax.random.normal(ks[8], (nh, p))
    return x, bm, cm, dt, s, dy, hprev, dst, d


def _chunk_bwd_f64(x, bm, cm, dt, s, dy, hprev, dst, d, q):
    """Float64 NumPy of the per-chunk backward formulas (module docstring of
    pallas_mosaic_bwd), from the 16-bit operands as given (dS rounded to x.dtype, as both
    kernels do). Returns dx, db_h, dc_h, ddt, ds, dd in the kernels' layouts."""
    f = lambda v: np.asarray(jnp.asarray(v, jnp.float32), np.float64)  # noqa: E731
    bsz, lp, nh, p = x.shape
    g, n = bm.shape[2], bm.shape[3]
    nc, hpg = lp // q, nh // g
    xs = f(x).reshape(bsz, nc, q, nh, p).transpose(0, 3, 1, 2, 4)       # (b, h, c, q, p)
    dys = f(dy).reshape(bsz, nc, q, nh, p).transpose(0, 3, 1, 2, 4)
    bs = np.repeat(f(bm).reshape(bsz, nc, q, g, n).transpose(0, 3, 1, 2, 4), hpg, axis=1)
    cs = np.repeat(f(cm).reshape(bsz, nc, q, g, n).transpose(0, 3, 1, 2, 4), hpg, axis=1)
    dts = f(dt).reshape(bsz, nh, nc, q)
    ss = f(s).reshape(bsz, nh, nc, q)
    h = f(hprev)
    ds_ = f(jnp.asarray(dst).astype(x.dtype))
    xd = xs * dts[..., None]
    keep = np.tril(np.ones((q, q), bool))
    lmask = np.where(keep, np.exp(np.where(keep, ss[..., :, None] - ss[..., None, :], 0.0)), 0.0)
    m = np.einsum("bhcin,bhcjn->bhcij", cs, bs) * lmask
    dm = np.einsum("bhcip,bhcjp->bhcij", dys, xd)
    w = dm * m
    dg = dm * lmask
    e_s = np.exp(ss)
    e_end = np.exp(ss[..., -1:] - ss)
    b_dst = np.einsum("bhcqn,bhcpn->bhcqp", bs, ds_)
    dxd = np.einsum("bhcij,bhcip->bhcjp", m, dys) + e_end[..., None] * b_dst
    dc = np.einsum("bhcij,bhcjn->bhcin", dg, bs) + e_s[..., None] * np.einsum(
        "bhcqp,bhcpn->bhcqn", dys, h)
    db = np.einsum("bhcij,bhcin->bhcjn", dg, cs) + e_end[..., None] * np.einsum(
        "bhcqp,bhcpn->bhcqn", xd, ds_)
    y_off = e_s[..., None] * np.einsum("bhcqn,bhcpn->bhcqp", cs, h)
    v = e_end * np.sum(xd * b_dst, axis=-1)
    ds = w.sum(-1) - w.sum(-2) + np.sum(dys * y_off, -1) - v
    ds[..., -1] += v.sum(-1)
    dx = dxd * dts[..., None] + f(d)[:, None, None, :] * dys
    ddt = np.sum(dxd * xs, -1)
    dd = np.sum(dys * xs, axis=3)

    def to_rows(t):  # (b, h, c, q, k) -> (b, Lp, h, k)
        return t.transpose(0, 2, 3, 1, 4).reshape(bsz, lp, nh, t.shape[-1])

    return (to_rows(dx), to_rows(db), to_rows(dc), ddt.reshape(bsz, nh, lp),
            ds.reshape(bsz, nh, lp), dd)


def _check_shapes(outs, triton_outs):
    for name, o, t in zip(NAMES, outs, triton_outs):
        assert o.shape == t.shape and o.dtype == t.dtype, (name, o.shape, o.dtype, t.shape,
                                                           t.dtype)


def test_supported_bwd_reasons_and_errors():
    bf16 = jnp.bfloat16
    x = jax.ShapeDtypeStruct((1, 256, 2, 64), bf16)
    b = jax.ShapeDtypeStruct((1, 256, 1, 128), bf16)
    assert pallas_mosaic_bwd.supported_bwd(x=x, b=b, q=128) == (True, "")
    ok, why = pallas_mosaic_bwd.supported_bwd(x=jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                              b=b, q=128)
    assert not ok and "float32" in why
    ok, why = pallas_mosaic_bwd.supported_bwd(x=x, b=jax.ShapeDtypeStruct((1, 256, 1, 256), bf16),
                                              q=64)
    assert not ok and "dstate" in why
    ok, why = pallas_mosaic_bwd.supported_bwd(x=x, b=b, q=32)
    assert not ok and "block_len" in why
    x128 = jax.ShapeDtypeStruct((1, 256, 2, 128), bf16)
    assert pallas_mosaic_bwd.supported_bwd(x=x128, b=b, q=64)[0]
    ok, why = pallas_mosaic_bwd.supported_bwd(x=x128, b=b, q=128)  # 128 x 128 tiles at q 128
    assert not ok and "shared memory" in why
    # float32 dS is converted in the kernel where its float32 tile fits and costs no
    # occupancy; at q 64, 64 x 128 the dB / dC slabs share staging (two blocks per SM).
    plan = pallas_mosaic_bwd.smem_plan
    assert plan(128, 64, 128, 2, True)[:2] == (True, False)
    assert plan(64, 64, 128, 2, True)[:2] == (False, True)
    assert plan(64, 64, 128, 2, True)[2] <= hopper.TWO_BLOCKS_SMEM
    assert plan(64, 128, 128, 2, True)[:2] == (False, False)
    assert pallas_mosaic_bwd.smem_bytes(64, 128, 128) > hopper.SMEM_LIMIT
    args = _inputs(0, 1, 1, 64, 2, 1, 64, 64, jnp.float32)
    with pytest.raises(ValueError, match="float32"):
        pallas_mosaic_bwd.chunk_bwd_mosaic(*args, q=64, hpg=2, interpret=True)
    args = _inputs(0, 1, 1, 64, 2, 1, 64, 64, bf16)
    with pytest.raises(ValueError, match="heads per group"):
        pallas_mosaic_bwd.chunk_bwd_mosaic(*args, q=64, hpg=1, interpret=True)
    with pytest.raises(ValueError, match="semantics"):
        pallas_mosaic_bwd.chunk_bwd_mosaic(*args, q=64, hpg=2, semantics="thread")


@pytest.mark.parametrize("q,n,dst_dtype", [(64, 64, jnp.float32), (64, 128, jnp.bfloat16),
                                            (128, 128, jnp.float32)])
def test_interpreter_matches_triton_and_float64(q, n, dst_dtype):
    """Mosaic GPU interpreter vs the Triton interpreter and float64 NumPy: bf16, two chunks,
    two heads sharing one group, headdim 64. Cases: q 64 with float32 dS converted in the
    kernel; q 64, dstate 128 with bf16 dS and the dB / dC slabs sharing staging; q 128 (two
    row slabs per chunk: sum(v) and dD carried across them), float32 dS in the kernel."""
    bsz, nc, nh, g, p = 1, 2, 2, 1, 64
    args = _inputs(20261204, bsz, nc, q, nh, g, p, n,
                   jnp.bfloat16)
    x, bm, cm, dt, s, dy, hprev, dst, d = args
    outs = pallas_mosaic_bwd.chunk_bwd_mosaic(x, bm, cm, dt, s, dy, hprev,
                                               dst.astype(dst_dtype), d, q=q, hpg=nh // g,
                                               interpret=True)
    tri = pallas_gpu._chunk_bwd_call(*args, None, q=q, hpg=nh // g, num_warps=4, interpret=True)
    _check_shapes(outs, tri)
    ref = _chunk_bwd_f64(*args, q=q)
    for name, o, t, r in zip(NAMES, outs, tri, ref):
        # Both kernels round M, dG (and Triton x dt) to bf16 before the products and write
        # dx / dB / dC in bf16; the float64 reference rounds nothing but the inputs.
        assert _rel(o, t) < 1e-2, name
        assert _rel(o, r) < 1e-2, name
        assert _rel(t, r) < 1e-2, name  # the yardstick itself agrees with float64


@pytest.mark.parametrize("q,p,n,semantics,dst_dtype", [
    (128, 64, 128, "lane", jnp.float32), (128, 64, 128, "warpgroup", jnp.float32),
    (64, 128, 128, "lane", jnp.float32), (64, 64, 64, "warpgroup", jnp.bfloat16),
    (64, 64, 128, "warpgroup", jnp.float32), (64, 64, 128, "lane", jnp.bfloat16)])
def test_lowers_for_cuda_on_cpu(q, p, n, semantics, dst_dtype):
    """Full Mosaic GPU lowering for cuda without a GPU (layout inference under Warpgroup
    semantics, wgmma operand checks). Paths: float32 dS converted in the kernel (q 128),
    converted in XLA (headdim 128 x dstate 128), bf16 dS, shared dB / dC staging (q 64,
    64 x 128)."""
    s = jax.ShapeDtypeStruct
    f32, bf16 = jnp.float32, jnp.bfloat16
    bsz, nc, nh, g = 1, 2, 4, 2
    lp = nc * q
    shapes = (s((bsz, lp, nh, p), bf16), s((bsz, lp, g, n), bf16), s((bsz, lp, g, n), bf16),
              s((bsz, nh, lp), f32), s((bsz, nh, lp), f32), s((bsz, lp, nh, p), bf16),
              s((bsz, nh, nc, p, n), bf16), s((bsz, nh, nc, p, n), dst_dtype), s((nh, p), f32))

    def f(*a):
        return pallas_mosaic_bwd.chunk_bwd_mosaic(*a, q=q, hpg=nh // g, semantics=semantics)

    with hopper.cuda_lowering_context():
        lowered = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",))
    assert len(re.findall(r"custom_call @mosaic_gpu", lowered.as_text())) == 1
    infos = lowered.out_info
    assert [i.shape for i in infos] == [(bsz, lp, nh, p), (bsz, lp, nh, n), (bsz, lp, nh, n),
                                        (bsz, nh, lp), (bsz, nh, lp), (bsz, nh, nc, p)]
    assert [i.dtype for i in infos] == [bf16, bf16, bf16, f32, f32, f32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,q,p,n", [(jnp.bfloat16, 128, 64, 128), (jnp.bfloat16, 64, 64, 128),
                                         (jnp.float16, 128, 64, 64), (jnp.float16, 64, 128, 128)])
def test_gpu_matches_triton(dtype, q, p, n):
    """The compiled Mosaic kernel vs the compiled Triton kernel (same inputs, 3 heads per
    group, 3 chunks); relative L2 per output."""
    bsz, nc, nh, g = 2, 3, 6, 2
    args = _inputs(20261204, bsz, nc, q, nh, g, p, n, dtype)
    outs = jax.jit(lambda *a: pallas_mosaic_bwd.chunk_bwd_mosaic(*a, q=q, hpg=nh // g))(*args)
    tri = jax.jit(lambda *a: pallas_gpu._chunk_bwd_call(*a, None, q=q, hpg=nh // g, num_warps=8,
                                                        interpret=False))(*args)
    _check_shapes(outs, tri)
    for name, o, t in zip(NAMES, outs, tri):
        assert _rel(o, t) < 1e-2, name


def test_interpreter_full_gradient_with_mosaic_chunk_bwd(monkeypatch):
    """The drop-in claim end to end: pallas_mosaic's forward with pallas_gpu's backward in
    which `_chunk_bwd_call` is replaced (for this test only) by the Mosaic kernel, in the
    interpreters, vs the sequential reference's gradients: bf16, seqlen 70 (padded to two
    chunks of 64), four heads in one group, D per channel, dt_bias, initial states. (Four
    heads, not two: dA sums terms that cancel, and a near-zero reference dA over only two
    heads made its relative error exceed the tolerance in 2 of 110 seeds; over 40 seeds
    with four heads the worst dA error was 6.6e-3.)"""
    def mosaic_chunk_bwd(x, b, c, dt, s, dy, hprev, dstates, d, seg, *, q, hpg, num_warps,
                         interpret):
        assert seg is None and interpret
        del num_warps
        return pallas_mosaic_bwd.chunk_bwd_mosaic(x, b, c, dt, s, dy, hprev, dstates, d, q=q,
                                                   hpg=hpg, interpret=True)

    monkeypatch.setattr(pallas_gpu, "_chunk_bwd_call", mosaic_chunk_bwd)
    bsz, seqlen, nh, p, g, n = 1, 70, 4, 64, 1, 64
    args, kw, dy = ssd_args(20261204, bsz, seqlen, nh, p,
                            g, n)
    chunk = 256  # the caller's chunk size; the kernels use block_len

    def reference(*a):
        with jax.default_matmul_precision("highest"):
            return ssd(*a, chunk, impl="reference", **kw)

    _, vjp = jax.vjp(lambda *a: pallas_mosaic.ssd_mosaic_forward(
        *a, chunk, interpret=True, **kw, kernels=KernelConfig(block_len=64, backward="triton")),
        *args)
    _, vjp_ref = jax.vjp(reference, *args)
    for name, gr, gr_ref in zip(("x", "dt", "A", "B", "C"), vjp(dy), vjp_ref(dy)):
        assert _rel(gr, gr_ref) < 1.5e-2, name  # the bf16 tolerance of test_ssd_mosaic


def test_dispatcher_runs_the_mosaic_backward_when_asked(monkeypatch):
    """ssd_mosaic_forward(kernels=KernelConfig(backward="mosaic")) routes the chunk backward
    through chunk_bwd_mosaic (interpreters on the CPU) and the whole gradient matches the
    sequential reference; an unknown backward is a ValueError."""
    calls = []
    real = pallas_mosaic_bwd.chunk_bwd_mosaic

    def spy(*a, **k):
        calls.append(k["q"])
        return real(*a, **k)

    monkeypatch.setattr(pallas_mosaic_bwd, "chunk_bwd_mosaic", spy)
    jax.clear_caches()  # the backward is jitted once per config: trace it again, with the spy
    h = 4
    args, dy = plain_ssd_args(20261204, 1, 100, h, 64, 1, 64)
    kw = dict(dt_softplus=True, D=jnp.ones((h,)))

    def mosaic(*a):
        return pallas_mosaic.ssd_mosaic_forward(
            *a, 256, interpret=True, **kw, kernels=KernelConfig(block_len=64, backward="mosaic"))

    _, vjp = jax.vjp(mosaic, *args)
    grads = vjp(dy)
    assert calls == [64]
    with jax.default_matmul_precision("highest"):
        _, vjp_ref = jax.vjp(lambda *a: ssd(*a, 256, impl="reference", **kw), *args)
    for name, gr, gr_ref in zip(("x", "dt", "A", "B", "C"), grads, vjp_ref(dy)):
        assert _rel(gr, gr_ref) < 1.5e-2, name
    with pytest.raises(ValueError, match="backward"):
        KernelConfig(block_len=64, backward="cuda")


@pytest.mark.parametrize("block_len,semantics", [(128, "warpgroup"), (64, "lane")])
def test_full_gradient_with_the_mosaic_backward_lowers_for_cuda(block_len, semantics):
    """jax.grad of ssd_mosaic_forward(kernels=KernelConfig(backward="mosaic")) lowers for cuda on a CPU-only machine:
    the forward's two Mosaic kernels, the fused Mosaic dout chunk-state + reverse state-pass
    kernel (pallas_mosaic_rev) and the Mosaic chunk backward in one program (the shape of the
    dispatcher's training call); no Triton kernel is left."""
    s = jax.ShapeDtypeStruct
    b, l, h, p, g, n = 1, 256, 4, 64, 1, 128
    shapes = (s((b, l, h, p), jnp.bfloat16), s((b, l, h), jnp.float32), s((h,), jnp.float32),
              s((b, l, g, n), jnp.bfloat16), s((b, l, g, n), jnp.bfloat16))

    def loss(*a):
        y = pallas_mosaic.ssd_mosaic_forward(
            *a, 256, dt_softplus=True, semantics=semantics,
            kernels=KernelConfig(block_len=block_len, backward="mosaic"))
        return jnp.square(y.astype(jnp.float32)).sum()  # needs y: keeps the output kernel

    with hopper.cuda_lowering_context():
        text = jax.jit(jax.grad(loss, argnums=tuple(range(5)))).trace(*shapes).lower(
            lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 4  # 2 forward + 2 backward
    assert "triton" not in text.lower()
    names = set(re.findall(r"(ssd_[a-z_]+)_mosaic_gpu", text))  # the kernels' names in profiles
    assert names == {"ssd_chunk_out", "ssd_chunk_statepass", "ssd_rev_statepass", "ssd_chunk_bwd"}


def test_two_warpgroups_shared_memory_and_where_they_are_taken():
    """Two consumer warpgroups need two 64-row slabs (chunk 128) and their own staging tiles:
    they fit at headdim 64 with dS in 16 bits (one block per SM), not at chunk 64 or headdim
    128, where chunk_bwd_mosaic runs one warpgroup; KernelConfig reads the count from
    config.model.ssd_backward_warpgroups (2 by default) and rejects any other than 1 or 2."""
    fit = pallas_mosaic_bwd.warpgroups_fit
    need = pallas_mosaic_bwd.smem_bytes(128, 64, 128, 2, convert_dstates=False, warpgroups=2)
    one = pallas_mosaic_bwd.smem_bytes(128, 64, 128, 2, convert_dstates=False)
    assert one < need <= hopper.SMEM_LIMIT and need > hopper.TWO_BLOCKS_SMEM
    assert fit(128, 64, 128, 2) and fit(128, 64, 64, 2)
    assert not fit(64, 64, 128, 2) and not fit(128, 128, 128, 2)
    check_kernel_knob("backward_warpgroups", 2, 1, 3)
    args = _inputs(3, 1, 1, 64, 2, 1, 64, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="warpgroups must be 1 or 2"):
        pallas_mosaic_bwd.chunk_bwd_mosaic(*args, q=64, hpg=2, warpgroups=4)


def test_two_warpgroups_give_the_bits_of_one_in_the_interpreter():
    """One chunk of 128 (slab 0 hands its v rows to slab 1 through shared memory; slab 1 forms
    sum(v) and dD): every output bit for bit the one-warpgroup kernel's, float32 dS (converted
    in XLA for two warpgroups, in the kernel for one)."""
    args = _inputs(5, 1, 1, 128, 1, 1, 64, 64, jnp.bfloat16)
    one = pallas_mosaic_bwd.chunk_bwd_mosaic(*args, q=128, hpg=1, interpret=True)
    two = pallas_mosaic_bwd.chunk_bwd_mosaic(*args, q=128, hpg=1, interpret=True, warpgroups=2)
    for name, a, b in zip(NAMES, one, two):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), name)


def test_two_warpgroups_lower_for_cuda_on_cpu():
    """The two-warpgroup kernel (256 threads per program) lowers for cuda under the backward's
    semantics: one Mosaic GPU call, the one-warpgroup kernel's outputs."""
    s = jax.ShapeDtypeStruct
    f32, bf16 = jnp.float32, jnp.bfloat16
    q, p, n, bsz, nc, nh, g = 128, 64, 128, 1, 2, 4, 2
    lp = nc * q
    shapes = (s((bsz, lp, nh, p), bf16), s((bsz, lp, g, n), bf16), s((bsz, lp, g, n), bf16),
              s((bsz, nh, lp), f32), s((bsz, nh, lp), f32), s((bsz, lp, nh, p), bf16),
              s((bsz, nh, nc, p, n), bf16), s((bsz, nh, nc, p, n), f32), s((nh, p), f32))

    def f(*a):
        return pallas_mosaic_bwd.chunk_bwd_mosaic(*a, q=q, hpg=nh // g, warpgroups=2,
                                                  semantics=hopper.BACKWARD_SEMANTICS)

    with hopper.cuda_lowering_context():
        lowered = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",))
    assert len(re.findall(r"custom_call @mosaic_gpu", lowered.as_text())) == 1
    assert [i.shape for i in lowered.out_info] == [
        (bsz, lp, nh, p), (bsz, lp, nh, n), (bsz, lp, nh, n), (bsz, nh, lp), (bsz, nh, lp),
        (bsz, nh, nc, p)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,n", [(jnp.bfloat16, 128), (jnp.float16, 64)])
def test_gpu_two_warpgroups_give_the_bits_of_one(dtype, n):
    """Compiled, chunk 128: the two-warpgroup kernel's outputs equal the one-warpgroup
    kernel's bit for bit (3 heads per group, 3 chunks, float32 dS)."""
    bsz, nc, nh, g, p, q = 2, 3, 6, 2, 64, 128
    args = _inputs(20261207, bsz, nc, q, nh, g, p, n, dtype)
    one = jax.jit(lambda *a: pallas_mosaic_bwd.chunk_bwd_mosaic(*a, q=q, hpg=nh // g))(*args)
    two = jax.jit(lambda *a: pallas_mosaic_bwd.chunk_bwd_mosaic(*a, q=q, hpg=nh // g,
                                                                warpgroups=2))(*args)
    for name, a, b in zip(NAMES, one, two):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), name)


def _grads_through_the_forward(seed, h, g, kernels):
    """Compiled jax.grad of a loss of ssd_mosaic_forward (batch 2, L 512, bf16, headdim 64,
    dstate 128, dt_softplus) w.r.t. x, dt, A, B, C, with these KernelConfig kernels."""
    args, _ = plain_ssd_args(seed, 2, 512, h, 64, g, 128)

    def loss(*a):
        y = pallas_mosaic.ssd_mosaic_forward(*a, 256, dt_softplus=True, kernels=kernels)
        return jnp.square(y.astype(jnp.float32)).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)


@pytest.mark.gpu
def test_gpu_full_gradient_with_two_warpgroups():
    """jax.grad through ssd_mosaic_forward with KernelConfig(backward_warpgroups=2) gives the
    gradients of backward_warpgroups=1 bit for bit (chunk 128, bf16, 2 heads per group)."""
    grads = {w: _grads_through_the_forward(11, 4, 2, KernelConfig(
        block_len=128, backward="mosaic", backward_warpgroups=w)) for w in (1, 2)}
    for one, two in zip(grads[1], grads[2]):
        np.testing.assert_array_equal(np.asarray(two), np.asarray(one))


_FULL_GRADIENT_WORKER = """
import json, sys
import jax
sys.path.insert(0, sys.argv[1])
from _ssd_testing import plain_ssd_args, rel_error
from dimba_jax.ssd import KernelConfig, pallas_mosaic, ssd
args, dy = plain_ssd_args(3, 1, 256, 4, 64, 1, 64)
grads = {}
for k in (1, 2):
    kernels = KernelConfig(block_len=128, backward="mosaic", backward_warpgroups=k)
    _, vjp = jax.vjp(lambda *a: pallas_mosaic.ssd_mosaic_forward(
        *a, 256, interpret=True, dt_softplus=True, kernels=kernels), *args)
    grads[k] = vjp(dy)
with jax.default_matmul_precision("highest"):
    _, vjp = jax.vjp(lambda *a: ssd(*a, 256, impl="reference", dt_softplus=True), *args)
ref = vjp(dy)
print(json.dumps({name: [rel_error(grads[1][i], ref[i]), rel_error(grads[2][i], ref[i]),
                         rel_error(grads[2][i], grads[1][i])]
                  for i, name in enumerate(("x", "dt", "A", "B", "C"))}))
"""


def test_two_warpgroups_full_gradient_in_the_interpreter():
    """The whole SSD gradient through ssd_mosaic_forward at chunk 128 with the Mosaic backward
    in the interpreters, two chunk-backward warpgroups against one, beside the sequential
    reference (bf16, four heads in one group): every gradient the same bits, within the bf16
    tolerance of the reference. In a subprocess with 8 host devices: with one, the Mosaic GPU
    interpreter's two warpgroup threads deadlock on a 2-core machine when the kernel runs
    inside the gradient's jitted backward (they finish there with 8)."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
               + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", _FULL_GRADIENT_WORKER, here], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (one, two, between) in errors.items():
        assert between == 0.0 and one < 1.5e-2 and two < 1.5e-2, (name, errors[name])
