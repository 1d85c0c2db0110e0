"""The mixer core as one custom VJP (`layers/fused_mixer.py`) against the same fused prologue,
SSD and fused epilogue called one after another (each with its own VJP): values and every
gradient, both directions and the causal mixer's one, in the Pallas interpreter; its errors;
and the Mamba-2 layers' knob."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dimba_jax.layers import fused_conv, fused_mixer, fused_norm
from dimba_jax.layers.mamba2 import BidirectionalMamba2, Mamba2
from dimba_jax.ssd import ssd

B, L, H, P, G, N, K, CHUNK = 1, 16, 2, 16, 1, 16, 4, 8
D, C = H * P, H * P + 2 * G * N
W = D + C + H


def _args(nd, seed=0, batch=B):
    k = jax.random.split(jax.random.key(seed), 9)
    zx = jax.random.normal(k[0], (batch, L, W), jnp.float32).astype(jnp.bfloat16)
    conv_ws = tuple(0.5 * jax.random.normal(k[1 + i], (K, C)) for i in range(nd))
    conv_bs = tuple(0.1 * jax.random.normal(k[3 + i], (C,)) for i in range(nd))
    a = -jnp.exp(0.3 * jax.random.normal(k[5], (nd * H,)))
    d = jax.random.normal(k[6], (nd * H, P))
    bias = 0.2 * jax.random.normal(k[7], (nd * H,))
    norm_ws = tuple(1.0 + 0.1 * jax.random.normal(k[8], (D,)) for _ in range(nd))
    return zx, conv_ws, conv_bs, a, d, bias, norm_ws


COMMON = dict(ngroups=G, dtype=jnp.bfloat16, interpret=True)
SSD_KW = dict(dt_softplus=True, dt_limit=(0.0, float("inf")), impl="xla")


def _separate(zx, conv_ws, conv_bs, a, d, bias, norm_ws):
    """The three calls as the layers make them without the core VJP."""
    packed = dict(xbc_offset=D, dt_offset=D + C, nheads=H)
    if len(conv_ws) == 2:
        x, b, c, dt = fused_conv.bidirectional_conv_pallas(zx, zx, *conv_ws, *conv_bs,
                                                           d_state=N, **packed, **COMMON)
    else:
        x, b, c, dt = fused_conv.causal_conv_pallas(zx, zx, conv_ws[0], conv_bs[0], d_state=N,
                                                    **packed, **COMMON)
    y = ssd(x, dt, a, b, c, CHUNK, D=d, dt_bias=bias, **SSD_KW)
    if len(norm_ws) == 2:
        return fused_norm.bidirectional_gated_norm_pallas(y, zx, *norm_ws, eps=1e-5, **COMMON)
    return fused_norm.gated_norm_pallas(y, zx, norm_ws[0], eps=1e-5, **COMMON)


def _core(zx, conv_ws, conv_bs, a, d, bias, norm_ws):
    return fused_mixer.mixer_core(zx, conv_ws, conv_bs, a, d, bias, norm_ws, d_state=N,
                                  chunk_size=CHUNK, dt_limit=SSD_KW["dt_limit"], ssd_impl="xla",
                                  kernels=None, eps=1e-5, xbc_offset=D, dt_offset=D + C,
                                  nheads=H, **COMMON)


def test_core_vjp_equals_the_separate_calls(nd=2, batch=B, jit=jax.jit, xla_tol=0.0):
    """Same output bits and the same gradient bits (zx, conv weights and biases, A, D,
    dt_bias, norm weights): the separate path adds three zx gradients that are zero outside
    their own columns, the core writes each column once. Each side one jitted program on the
    CPU (an eager grad dispatches the interpreted kernels and the XLA SSD op by op).

    xla_tol > 0: the SSD parameters' gradients (A, D, dt_bias: sums over batch and time that
    XLA computes, fused differently in the two programs) may differ by xla_tol times the
    largest entry of that gradient (summation order: terms of both signs cancel, so an entry's
    own ulps say nothing); the kernels' gradients stay bit for bit, and a second run of the
    core must repeat its bits."""
    args = _args(nd, batch=batch)
    want, got = jit(_separate)(*args), jit(_core)(*args)
    np.testing.assert_array_equal(np.float32(got), np.float32(want))
    ct = jax.random.normal(jax.random.key(9), want.shape, jnp.float32)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * ct)

    g_want = jit(jax.grad(loss(_separate), argnums=tuple(range(7))))(*args)
    g_got = jit(jax.grad(loss(_core), argnums=tuple(range(7))))(*args)
    if xla_tol:  # the tolerance is for fusion order, not for run-to-run noise: none allowed
        again = jit(jax.grad(loss(_core), argnums=tuple(range(7))))(*args)
        for g, h in zip(jax.tree.leaves(g_got), jax.tree.leaves(again)):
            np.testing.assert_array_equal(np.float32(h), np.float32(g))
    for i, (gw, gg) in enumerate(zip(g_want, g_got)):
        for w, g in zip(jax.tree.leaves(gw), jax.tree.leaves(gg)):
            assert w.shape == g.shape and w.dtype == g.dtype
            if xla_tol and i in (3, 4, 5):  # A, D, dt_bias
                scale = float(np.max(np.abs(np.float32(w))))
                np.testing.assert_allclose(np.float32(g), np.float32(w), rtol=0,
                                           atol=xla_tol * scale)
            else:
                np.testing.assert_array_equal(np.float32(g), np.float32(w))


def test_forward_only_core_reads_dt_in_place(monkeypatch):
    """Forward only (as the samplers run it) the core hands the SSD the projection's output
    with its dt columns (`ssd`'s dt_layout), so with the Mosaic SSD and its prologue kernel
    and the Mosaic conv forward (which leaves dt_cat to XLA), all in their interpreters (8
    heads of 64 per direction, the prologue's block), the program forms no (b, L, 2H) dt_cat:
    the same output bits as the separate calls, which concatenate it, and no such
    concatenation left in the compiled program."""
    import functools
    import types

    import dimba_jax.ssd as ssd_package
    from dimba_jax.ssd import KernelConfig, pallas_mosaic, pallas_select

    # impl="pallas" on the CPU: the Mosaic forward in its interpreter, the device check off
    real_supported = pallas_mosaic.supported
    monkeypatch.setattr(pallas_mosaic, "supported",
                        lambda **kw: real_supported(**dict(kw, check_device=False)))
    interpreted = types.SimpleNamespace(
        supported=lambda **kw: (True, ""),
        ssd_pallas=functools.partial(pallas_select.ssd_pallas, interpret=True))
    monkeypatch.setattr(ssd_package, "_load_pallas", lambda: (interpreted, ""))
    sources = []
    real_forward = pallas_mosaic.ssd_mosaic_forward

    def spy(*args, **kw):
        sources.append(kw.get("dt_source") is not None)
        return real_forward(*args, **kw)

    monkeypatch.setattr(pallas_mosaic, "ssd_mosaic_forward", spy)

    h, p, n, length = 8, 64, 64, 64
    c_dim = h * p + 2 * n
    width = h * p + c_dim + h
    k = jax.random.split(jax.random.key(3), 8)
    zx = jax.random.normal(k[0], (1, length, width), jnp.float32).astype(jnp.bfloat16)
    conv_ws = tuple(0.3 * jax.random.normal(k[1 + i], (K, c_dim)) for i in range(2))
    conv_bs = tuple(0.1 * jax.random.normal(k[3 + i], (c_dim,)) for i in range(2))
    a = -jnp.exp(0.3 * jax.random.normal(k[5], (2 * h,)))
    d = jax.random.normal(k[6], (2 * h, p))
    bias = 0.2 * jax.random.normal(k[7], (2 * h,)) - 1.0
    norm_ws = (jnp.ones((h * p,)), 1.1 * jnp.ones((h * p,)))
    kernels = KernelConfig(block_len=64, prologue="pallas")
    packed = dict(xbc_offset=h * p, dt_offset=h * p + c_dim, nheads=h)

    def separate(zx):
        x, b, c, dt = fused_conv.bidirectional_conv_pallas(zx, zx, *conv_ws, *conv_bs,
                                                           d_state=n, forward_kernel="mosaic",
                                                           **packed, **COMMON)
        y = ssd(x, dt, a, b, c, 64, D=d, dt_bias=bias, dt_softplus=True, impl="pallas",
                kernels=kernels)
        return fused_norm.bidirectional_gated_norm_pallas(y, zx, *norm_ws, eps=1e-5, **COMMON)

    def core(zx):
        return fused_mixer.mixer_core(zx, conv_ws, conv_bs, a, d, bias, norm_ws, d_state=n,
                                      chunk_size=64, dt_limit=(0.0, float("inf")),
                                      ssd_impl="pallas", kernels=kernels, eps=1e-5, **packed,
                                      conv_forward="mosaic", **COMMON)

    want, got = jax.jit(separate)(zx), jax.jit(core)(zx)
    assert sources == [False, True]  # the Mosaic forward ran both times, the core's in place
    np.testing.assert_array_equal(np.float32(got), np.float32(want))
    dt_cat = f"f32[1,{length},{2 * h}]"
    concats = [ln for ln in jax.jit(core).lower(zx).compile().as_text().splitlines()
               if " concatenate(" in ln and dt_cat in ln.split("=")[1].split("concatenate")[0]]
    assert not concats, concats
    built = [ln for ln in jax.jit(separate).lower(zx).compile().as_text().splitlines()
             if " concatenate(" in ln and dt_cat in ln.split("=")[1].split("concatenate")[0]]
    assert built  # the check can see a dt_cat where one is formed


def test_mixers_of_one_shape_share_one_lowered_core():
    """Three mixers of one shape in one jitted gradient (the layers of a model): the core, the
    separate path's conv and norm calls are each lowered once, not once per call site, so a
    model's compile does not grow with its depth by the kernels' lowering."""
    args = _args(2)

    def stack(fn):
        def loss(zx, *rest):
            return sum(jnp.sum(fn(zx + i, *rest).astype(jnp.float32)) for i in range(3))
        return jax.jit(jax.grad(loss)).lower(*args).as_text()

    core_text, separate_text = stack(_core), stack(_separate)
    for text, name in ((core_text, "mixer_core_call"), (separate_text, "_fused")):
        defs = [ln for ln in text.splitlines() if f"func.func private @{name}" in ln]
        calls = [ln for ln in text.splitlines() if f"call @{name}" in ln]
        callees = {ln.split("call @")[1].split("(")[0] for ln in calls}
        # each function (forward, backward; conv and norm) defined once, called by all three
        assert len(defs) == len(callees) and 1 <= len(callees) <= 4, (name, callees)
        assert len(calls) == 3 * len(callees), (name, len(calls))


def test_core_checks_its_columns_and_directions():
    zx, conv_ws, conv_bs, a, d, bias, norm_ws = _args(2)
    with pytest.raises(ValueError, match="must be \\[z"):
        fused_mixer.mixer_core(zx, conv_ws, conv_bs, a, d, bias, norm_ws, d_state=N,
                               chunk_size=CHUNK, dt_limit=(0.0, 1.0), ssd_impl="xla",
                               kernels=None, eps=1e-5, xbc_offset=D + 1, dt_offset=D + C,
                               nheads=H, **COMMON)
    with pytest.raises(ValueError, match="one or two directions"):
        fused_mixer.mixer_core(zx, conv_ws, conv_bs[:1], a, d, bias, norm_ws, d_state=N,
                               chunk_size=CHUNK, dt_limit=(0.0, 1.0), ssd_impl="xla",
                               kernels=None, eps=1e-5, xbc_offset=D, dt_offset=D + C,
                               nheads=H, **COMMON)


def test_mamba2_layers_take_the_core_vjp_by_their_knob(monkeypatch):
    """The causal Mamba2 with both fused kernels and core_vjp=True calls the core (one
    direction) and gives the same output and parameter-gradient bits as core_vjp=False;
    BidirectionalMamba2 calls it with both directions; with the XLA conv the knob has nothing
    to fuse and the core is not called. Each call one jitted program, traced afresh (the spy
    sees the calls the trace makes)."""
    import dimba_jax.layers.mamba2 as mamba2_lib

    calls = []
    real = mamba2_lib.mixer_core
    monkeypatch.setattr(mamba2_lib, "mixer_core",
                        lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    u = jax.random.normal(jax.random.key(3), (B, L, 16), jnp.float32)
    kw = dict(d_state=N, headdim=P, chunk_size=CHUNK, ssd_impl="xla", dtype=jnp.bfloat16,
              norm_impl="pallas")

    def output(layer):
        graphdef, state = nnx.split(layer)
        return jax.jit(lambda s, u: nnx.merge(graphdef, s)(u))(state, u)

    results = {}
    for core in (False, True):
        layer = Mamba2(16, conv_impl="pallas", core_vjp=core, rngs=nnx.Rngs(0), **kw)
        graphdef, params = nnx.split(layer, nnx.Param)

        def loss(p, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, p)(u).astype(jnp.float32) ** 2)

        results[core] = (output(layer), jax.jit(jax.grad(loss))(params))
    assert calls and set(calls) == {1}
    for want, got in zip(jax.tree.leaves(results[False]), jax.tree.leaves(results[True])):
        np.testing.assert_array_equal(np.float32(got), np.float32(want))
    calls.clear()
    bidir = dict(kw, conv_impl="pallas", rngs=nnx.Rngs(0))
    want = output(BidirectionalMamba2(16, core_vjp=False, **bidir))
    got = output(BidirectionalMamba2(16, core_vjp=True, **dict(bidir, rngs=nnx.Rngs(0))))
    assert calls == [2]
    np.testing.assert_array_equal(np.float32(got), np.float32(want))
    calls.clear()
    output(Mamba2(16, conv_impl="xla", core_vjp=True, rngs=nnx.Rngs(0), **kw))
    assert not calls


def test_core_gradient_lowers_for_cuda_with_the_aliased_buffer(monkeypatch):
    """The compiled kernels (not the interpreter) lower for CUDA on any machine: the
    gradient of the core holds the epilogue's and the prologue's backward kernels, the second
    writing into the first's buffer through an input/output alias."""
    monkeypatch.setitem(COMMON, "interpret", False)
    args = _args(2)
    ct = jnp.ones((B, L, D), jnp.float32)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(_core(*a).astype(jnp.float32) * ct),
                            argnums=(0, 1, 2, 6)))
    text = grad.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("bidir_gated_norm_bwd") >= 1 and text.count("bidir_conv_bwd_dx") >= 1
    assert "output_operand_alias" in text or "aliases" in text


@pytest.mark.gpu
@pytest.mark.parametrize("nd", [2, 1])
def test_core_vjp_equals_the_separate_calls_on_gpu(nd, monkeypatch):
    """Compiled on the GPU, two batch rows: the same output bits and kernel gradient bits as
    the separate calls (called eagerly, each kernel its own program); the SSD parameters'
    XLA-reduced gradients within 1e-4 of their largest entry (one H100 gave 1 ulp, another
    112-128 ulps of an entry, each side deterministic run to run:
    benchmarks/results/gpu_tests_s21_h100.md, gpu_tests_s22_h100.log)."""
    monkeypatch.setitem(COMMON, "interpret", False)
    test_core_vjp_equals_the_separate_calls(nd, batch=2, jit=lambda f: f, xla_tol=1e-4)
