"""Tests of the 64-row-slab Mosaic GPU chunk-output kernel (`dimba_jax/ssd/pallas_mosaic_out.py`).

CPU: `supported_slab` reasons and ValueErrors; the kernel in the Mosaic GPU interpreter vs
pallas_mosaic's whole-chunk `_chunk_out_mosaic` (interpreter, same inputs) and vs an independent
float64 NumPy computation of the chunk output; lowering for cuda without a GPU in both lowering
semantics, with its shared memory read from Mosaic GPU's own allocation (`smem_bytes` must
equal it, and fit two blocks per SM at q 128, P 64, N 128); the full forward + gradient of
`ssd_mosaic_forward` with pallas_mosaic.OUT_KERNEL = "slab" (monkeypatched) in the interpreters
vs the sequential reference, and its lowering for cuda.
GPU (`gpu` marker): slab vs whole kernel compiled at the 1.3b-L2k and 130m-L2k shapes; the full
gradient with OUT_KERNEL = "slab" vs the sequential reference.
"""

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dimba_jax.ssd import pallas_mosaic, pallas_mosaic_out, ssd
from _ssd_testing import rel_error as _rel, ssd_args


def _inputs(seed, bsz, nc, q, nh, g, p, n, dtype=jnp.bfloat16):
    """Random chunk-output operands (no zeros): x, b, c, dt, s, hprev, d."""
    lp = nc * q
    ks = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(ks[0], (bsz, lp, nh, p)).astype(dtype)
    bm = jax.random.normal(ks[1], (bsz, lp, g, n)).astype(dtype)
    cm = jax.random.normal(ks[2], (bsz, lp, g, n)).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(ks[3], (bsz, nh, lp)) - 1.0)
    a = -jnp.exp(jax.random.uniform(ks[4], (nh,), minval=-1.0, maxval=1.0))
    s = jnp.cumsum((dt * a[None, :, None]).reshape(bsz, nh, nc, q), -1).reshape(bsz, nh, lp)
    hprev = jax.random.normal(ks[5], (bsz, nh, nc, p, n)).astype(dtype)
    d = jax.random.normal(ks[6], (nh, p))
    return x, bm, cm, dt, s, hprev, d


def _chunk_out_f64(x, bm, cm, dt, s, hprev, d, q):
    """Float64 NumPy of y = ((C B^T) o L)(x dt) + exp(s) o (C h_c^T) + D x per chunk, from the
    operands as given (nothing rounded). Returns (batch, Lp, nheads, P) float64."""
    f = lambda v: np.asarray(jnp.asarray(v, jnp.float32), np.float64)  # noqa: E731
    bsz, lp, nh, p = x.shape
    g, n = bm.shape[2], bm.shape[3]
    nc, hpg = lp // q, nh // g
    xs = f(x).reshape(bsz, nc, q, nh, p).transpose(0, 3, 1, 2, 4)       # (b, h, c, q, p)
    bs = np.repeat(f(bm).reshape(bsz, nc, q, g, n).transpose(0, 3, 1, 2, 4), hpg, axis=1)
    cs = np.repeat(f(cm).reshape(bsz, nc, q, g, n).transpose(0, 3, 1, 2, 4), hpg, axis=1)
    dts = f(dt).reshape(bsz, nh, nc, q)
    ss = f(s).reshape(bsz, nh, nc, q)
    keep = np.tril(np.ones((q, q), bool))
    lmask = np.where(keep, np.exp(np.where(keep, ss[..., :, None] - ss[..., None, :], 0.0)), 0.0)
    m = np.einsum("bhcin,bhcjn->bhcij", cs, bs) * lmask * dts[..., None, :]
    y = np.einsum("bhcij,bhcjp->bhcip", m, xs)
    y += np.exp(ss)[..., None] * np.einsum("bhcqn,bhcpn->bhcqp", cs, f(hprev))
    y += f(d)[:, None, None, :] * xs
    return y.transpose(0, 2, 3, 1, 4).reshape(bsz, lp, nh, p)


def _stage_shapes(bsz, nc, q, nh, g, p, n, dtype=jnp.bfloat16):
    sds, f32 = jax.ShapeDtypeStruct, jnp.float32
    lp = nc * q
    return (sds((bsz, lp, nh, p), dtype), sds((bsz, lp, g, n), dtype),
            sds((bsz, lp, g, n), dtype), sds((bsz, nh, lp), f32), sds((bsz, nh, lp), f32),
            sds((bsz, nh, nc, p, n), dtype), sds((nh, p), f32))


