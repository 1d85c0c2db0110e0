"""The one-launch SSD forward (ssd/pallas_seq.py) against the sequential recurrence
(`reference_scan`) in the Pallas interpreter; its sizes, its place in the Mosaic path
(KernelConfig.forward_only_kernel: forward-only calls only) and its Triton lowering for CUDA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _ssd_testing import rel_error, ssd_args
from dimba_jax.ssd import KernelConfig, pallas_gpu, pallas_mosaic, pallas_seq
from dimba_jax.ssd.reference import reference_scan


def _reference(x, dt, A, B, C, D, h0, dt_bias):
    """y (with the D skip) and the final state of the float32 sequential recurrence."""
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    dts = jax.nn.softplus(dt + dt_bias)
    y, fin = reference_scan(f32(x), dts, A, f32(B), f32(C), initial_states=h0)
    return y + D[None, None] * f32(x), fin


@pytest.mark.parametrize("dtype,seqlen,q,block_p,g", [
    (jnp.float32, 100, 32, 16, 2),  # 100 -> 128: padded rows; two groups
    (jnp.bfloat16, 64, 16, 32, 1),
    (jnp.bfloat16, 96, 32, 16, 4),  # one head per group
])
def test_kernel_matches_the_sequential_recurrence(dtype, seqlen, q, block_p, g):
    """y and the final state against reference_scan: initial state and D (nheads, P) given,
    then a zero initial state made in the kernel and D (nheads,)."""
    (x, dt, A, B, C), kw, _ = ssd_args(seqlen + q, 2, seqlen, 4, 32, g, 16)
    x, B, C = x.astype(dtype), B.astype(dtype), C.astype(dtype)
    h0, D = kw["initial_states"], kw["D"]
    want_y, want_fin = _reference(x, dt, A, B, C, D, h0, kw["dt_bias"])
    xk, bk, ck, dtk, _, h0k = pallas_gpu.prepare_chunks(
        x, dt, A, B, C, q, dtype, dt_bias=kw["dt_bias"], dt_softplus=True, initial_states=h0)
    y, fin = jax.jit(functools.partial(pallas_seq.ssd_seq_forward, q=q, hpg=4 // g,
                                       block_p=block_p, interpret=True))(
        xk, bk, ck, dtk, A, h0k, D.astype(jnp.float32))
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert y.dtype == dtype and fin.dtype == jnp.float32
    assert rel_error(y[:, :seqlen], want_y) < tol
    assert rel_error(fin, want_fin) < tol
    y0, fin0 = jax.jit(functools.partial(pallas_seq.ssd_seq_forward, q=q, hpg=4 // g,
                                         block_p=block_p, interpret=True))(
        xk, bk, ck, dtk, A, None, D[:, 0])  # h0 None: a zero initial state; D (nheads,)
    want_y0, want_fin0 = _reference(x, dt, A, B, C, D[:, :1], jnp.zeros_like(h0),
                                    kw["dt_bias"])
    assert rel_error(y0[:, :seqlen], want_y0) < tol and rel_error(fin0, want_fin0) < tol


def test_sizes_it_does_not_take_are_refused_with_the_reason():
    """supported_seq names the size; ssd_seq_forward raises one ValueError line."""
    assert pallas_seq.supported_seq(headdim=64, dstate=128, dtype=jnp.bfloat16) == (True, "")
    for kw, word in ((dict(headdim=24, dstate=128), "block_p"),
                     (dict(headdim=64, dstate=96), "dstate"),
                     (dict(headdim=64, dstate=128, q=256), "chunk")):
        ok, why = pallas_seq.supported_seq(dtype=jnp.bfloat16, **kw)
        assert not ok and word in why
    assert "dtype" in pallas_seq.supported_seq(headdim=64, dstate=128, dtype=jnp.int8)[1]
    x = jnp.zeros((1, 40, 2, 32), jnp.bfloat16)  # 40 is not a multiple of the chunk 64
    bc = jnp.zeros((1, 40, 1, 16), jnp.bfloat16)
    v = jnp.zeros((1, 2, 40))
    with pytest.raises(ValueError, match="ssd_seq_forward: .*do not fit"):
        pallas_seq.ssd_seq_forward(x, bc, bc, v, jnp.zeros(2), jnp.zeros((1, 2, 32, 16)),
                                   jnp.zeros((2, 32)), hpg=2, interpret=True)


def test_kernel_config_field_and_its_config_key():
    """forward_only_kernel: "mosaic" by default, from config.model.ssd_forward_only_kernel,
    an unknown value refused."""
    from dimba_jax.config import default_config

    assert KernelConfig().forward_only_kernel == "mosaic"
    m = default_config().model
    assert KernelConfig.from_config(m).forward_only_kernel == m.ssd_forward_only_kernel
    m.ssd_forward_only_kernel = "sequential"
    assert KernelConfig.from_config(m).forward_only_kernel == "sequential"
    with pytest.raises(ValueError, match="KernelConfig.forward_only_kernel"):
        KernelConfig(forward_only_kernel="cuda")


def test_mosaic_path_runs_it_for_forward_only_calls_only():
    """ssd_mosaic_forward with forward_only_kernel "sequential": the forward-only call is the
    one-launch kernel (its y equals the recurrence's), a differentiated call keeps the Mosaic
    kernels (their jaxpr has no ssd_seq_fwd)."""
    (x, dt, A, B, C), kw, _ = ssd_args(7, 1, 200, 8, 64, 1, 64)
    f = functools.partial(pallas_mosaic.ssd_mosaic_forward, chunk_size=128, interpret=True,
                          kernels=KernelConfig(forward_only_kernel="sequential"), **kw)
    assert "ssd_seq_fwd" in str(jax.make_jaxpr(f)(x, dt, A, B, C))
    assert "ssd_seq_fwd" not in str(jax.make_jaxpr(
        jax.grad(lambda x: f(x, dt, A, B, C).astype(jnp.float32).sum()))(x))
    want_y, _ = _reference(x, dt, A, B, C, kw["D"], kw["initial_states"], kw["dt_bias"])
    assert rel_error(jax.jit(f)(x, dt, A, B, C), want_y) < 1e-2
    kw.pop("initial_states")  # the sampler's call: a zero initial state, made in the kernel
    f0 = functools.partial(f, initial_states=None)
    want_y0, _ = _reference(x, dt, A, B, C, kw["D"], jnp.zeros((1, 8, 64, 64)), kw["dt_bias"])
    assert rel_error(jax.jit(f0)(x, dt, A, B, C), want_y0) < 1e-2


@pytest.mark.parametrize("lp", [1024, 1088])
def test_kernel_lowers_to_triton_for_cuda(lp):
    """Lowers through the Pallas Triton backend (no GPU needed) at the base config's batch-1
    SSD call (48 heads: both directions, 2 groups, P 64, N 128), also at a length that is not
    a power of two, with the zero initial state made in the kernel and D per head."""
    from dimba_jax.ssd.hopper import cuda_lowering_context

    S = jax.ShapeDtypeStruct
    args = (S((1, lp, 48, 64), jnp.bfloat16), S((1, lp, 2, 128), jnp.bfloat16),
            S((1, lp, 2, 128), jnp.bfloat16), S((1, 48, lp), jnp.float32),
            S((48,), jnp.float32), S((1, 48, 64, 128), jnp.float32),
            S((48, 64), jnp.float32))
    def f(x, b, c, dt, A, h0, d):  # at 1088 without an initial state and with D per head
        if lp == 1024:
            return pallas_seq.ssd_seq_forward(x, b, c, dt, A, h0, d, hpg=24)
        return pallas_seq.ssd_seq_forward(x, b, c, dt, A, None, d[:, 0], hpg=24)

    with cuda_lowering_context():
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1


@pytest.mark.gpu
def test_compiled_kernel_matches_the_recurrence_on_gpu():
    """Compiled at a batch-1 sampler shape (L 1000 padded to 1024, 48 heads in 2 groups,
    P 64, N 128, bf16): y and the final state against reference_scan."""
    (x, dt, A, B, C), kw, _ = ssd_args(11, 1, 1000, 48, 64, 2, 128)
    want_y, want_fin = _reference(x, dt, A, B, C, kw["D"], kw["initial_states"], kw["dt_bias"])
    xk, bk, ck, dtk, _, h0k = pallas_gpu.prepare_chunks(
        x, dt, A, B, C, 64, jnp.bfloat16, dt_bias=kw["dt_bias"], dt_softplus=True,
        initial_states=kw["initial_states"])
    y, fin = jax.jit(functools.partial(pallas_seq.ssd_seq_forward, hpg=24))(
        xk, bk, ck, dtk, A, h0k, kw["D"])
    assert rel_error(y[:, :1000], want_y) < 1e-2
    assert rel_error(fin, want_fin) < 1e-2
    np.testing.assert_array_equal(np.isfinite(np.asarray(y, np.float32)), True)
