"""Tests of the Mosaic GPU SSD forward (`dimba_jax/ssd/pallas_mosaic.py`).

CPU: the module imports without a GPU, refuses unsupported calls with a ValueError, lowers for
cuda (Mosaic GPU's own layout / wgmma checks run at lowering), and its chunk-output kernel, run
in the Mosaic GPU interpreter, matches the sequential reference.
GPU (`gpu` marker): forward and every gradient vs impl="reference", fresh random inputs.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dimba_jax.ssd import pallas_mosaic, ssd

CHUNK = 256


def _rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64).ravel()
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64).ravel()
    assert np.all(np.isfinite(a)), "non-finite output"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(seed, b, l, h, p, g, n, dtype, per_channel_d=False):
    ks = jax.random.split(jax.random.key(seed), 9)
    args = (
        jax.random.normal(ks[0], (b, l, h, p)).astype(dtype),                 # x
        jax.random.normal(ks[1], (b, l, h)) - 1.0,                            # dt
        -jnp.exp(jax.random.uniform(ks[2], (h,), minval=-1.0, maxval=1.0)),   # A
        jax.random.normal(ks[3], (b, l, g, n)).astype(dtype),                 # B
        jax.random.normal(ks[4], (b, l, g, n)).astype(dtype),                 # C
    )
    kw = dict(
        D=jax.random.normal(ks[5], (h, p) if per_channel_d else (h,)),
        dt_bias=0.5 * jax.random.normal(ks[6], (h,)),
        dt_softplus=True,
        initial_states=jax.random.normal(ks[7], (b, h, p, n)),
    )
    dy = jax.random.normal(ks[8], (b, l, h, p)).astype(dtype)
    return args, kw, dy


def _reference(args, kw, final=False):
    with jax.default_matmul_precision("highest"):
        return ssd(*args, CHUNK, impl="reference", return_final_states=final, **kw)


def test_supported_reasons_and_errors_on_cpu():
    x = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    b = jnp.zeros((1, 8, 1, 128), jnp.bfloat16)
    if jax.default_backend() == "cpu":
        ok, why = pallas_mosaic.supported(x=x, B=b)
        assert not ok and "cpu" in why  # no Hopper GPU here
    ok, why = pallas_mosaic.supported(x=x.astype(jnp.float64 if jax.config.jax_enable_x64
                                                  else jnp.int32), B=b, check_device=False)
    assert not ok and "bfloat16/float16/float32" in why
    ok, why = pallas_mosaic.supported(x=x.astype(jnp.float32), B=b, block_len=128,
                                      check_device=False)
    assert not ok and "shared memory" in why  # float32 tiles at block_len 128 do not fit
    assert pallas_mosaic.supported(x=x.astype(jnp.float32), B=b, check_device=False)[0]
    ok, why = pallas_mosaic.supported(x=x, B=b[..., :32], check_device=False)
    assert not ok and "dstate" in why
    ok, why = pallas_mosaic.supported(x=x[..., :1].repeat(256, -1), B=b.repeat(2, -1),
                                      check_device=False)
    assert not ok and "shared memory" in why
    ones = jnp.ones
    args = (ones((1, 8, 2, 64)), ones((1, 8, 2)), -ones((2,)), ones((1, 8, 1, 128)),
            ones((1, 8, 1, 128)))
    with pytest.raises(ValueError, match="shared memory"):
        pallas_mosaic.ssd_mosaic_forward(*args, CHUNK, block_len=128)
    bf16 = [a.astype(jnp.bfloat16) if a.ndim == 4 else a for a in args]
    with pytest.raises(ValueError, match="seq_idx"):
        pallas_mosaic.ssd_mosaic_forward(*bf16, CHUNK, seq_idx=jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="block_len"):
        pallas_mosaic.ssd_mosaic_forward(*bf16, CHUNK, block_len=32)
    with pytest.raises(ValueError, match="semantics"):
        pallas_mosaic.ssd_mosaic_forward(*bf16, CHUNK, semantics="thread")


@pytest.mark.parametrize("dtype,block_len,semantics", [
    (jnp.bfloat16, 128, "lane"), (jnp.bfloat16, 64, "lane"), (jnp.bfloat16, 128, "warpgroup"),
    (jnp.float32, 64, "warpgroup"),
])
def test_lowers_for_cuda_on_cpu(dtype, block_len, semantics):
    """Full lowering for cuda without a GPU. Under Warpgroup semantics this runs Mosaic GPU's
    layout inference, which failed on the H200 (jax 0.11.2) for the first kernel version; that
    failure reproduces on a CPU with jax 0.11.2 (jax 0.10's inference accepted it)."""
    s = jax.ShapeDtypeStruct
    b, l, h, p, g, n = 1, 200, 4, 64, 2, 128
    shapes = (s((b, l, h, p), dtype), s((b, l, h), jnp.float32), s((h,), jnp.float32),
              s((b, l, g, n), dtype), s((b, l, g, n), dtype), s((h,), jnp.float32))

    def fwd(x, dt, A, B, C, D):
        return pallas_mosaic.ssd_mosaic_forward(x, dt, A, B, C, CHUNK, D=D, dt_softplus=True,
                                                block_len=block_len, semantics=semantics)

    def grads(*a):
        return jax.grad(lambda *z: fwd(*z).astype(jnp.float32).sum(),
                        argnums=tuple(range(6)))(*a)

    with pallas_mosaic.cuda_lowering_context():  # jax 0.11 Triton lowering: abstract H200
        fwd_text = jax.jit(fwd).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
        grad_text = jax.jit(grads).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in fwd_text  # the chunk-output stage really is a Mosaic GPU kernel
    assert "triton" in grad_text.lower()  # the backward: pallas_gpu's Triton kernels


@pytest.mark.parametrize("seqlen,dtype,tol", [(100, jnp.bfloat16, 1.5e-2), (70, jnp.float32, 1e-5)])
def test_interpreter_forward_matches_reference(seqlen, dtype, tol):
    """Chunk-output kernel in the Mosaic GPU interpreter (products as plain dots there, so
    float32 is exact up to rounding; seqlen is not a multiple of the 64-long chunks)."""
    args, kw, _ = _inputs(np.random.default_rng().integers(1 << 30), 1, seqlen, 2, 64, 1, 64,
                          dtype, per_channel_d=dtype == jnp.bfloat16)
    y, fin = pallas_mosaic.ssd_mosaic_forward(*args, CHUNK, block_len=64, interpret=True,
                                              return_final_states=True, **kw)
    y_ref, fin_ref = _reference(args, kw, final=True)
    assert y.dtype == dtype and y.shape == args[0].shape
    assert _rel(y, y_ref) < tol
    assert _rel(fin, fin_ref) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("dims,dtype,block_len,per_channel_d", [
    ((2, 300, 4, 64, 1, 128), jnp.bfloat16, 128, False),
    ((1, 517, 8, 64, 2, 64), jnp.bfloat16, 64, True),
    ((2, 256, 4, 128, 1, 128), jnp.float16, 128, False),
    ((2, 300, 4, 64, 1, 128), jnp.float32, 64, True),
])
def test_gpu_forward_and_gradients_match_reference(dims, dtype, block_len, per_channel_d):
    args, kw, dy = _inputs(np.random.default_rng().integers(1 << 30), *dims, dtype,
                           per_channel_d=per_channel_d)
    ok, why = pallas_mosaic.supported(x=args[0], B=args[3], block_len=block_len)
    assert ok, why

    def mosaic(*a):
        return pallas_mosaic.ssd_mosaic_forward(*a, CHUNK, block_len=block_len, **kw)

    y, vjp = jax.vjp(jax.jit(mosaic), *args)
    y_ref, vjp_ref = jax.vjp(lambda *a: _reference(a, kw), *args)
    tol = 2.5e-3 if dtype == jnp.float32 else 1.5e-2  # float32: tf32 tensor-core products
    assert _rel(y, y_ref) < tol
    for name, gr, gr_ref in zip(("x", "dt", "A", "B", "C"), vjp(dy), vjp_ref(dy)):
        assert _rel(gr, gr_ref) < tol, name