def test_supported_slab_reasons_and_errors():
    sds, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
    x = sds((1, 256, 2, 64), bf16)
    b = sds((1, 256, 1, 128), bf16)
    out = pallas_mosaic_out
    assert out.supported_slab(x=x, b=b, q=128) == (True, "")
    assert out.supported_slab(x=sds(x.shape, jnp.float16), b=b, q=64) == (True, "")
    ok, why = out.supported_slab(x=sds(x.shape, jnp.float32), b=b, q=128)
    assert not ok and "float32" in why
    ok, why = out.supported_slab(x=sds((1, 256, 2, 256), bf16), b=b, q=128)
    assert not ok and "headdim" in why
    ok, why = out.supported_slab(x=x, b=sds((1, 256, 1, 96), bf16), q=128)
    assert not ok and "dstate" in why
    ok, why = out.supported_slab(x=x, b=b, q=256)
    assert not ok and "block_len" in why
    ok, why = out.supported_slab(x=sds((1, 200, 2, 64), bf16), b=b, q=128)
    assert not ok and "multiple" in why
    args = _inputs(0, 1, 1, 128, 2, 1, 64, 64)
    with pytest.raises(ValueError, match="float32"):
        out._chunk_out_slab_mosaic(args[0].astype(jnp.float32), *args[1:], q=128, hpg=2,
                                   interpret=True)
    with pytest.raises(ValueError, match="heads per group"):
        out._chunk_out_slab_mosaic(*args, q=128, hpg=1, interpret=True)
    with pytest.raises(ValueError, match="hprev"):
        out._chunk_out_slab_mosaic(*args[:5], args[5][:, :, :, :32], args[6], q=128, hpg=2,
                                   interpret=True)
    with pytest.raises(ValueError, match="semantics"):
        out._chunk_out_slab_mosaic(*args, q=128, hpg=2, semantics="thread")


@pytest.mark.parametrize("bsz,nc,nh,g,n", [(1, 3, 2, 1, 128), (2, 2, 1, 1, 64)])
def test_interpreter_matches_whole_kernel_and_float64(bsz, nc, nh, g, n):
    """Mosaic GPU interpreter, bf16, q 128 (two slabs), headdim 64: the slab kernel vs the
    whole-chunk kernel on the same inputs and vs float64 NumPy. Cases: two heads sharing a
    group (hpg 2), three chunks, dstate 128; two sequences of two chunks, one head (hpg 1),
    dstate 64."""
    q, p = 128, 64
    args = _inputs(int(np.random.default_rng().integers(1 << 30)), bsz, nc, q, nh, g, p, n)
    y = pallas_mosaic_out._chunk_out_slab_mosaic(*args, q=q, hpg=nh // g, interpret=True)
    whole = pallas_mosaic._chunk_out_mosaic(*args, q=q, hpg=nh // g, interpret=True)
    assert y.shape == whole.shape == args[0].shape and y.dtype == whole.dtype == jnp.bfloat16
    ref = _chunk_out_f64(*args, q=q)
    # Same roundings as the whole kernel (M and y to bf16); only the float32 summation order
    # differs, so a few y elements may round to the neighbouring bf16 value.
    assert _rel(y, whole) < 2e-3
    assert np.mean(np.asarray(y == whole)) > 0.9
    # vs float64 (inputs rounded only): bf16 M and bf16 y give ~3e-3.
    assert _rel(y, ref) < 1e-2
    assert _rel(whole, ref) < 1e-2  # the yardstick agrees with float64 too


@pytest.mark.parametrize("q,p,n,semantics", [(128, 64, 128, "lane"), (128, 64, 128, "warpgroup"),
                                             (128, 128, 64, "warpgroup"), (64, 64, 128, "lane")])
def test_lowers_for_cuda_on_cpu_with_exact_smem(q, p, n, semantics):
    """Full Mosaic GPU lowering for cuda without a GPU (Warpgroup layout inference, wgmma
    operand checks), four heads in two groups. Then again under an artificial 1-byte shared
    memory limit, whose error reports the bytes Mosaic GPU allocates: `smem_bytes` must be
    exactly that; at q 128, P 64, N 128 it must fit two blocks per SM (the point of the kernel),
    which the whole-chunk kernel does not."""
    from jax.experimental.mosaic.gpu import core as mgpu_core

    bsz, nc, nh, g = 1, 2, 4, 2
    shapes = _stage_shapes(bsz, nc, q, nh, g, p, n)

    def f(*a):
        return pallas_mosaic_out._chunk_out_slab_mosaic(*a, q=q, hpg=nh // g,
                                                        semantics=semantics)

    def whole(*a):
        return pallas_mosaic._chunk_out_mosaic(*a, q=q, hpg=nh // g, semantics=semantics)

    def allocated(fn):
        jax.clear_caches()  # lower again, under the limit
        with mgpu_core.artificial_shared_memory_limit(1):
            with pytest.raises(ValueError, match="exceeds available shared memory") as err:
                jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))
        return int(re.search(r"smem_bytes=(\d+)", str(err.value)).group(1))

    with pallas_mosaic.cuda_lowering_context():
        lowered = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",))
        assert len(re.findall(r"custom_call @mosaic_gpu", lowered.as_text())) == 1
        assert lowered.out_info.shape == shapes[0].shape
        assert lowered.out_info.dtype == shapes[0].dtype
        assert allocated(f) == pallas_mosaic_out.smem_bytes(q, p, n)
        if (q, p, n) == (128, 64, 128):
            assert pallas_mosaic_out.smem_bytes(q, p, n) == 109656
            assert pallas_mosaic_out.smem_bytes(q, p, n) <= pallas_mosaic_out.TWO_BLOCKS_SMEM
            assert allocated(whole) > pallas_mosaic_out.TWO_BLOCKS_SMEM


def _check_full_gradient(interpret, bsz, seqlen, nh, p, g, n, backward):
    """y and the gradients of ssd_mosaic_forward at block_len 128 (OUT_KERNEL already "slab")
    vs the sequential reference, relative L2 (the bf16 tolerance of test_ssd_mosaic)."""
    args, kw, dy = ssd_args(int(np.random.default_rng().integers(1 << 30)), bsz, seqlen, nh, p,
                             g, n)
    chunk = 256  # the caller's chunk size; the kernels use block_len

    def mosaic(*a):
        return pallas_mosaic.ssd_mosaic_forward(*a, chunk, block_len=128, interpret=interpret,
                                                backward=backward, **kw)

    def reference(*a):
        with jax.default_matmul_precision("highest"):
            return ssd(*a, chunk, impl="reference", **kw)

    y, vjp = jax.vjp(mosaic, *args)
    y_ref, vjp_ref = jax.vjp(reference, *args)
    assert _rel(y, y_ref) < 1.5e-2, "y"
    for name, gr, gr_ref in zip(("x", "dt", "A", "B", "C"), vjp(dy), vjp_ref(dy)):
        assert _rel(gr, gr_ref) < 1.5e-2, name


def _spy_on_slab_kernel(monkeypatch):
    calls = []
    real = pallas_mosaic_out._chunk_out_slab_mosaic

    def spy(*a, **k):
        calls.append(k["q"])
        return real(*a, **k)

    monkeypatch.setattr(pallas_mosaic_out, "_chunk_out_slab_mosaic", spy)
    monkeypatch.setattr(pallas_mosaic, "OUT_KERNEL", "slab")
    jax.clear_caches()  # the forward is jitted once per config: trace it again, with the flag
    return calls


def test_interpreter_full_gradient_with_slab_output(monkeypatch):
    """The drop-in claim end to end: ssd_mosaic_forward(block_len=128) with OUT_KERNEL = "slab"
    in the interpreters (Mosaic backward), bf16, seqlen 200 (padded to two chunks of 128), four
    heads in one group, D per channel, dt_bias, initial states: the slab kernel runs (at q 128,
    the differentiated forward) and y and the gradients match the sequential reference."""
    calls = _spy_on_slab_kernel(monkeypatch)
    _check_full_gradient(True, 1, 200, 4, 64, 1, 64, backward="mosaic")
    assert calls == [128]


def test_default_and_bad_out_kernel(monkeypatch):
    """OUT_KERNEL defaults to the whole-chunk kernel; an unknown value is a ValueError; "slab"
    falls back to the whole kernel where the slab kernel does not apply (q 64, headdim 256,
    float32)."""
    assert pallas_mosaic.OUT_KERNEL == "whole"
    sds, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
    x = sds((1, 256, 2, 64), bf16)
    b = sds((1, 256, 1, 128), bf16)
    assert pallas_mosaic._chunk_out_kernel(x, b, 128) is pallas_mosaic._chunk_out_mosaic
    monkeypatch.setattr(pallas_mosaic, "OUT_KERNEL", "slab")
    assert (pallas_mosaic._chunk_out_kernel(x, b, 128)
            is pallas_mosaic_out._chunk_out_slab_mosaic)
    assert pallas_mosaic._chunk_out_kernel(x, b, 64) is pallas_mosaic._chunk_out_mosaic
    x256 = sds((1, 256, 2, 256), bf16)  # headdim 256: the slab kernel refuses (logged)
    assert pallas_mosaic._chunk_out_kernel(x256, b, 128) is pallas_mosaic._chunk_out_mosaic
    x32 = sds((1, 2, 64, 256), jnp.float32)  # tf32 x comes transposed
    assert pallas_mosaic._chunk_out_kernel(x32, b, 128) is pallas_mosaic._chunk_out_mosaic
    monkeypatch.setattr(pallas_mosaic, "OUT_KERNEL", "tiles")
    with pytest.raises(ValueError, match="OUT_KERNEL"):
        pallas_mosaic._chunk_out_kernel(x, b, 128)


@pytest.mark.parametrize("semantics", ["lane", "warpgroup"])
def test_full_gradient_with_slab_output_lowers_for_cuda(monkeypatch, semantics):
    """jax.grad of ssd_mosaic_forward(block_len=128, backward="mosaic") with OUT_KERNEL =
    "slab" lowers for cuda on a CPU-only machine: the fused chunk-state + state-pass kernel,
    the slab output kernel and the two Mosaic backward kernels; no Triton kernel."""
    calls = _spy_on_slab_kernel(monkeypatch)
    s = jax.ShapeDtypeStruct
    b, l, h, p, g, n = 1, 256, 4, 64, 1, 128
    shapes = (s((b, l, h, p), jnp.bfloat16), s((b, l, h), jnp.float32), s((h,), jnp.float32),
              s((b, l, g, n), jnp.bfloat16), s((b, l, g, n), jnp.bfloat16))

    def loss(*a):
        y = pallas_mosaic.ssd_mosaic_forward(*a, 256, dt_softplus=True, block_len=128,
                                             semantics=semantics, backward="mosaic")
        return jnp.square(y.astype(jnp.float32)).sum()  # needs y: keeps the output kernel

    with pallas_mosaic.cuda_lowering_context():
        text = jax.jit(jax.grad(loss, argnums=tuple(range(5)))).trace(*shapes).lower(
            lowering_platforms=("cuda",)).as_text()
    assert calls == [128]
    assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 4  # 2 forward + 2 backward
    assert "triton" not in text.lower()


@pytest.mark.gpu
@pytest.mark.parametrize("name,bsz,seqlen,nh", [("1.3b-L2k", 8, 2048, 64),
                                                ("130m-L2k", 8, 2048, 24)])
@pytest.mark.parametrize("semantics", ["lane", "warpgroup"])
def test_gpu_slab_matches_whole_kernel(name, bsz, seqlen, nh, semantics):
    """The compiled slab kernel vs the compiled whole-chunk kernel at a benchmark shape (bf16,
    q 128, P 64, N 128, one group): relative L2 and the share of bitwise-equal outputs."""
    del name
    q, p, n, g = 128, 64, 128, 1
    args = _inputs(int(np.random.default_rng().integers(1 << 30)), bsz, seqlen // q, q, nh, g,
                   p, n)
    slab = jax.jit(lambda *a: pallas_mosaic_out._chunk_out_slab_mosaic(
        *a, q=q, hpg=nh // g, semantics=semantics))(*args)
    whole = jax.jit(lambda *a: pallas_mosaic._chunk_out_mosaic(
        *a, q=q, hpg=nh // g, semantics=semantics))(*args)
    assert slab.shape == whole.shape and slab.dtype == whole.dtype
    assert _rel(slab, whole) < 2e-3
    assert np.mean(np.asarray(slab == whole)) > 0.9


@pytest.mark.gpu
def test_gpu_full_gradient_with_slab_output(monkeypatch):
    """On the GPU: ssd_mosaic_forward(block_len=128, backward="mosaic") with OUT_KERNEL =
    "slab" (bf16, seqlen 300 padded to three chunks, eight heads in two groups, dstate 128) vs
    the sequential reference, forward and gradients; the slab kernel ran."""
    calls = _spy_on_slab_kernel(monkeypatch)
    _check_full_gradient(False, 2, 300, 8, 64, 2, 128, backward="mosaic")
    assert calls == [128]
