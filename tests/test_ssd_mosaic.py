"""Tests of the Mosaic GPU SSD forward (`dimba_jax/ssd/pallas_mosaic.py`).

CPU: the module imports without a GPU, refuses unsupported calls with a ValueError, lowers for
cuda (Mosaic GPU's own layout / wgmma checks run at lowering), and its kernels (the fused chunk
states + state pass, and the chunk output), run in the Mosaic GPU interpreter, match the
sequential reference and a float64 NumPy state recurrence.
GPU (`gpu` marker): forward and every gradient vs impl="reference", fresh random inputs.
"""

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dimba_jax.ssd import KernelConfig, hopper, pallas_gpu, pallas_mosaic, pallas_mosaic_fwd, ssd
from _ssd_testing import check_kernel_knob, rel_error as _rel

CHUNK = 256


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
        pallas_mosaic.ssd_mosaic_forward(*args, CHUNK, kernels=KernelConfig(block_len=128))
    bf16 = [a.astype(jnp.bfloat16) if a.ndim == 4 else a for a in args]
    with pytest.raises(ValueError, match="seq_idx"):
        pallas_mosaic.ssd_mosaic_forward(*bf16, CHUNK, seq_idx=jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="block_len"):
        KernelConfig(block_len=32)
    with pytest.raises(ValueError, match="semantics"):
        pallas_mosaic.ssd_mosaic_forward(*bf16, CHUNK, semantics="thread")
    with pytest.raises(ValueError, match="KernelConfig"):
        pallas_mosaic.ssd_mosaic_forward(*bf16, CHUNK, kernels="mosaic:128")
    # The chunk-state kernel splits dstate into column blocks where the (P, N) accumulator is
    # too large for one warpgroup's registers, so it fits wherever the output kernel does.
    # headdim 128 x dstate 256: the forward fits, the (Triton) backward does not (H200).
    ok, why = pallas_mosaic.supported(x=x[..., :1].repeat(128, -1), B=b.repeat(2, -1),
                                      block_len=64, check_device=False)
    assert not ok and "backward" in why and "128 x 256" in why
    ok, why = pallas_gpu.supported(x=x[..., :1].repeat(128, -1), dt=None, A=None,
                                   B=b.repeat(2, -1), C=None, chunk_size=CHUNK)
    assert not ok and "backward" in why
    assert pallas_mosaic_fwd.state_block_cols(64, 128) == 128
    assert pallas_mosaic_fwd.state_block_cols(128, 256) == 128
    assert pallas_mosaic_fwd.state_block_cols(192, 192) == 64


@pytest.mark.parametrize("dtype,block_len,semantics,with_grad", [
    (jnp.bfloat16, 128, "lane", True), (jnp.bfloat16, 64, "lane", False),
    (jnp.bfloat16, 128, "warpgroup", False),
    (jnp.float32, 64, "warpgroup", False),
    (jnp.float32, 64, "lane", True),
])
def test_lowers_for_cuda_on_cpu(dtype, block_len, semantics, with_grad):
    """Full lowering for cuda without a GPU (the gradient too where with_grad, with the Triton
    backward; the Mosaic backward's lowering is tested in test_ssd_mosaic_bwd / _rev). Under Warpgroup
    semantics this runs Mosaic GPU's layout inference, which failed on the H200 (jax 0.11.2) for
    the first kernel version; that failure reproduces on a CPU with jax 0.11.2 (jax 0.10's
    inference accepted it)."""
    s = jax.ShapeDtypeStruct
    b, l, h, p, g, n = 1, 200, 4, 64, 2, 128
    shapes = (s((b, l, h, p), dtype), s((b, l, h), jnp.float32), s((h,), jnp.float32),
              s((b, l, g, n), dtype), s((b, l, g, n), dtype), s((h,), jnp.float32))

    def fwd(x, dt, A, B, C, D):
        return pallas_mosaic.ssd_mosaic_forward(
            x, dt, A, B, C, CHUNK, D=D, dt_softplus=True, semantics=semantics,
            kernels=KernelConfig(block_len=block_len, backward="triton"))

    def grads(*a):
        return jax.grad(lambda *z: fwd(*z).astype(jnp.float32).sum(),
                        argnums=tuple(range(6)))(*a)

    with hopper.cuda_lowering_context():  # jax 0.11 Triton lowering: abstract H200
        fwd_text = jax.jit(fwd).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
        if with_grad:
            grad_text = jax.jit(grads).trace(*shapes).lower(
                lowering_platforms=("cuda",)).as_text()
    # The forward's Mosaic GPU kernels: the fused chunk states + state pass, and chunk output.
    n_kernels = len(re.findall(r"custom_call @mosaic_gpu", fwd_text))
    assert n_kernels == 2, n_kernels
    if with_grad:
        assert "triton" in grad_text.lower()  # the backward: pallas_gpu's Triton kernels


def test_statepass_kernel_lowers_for_cuda_on_cpu():
    """The fused chunk-state + state-pass kernel alone, both semantics: bf16 (x^T as a transposed wgmma operand) at block 128, float32 (tf32, K-major
    transposed inputs) at block 64, and a dstate split into two column blocks (headdim 128,
    dstate 256). benchmarks/mosaic_probe.py --lower-only covers every configuration at the
    benchmark shapes."""
    s = jax.ShapeDtypeStruct
    f32, bf16 = jnp.float32, jnp.bfloat16
    b, l, h, g = 1, 256, 4, 2
    for p, n, dtype, q in ((64, 128, bf16, 128), (64, 128, f32, 64), (128, 256, bf16, 128)):
        tf32 = dtype == f32
        args = (s((b, h, p, l) if tf32 else (b, l, h, p), dtype),
                s((b, g, n, l) if tf32 else (b, l, g, n), dtype), s((b, h, l), f32))
        pass_args = args + (s((b, h, l // q, p), f32), s((b, h, p, n), f32))
        for semantics in ("lane", "warpgroup"):
            def statepass(*a, q=q, semantics=semantics, dtype=dtype):
                return pallas_mosaic_fwd.chunk_statepass_mosaic(*a, q=q, hpg=h // g,
                                                             hprev_dtype=dtype,
                                                             semantics=semantics)

            with hopper.cuda_lowering_context():
                lowered_pass = jax.jit(statepass).trace(*pass_args).lower(
                    lowering_platforms=("cuda",))
            assert "mosaic_gpu" in lowered_pass.as_text(), (p, n, dtype, q, semantics)
            hprev_info, fin_info = lowered_pass.out_info
            assert hprev_info.shape == (b, h, l // q, p, n) and hprev_info.dtype == dtype
            assert fin_info.shape == (b, h, p, n) and fin_info.dtype == f32


@pytest.mark.parametrize("semantics", ["lane", "warpgroup"])
def test_segmented_state_walk_lowers_for_cuda_on_cpu(semantics):
    """The two-level walk's two kernel calls (without and with the h_c stores, four segments)
    lower for cuda without a GPU; its outputs have the one-segment walk's shapes."""
    s = jax.ShapeDtypeStruct
    f32, bf16 = jnp.float32, jnp.bfloat16
    b, l, h, g, p, n, q = 1, 512, 4, 1, 64, 128, 64
    args = (s((b, l, h, p), bf16), s((b, l, g, n), bf16), s((b, h, l), f32),
            s((b, h, l // q, p), f32), s((b, h, p, n), f32))

    def walk(*a):
        return pallas_mosaic_fwd.segmented_statepass(*a, q=q, hpg=h // g, hprev_dtype=bf16,
                                                  segments=4, semantics=semantics)

    with hopper.cuda_lowering_context():
        lowered = jax.jit(walk).trace(*args).lower(lowering_platforms=("cuda",))
    assert len(re.findall(r"custom_call @mosaic_gpu", lowered.as_text())) == 2
    hprev_info, fin_info = lowered.out_info
    assert hprev_info.shape == (b, h, l // q, p, n) and hprev_info.dtype == bf16
    assert fin_info.shape == (b, h, p, n) and fin_info.dtype == f32


def _chunk_states_f64(x, bm, dt, s, q):
    """Float64 NumPy chunk states: S_c = sum_t x_t^T (dt_t exp(s_end - s_t) B_t), per head.

    x (b, Lp, h, P), bm (b, Lp, g, N), dt and s (b, h, Lp) -> (b, h, Lp // q, P, N)."""
    bsz, lp, nh, p = x.shape
    g, n = bm.shape[2], bm.shape[3]
    nc = lp // q
    xs = np.asarray(jnp.asarray(x, jnp.float32), np.float64).reshape(bsz, nc, q, nh, p)
    bs = np.asarray(jnp.asarray(bm, jnp.float32), np.float64).reshape(bsz, nc, q, g, n)
    bs = np.repeat(bs, nh // g, axis=3)
    ss = np.asarray(s, np.float64).reshape(bsz, nh, nc, q)
    w = np.asarray(dt, np.float64).reshape(bsz, nh, nc, q) * np.exp(ss[..., -1:] - ss)
    return np.einsum("bcqhp,bhcq,bcqhn->bhcpn", xs, w, bs)


def _state_walk_inputs(bsz, nc, q, nh, g, p, n, dtype):
    """Fresh random operands of the state kernels (never zero): x (b, Lp, h, P), B (b, Lp, g, N)
    in dtype; dt, s (b, h, Lp) float32 (s the chunk-local cumsum of dt * A); h0 (b, h, P, N);
    the weights w = dt exp(s_end - s) and the chunk-end decays dec (b, h, nc)."""
    lp = nc * q
    ks = jax.random.split(jax.random.key(20261204), 5)
    x = jax.random.normal(ks[0], (bsz, lp, nh, p)).astype(dtype)
    bm = jax.random.normal(ks[1], (bsz, lp, g, n)).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(ks[2], (bsz, nh, lp)) - 1.0)
    a = -jnp.exp(jax.random.uniform(ks[3], (nh,), minval=-1.0, maxval=1.0))
    s = jnp.cumsum((dt * a[None, :, None]).reshape(bsz, nh, nc, q), -1).reshape(bsz, nh, lp)
    h0 = jax.random.normal(ks[4], (bsz, nh, p, n))
    w = pallas_mosaic_fwd.state_weights(dt, s, q)
    dec = jnp.exp(s.reshape(bsz, nh, nc, q)[..., -1])
    return x, bm, dt, s, h0, w, dec


def _state_recurrence_f64(h0, dec, states):
    """float64 h_0 = h0, h_{c+1} = dec_c h_c + S_c: (the h_c entering each chunk, stacked on
    axis 2 as hprev, and the final state). h0 (b, h, P, N); dec (b, h, nc); states (b, h, nc,
    P, N)."""
    h = np.asarray(h0, np.float64)
    dec64 = np.asarray(dec, np.float64)[..., None, None]
    hprev = []
    for c in range(states.shape[2]):
        hprev.append(h)
        h = dec64[:, :, c] * h + states[:, :, c]
    return np.stack(hprev, axis=2), h


@pytest.mark.parametrize("nc,slots", [(3, 2), (5, 4)])
def test_interpreter_state_kernels_match_float64(monkeypatch, nc, slots):
    """The fused chunk-state + state-pass kernel alone in the Mosaic GPU interpreter, bf16, vs
    float64 NumPy: the recurrence h_0 = h0, h_{c+1} = exp(s_end,c) h_c + S_c. Three chunks of 64
    with two TMA slots, five with four (the slots alternate and wrap, chunks in flight before
    the walk and during it), two heads sharing one group, dstate 128 as two column blocks of 64
    (the register budget is lowered so that the small 64 x 128 state splits as 128 x 256 does).
    The float32 path runs inside the float32 forward below."""
    monkeypatch.setattr(pallas_mosaic_fwd, "_STATE_ACC_ITEMS", 64 * 64)
    dtype, p, n = jnp.bfloat16, 64, 128
    assert pallas_mosaic_fwd.state_block_cols(p, n) == 64
    q, bsz, nh, g = 64, 1, 2, 1
    x, bm, dt, s, h0, w, dec = _state_walk_inputs(bsz, nc, q, nh, g, p, n, dtype)

    states_ref = _chunk_states_f64(x, bm, dt, s, q)
    hprev, fin = pallas_mosaic_fwd.chunk_statepass_mosaic(
        x, bm, w, jnp.broadcast_to(dec[..., None], (bsz, nh, nc, p)), h0, q=q, hpg=nh // g,
        hprev_dtype=dtype, block_cols=64, slots=slots, interpret=True)
    hprev_ref, h = _state_recurrence_f64(h0, dec, states_ref)
    assert hprev.shape == (bsz, nh, nc, p, n) and hprev.dtype == dtype
    assert _rel(hprev, hprev_ref) < 1e-2  # h_c stored in bf16
    assert _rel(fin, h) < 5e-3


@pytest.mark.parametrize("segments", [2, 4])
def test_interpreter_segmented_state_walk_matches_float64(segments):
    """The two-level state walk (`segmented_statepass`: segment end states from zero, combined
    in XLA, then every segment walked from its true initial state) in the interpreter, bf16:
    h_c entering every chunk and the final state vs the float64 recurrence, and equal to the
    one-segment walk up to bf16 rounding."""
    dtype, p, n = jnp.bfloat16, 64, 64
    q, bsz, nc, nh, g = 64, 2, 4, 2, 1
    x, bm, dt, s, h0, w, dec = _state_walk_inputs(bsz, nc, q, nh, g, p, n, dtype)
    dec_rows = jnp.broadcast_to(dec[..., None], (bsz, nh, nc, p))
    kw = dict(q=q, hpg=nh // g, hprev_dtype=dtype, interpret=True)
    hprev, fin = pallas_mosaic_fwd.segmented_statepass(x, bm, w, dec_rows, h0, segments=segments,
                                                    **kw)
    hprev1, fin1 = pallas_mosaic_fwd.segmented_statepass(x, bm, w, dec_rows, h0, segments=1, **kw)
    states_ref = _chunk_states_f64(x, bm, dt, s, q)
    hprev_ref, h = _state_recurrence_f64(h0, dec, states_ref)
    assert hprev.shape == (bsz, nh, nc, p, n) and hprev.dtype == dtype and fin.shape == h0.shape
    assert _rel(hprev, hprev_ref) < 1e-2  # h_c stored in bf16
    assert _rel(fin, h) < 5e-3
    assert _rel(hprev, hprev1) < 1e-2 and _rel(fin, fin1) < 1e-3


@pytest.mark.parametrize("programs,nc,want", [
    (48, 512, 4),    # 130m-L32k at chunk 64: 24 heads x 2 column blocks, one sequence
    (48, 256, 4),    # the same at chunk 128
    (96, 128, 2),    # 130m-L8k (two sequences)
    (384, 32, 1),    # 130m-L2k: enough programs already
    (4, 32, 4),      # few programs, but at least 8 chunks per segment
    (4, 12, 1),      # 12 chunks: two segments of 6 are too short
])
def test_statepass_segments(programs, nc, want):
    assert pallas_mosaic_fwd.statepass_segments(programs, nc) == want


@pytest.mark.parametrize("seqlen,dtype,tol", [(70, jnp.bfloat16, 1.5e-2), (150, jnp.float32, 1e-5)])
def test_interpreter_forward_matches_reference(seqlen, dtype, tol):
    """The Mosaic forward (fused chunk-state + state-pass kernel, and the chunk-output kernel) in the Mosaic GPU interpreter (products as plain dots there, so float32
    is exact up to rounding; seqlen is not a multiple of the 64-long chunks)."""
    args, kw, _ = _inputs(20261204, 1, seqlen, 2, 64, 1, 64,
                          dtype, per_channel_d=dtype == jnp.bfloat16)
    y, fin = pallas_mosaic.ssd_mosaic_forward(*args, CHUNK, interpret=True,
                                              return_final_states=True, **kw,
                                              kernels=KernelConfig(block_len=64, backward="triton"))
    y_ref, fin_ref = _reference(args, kw, final=True)
    assert y.dtype == dtype and y.shape == args[0].shape
    assert _rel(y, y_ref) < tol
    assert _rel(fin, fin_ref) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("dims,dtype,block_len,per_channel_d,backward", [
    ((2, 300, 4, 64, 1, 128), jnp.bfloat16, 128, False, "triton"),
    ((1, 517, 8, 64, 2, 64), jnp.bfloat16, 64, True, "triton"),
    ((2, 256, 4, 128, 1, 128), jnp.float16, 128, False, "triton"),
    ((1, 200, 4, 64, 1, 256), jnp.float16, 64, False, "triton"),  # dstate 256
    ((2, 300, 4, 64, 1, 128), jnp.float32, 64, True, "triton"),
    ((1, 4096, 2, 64, 1, 128), jnp.bfloat16, 128, False, "mosaic"),
])
def test_gpu_forward_and_gradients_match_reference(dims, dtype, block_len, per_channel_d, backward):
    args, kw, dy = _inputs(20261204, *dims, dtype,
                           per_channel_d=per_channel_d)
    ok, why = pallas_mosaic.supported(x=args[0], B=args[3], block_len=block_len)
    assert ok, why

    if backward == "mosaic":  # at 4096 positions: the two-level walks both ways
        nc = -(-dims[1] // block_len)
        programs = dims[0] * dims[2] * 2  # dstate 128 in two 64-wide column blocks
        assert dims[1] < 4096 or pallas_mosaic_fwd.statepass_segments(programs, nc) == 4

    def mosaic(*a):
        return pallas_mosaic.ssd_mosaic_forward(
            *a, CHUNK, **kw, kernels=KernelConfig(block_len=block_len, backward=backward))

    y, vjp = jax.vjp(jax.jit(mosaic), *args)
    y_ref, vjp_ref = jax.vjp(lambda *a: _reference(a, kw), *args)
    tol = 2.5e-3 if dtype == jnp.float32 else 1.5e-2  # float32: tf32 tensor-core products
    assert _rel(y, y_ref) < tol
    _, fin = jax.jit(lambda *a: pallas_mosaic.ssd_mosaic_forward(
        *a, CHUNK, return_final_states=True, **kw,
        kernels=KernelConfig(block_len=block_len, backward="triton")))(*args)
    assert _rel(fin, _reference(args, kw, final=True)[1]) < tol
    for name, gr, gr_ref in zip(("x", "dt", "A", "B", "C"), vjp(dy), vjp_ref(dy)):
        assert _rel(gr, gr_ref) < tol, name


def test_rechunk_cumsum_matches_a_fresh_cumsum():
    """Chunk-local sums at 128 turned into those at 64 equal the cumsum restarted every 64."""
    a = jax.random.normal(jax.random.key(20261204),
                          (2, 3, 512))
    s128 = jnp.cumsum(a.reshape(2, 3, 4, 128), -1).reshape(2, 3, 512)
    s64 = jnp.cumsum(a.reshape(2, 3, 8, 64), -1).reshape(2, 3, 512)
    np.testing.assert_allclose(pallas_mosaic_fwd.rechunk_cumsum(s128, 128, 64), s64, atol=1e-5)
    assert pallas_mosaic_fwd.rechunk_cumsum(s128, 128, 128) is s128


def test_forward_only_calls_run_at_the_forward_only_chunk(monkeypatch):
    """Without differentiation the custom_vjp's primal runs the kernels at chunk 64; under
    jax.vjp the forward rule keeps chunk 128 (the backward needs its states). Same y either
    way, and both match the reference (Mosaic interpreter; bf16 inputs)."""
    seen = []
    real = pallas_mosaic._fwd_impl

    def spy(x, b, c, dt, s, h0, d, q, *rest):  # runs when traced: once per distinct call
        seen.append(q)
        return real(x, b, c, dt, s, h0, d, q, *rest)

    monkeypatch.setattr(pallas_mosaic, "_fwd_impl_once",
                        jax.jit(spy, static_argnums=(7, 8, 9, 10)))
    args, kw, dy = _inputs(20261204, 1, 200, 2, 64, 1, 64,
                           jnp.bfloat16)

    def f(*a):
        return pallas_mosaic.ssd_mosaic_forward(
            *a, CHUNK, interpret=True, **kw, kernels=KernelConfig(block_len=128, backward="triton"))

    y_primal = f(*args)
    assert seen == [64]
    y_rule, _ = jax.vjp(f, *args)
    assert seen == [64, 128]
    y_ref = _reference(args, kw)
    assert _rel(y_primal, y_ref) < 1.5e-2 and _rel(y_rule, y_ref) < 1.5e-2
    assert _rel(y_primal, y_rule) < 1e-2


def test_kernels_are_lowered_once_per_program_not_per_call_site():
    """A model calls the SSD once per layer (twice in a bidirectional block). The custom_vjp's
    forward and backward are jitted module-level functions, so every layer shares their
    lowering: the number of Mosaic GPU kernels in the gradient program of a 3-layer stack
    equals that of a 5-layer one (without this it grew by four per layer, and the configs/base.py
    train step spent minutes compiling the same kernels 48 times)."""
    s = jax.ShapeDtypeStruct
    b, l, h, p, g, n = 1, 256, 2, 64, 1, 128
    shapes = (s((b, l, h, p), jnp.bfloat16), s((b, l, h), jnp.float32), s((h,), jnp.float32),
              s((b, l, g, n), jnp.bfloat16), s((b, l, g, n), jnp.bfloat16))

    def kernels(layers):
        def loss(x, dt, A, B, C):
            for _ in range(layers):
                x = pallas_mosaic.ssd_mosaic_forward(x, dt, A, B, C, CHUNK, dt_softplus=True,
                                                     kernels=KernelConfig(backward="mosaic"))
            return x.astype(jnp.float32).sum()

        with hopper.cuda_lowering_context():
            text = jax.jit(jax.grad(loss, argnums=(0, 3, 4))).trace(*shapes).lower(
                lowering_platforms=("cuda",)).as_text()
        return len(re.findall(r"custom_call @mosaic_gpu", text))

    assert kernels(3) == kernels(5) <= 4 * 3


def test_two_warpgroup_chunk_output_in_the_interpreter():
    """chunk_out_mosaic(warpgroups=2) at chunk 128 (warpgroup k: rows [64 k, 64 k + 64) over
    the causal columns) gives the one-warpgroup kernel's y bit for bit; at chunk 64, or with
    float32 x, it runs one warpgroup; any count but 1 or 2 is refused."""
    args, kw, _ = _inputs(7, 1, 128, 1, 64, 1, 64, jnp.bfloat16, per_channel_d=True)
    x, dt, a, bm, cm = args
    q = 128
    dtk = jax.nn.softplus(dt + kw["dt_bias"]).transpose(0, 2, 1)          # (b, h, L)
    s = jnp.cumsum(dtk * a[None, :, None], -1)
    hprev = (0.3 * jax.random.normal(jax.random.key(8), (1, 1, 1, 64, 64))).astype(x.dtype)
    d = jnp.broadcast_to(kw["D"].reshape(1, -1), (1, 64)).astype(jnp.float32)
    run = lambda wgs: pallas_mosaic_fwd.chunk_out_mosaic(  # noqa: E731
        x, bm, cm, dtk, s, hprev, d, q=q, hpg=1, interpret=True, warpgroups=wgs)
    np.testing.assert_array_equal(np.asarray(run(2), np.float32), np.asarray(run(1), np.float32))
    with pytest.raises(ValueError, match="warpgroups must be 1 or 2"):
        run(3)


def test_output_warpgroups_reach_the_chunk_output_kernel(monkeypatch):
    """KernelConfig.output_warpgroups (from config.model.ssd_output_warpgroups, 2 by default)
    reaches chunk_out_mosaic, and the two-warpgroup kernel lowers for cuda inside the forward
    (chunk 128, the sampler's forward-only chunk)."""
    check_kernel_knob("output_warpgroups", 2, 1, 0)
    seen = []
    real = pallas_mosaic_fwd.chunk_out_mosaic

    def spy(*a, **k):
        seen.append(k["warpgroups"])
        return real(*a, **k)

    monkeypatch.setattr(pallas_mosaic_fwd, "chunk_out_mosaic", spy)
    jax.clear_caches()  # the forward is jitted once per config: trace it again, with the spy
    s = jax.ShapeDtypeStruct
    b, l, h, p, g, n = 1, 256, 2, 64, 1, 128
    shapes = (s((b, l, h, p), jnp.bfloat16), s((b, l, h), jnp.float32), s((h,), jnp.float32),
              s((b, l, g, n), jnp.bfloat16), s((b, l, g, n), jnp.bfloat16))

    def forward(*a):
        return pallas_mosaic.ssd_mosaic_forward(
            *a, CHUNK, dt_softplus=True,
            kernels=KernelConfig(block_len=128, forward_only_block_len=None, output_warpgroups=2))

    with hopper.cuda_lowering_context():
        text = jax.jit(forward).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert seen == [2] and "custom_call @mosaic_gpu" in text


@pytest.mark.gpu
def test_gpu_two_warpgroup_chunk_output_and_gradients():
    """Compiled, chunk 128, bf16: y and every gradient with two warpgroups in the chunk output
    and the chunk backward match the one-warpgroup kernels (the chunk backward's bit for bit
    is its own test) and the reference."""
    args, kw, dy = _inputs(20261207, 2, 1024, 4, 64, 2, 128, jnp.bfloat16)

    def run(wgs):
        def f(*a):
            return pallas_mosaic.ssd_mosaic_forward(
                *a, CHUNK, **kw, kernels=KernelConfig(block_len=128, backward="mosaic",
                                                      backward_warpgroups=wgs,
                                                      output_warpgroups=wgs))
        y, vjp = jax.vjp(jax.jit(f), *args)
        return y, vjp(dy)

    (y1, g1), (y2, g2) = run(1), run(2)
    y_ref, vjp_ref = jax.vjp(lambda *a: _reference(a, kw), *args)
    assert _rel(y2, y1) < 1e-3 and _rel(y2, y_ref) < 1.5e-2
    for name, a, b, r in zip(("x", "dt", "A", "B", "C"), g1, g2, vjp_ref(dy)):
        assert _rel(b, a) < 1e-3 and _rel(b, r) < 1.5e-2, name


def _out_operands(seed, b, l, h, p, g, n, q, dtype=jnp.bfloat16):
    """chunk_out_mosaic's operands: x, B, C in `dtype`, processed dt and its chunk-local cumsum
    s (b, h, L) float32, the incoming states hprev (b, h, L / q, P, N) and D (h, P)."""
    ks = jax.random.split(jax.random.key(seed), 7)
    dtk = jax.nn.softplus(jax.random.normal(ks[3], (b, h, l)) - 1.0)
    a = -jnp.exp(jax.random.uniform(ks[4], (h,), minval=-1.0, maxval=1.0))
    s = jnp.cumsum((dtk * a[None, :, None]).reshape(b, h, l // q, q), -1).reshape(b, h, l)
    return (jax.random.normal(ks[0], (b, l, h, p)).astype(dtype),
            jax.random.normal(ks[1], (b, l, g, n)).astype(dtype),
            jax.random.normal(ks[2], (b, l, g, n)).astype(dtype), dtk, s,
            (0.3 * jax.random.normal(ks[5], (b, h, l // q, p, n))).astype(dtype),
            jax.random.normal(ks[6], (h, p)))


@pytest.mark.parametrize("programs,slots", [(1, 2), (4, 2), (1, 3)])
def test_persistent_chunk_output_in_the_interpreter(programs, slots):
    """chunk_out_persistent_mosaic gives chunk_out_mosaic(warpgroups=2)'s y bit for bit: one
    program walking all six tiles (every slot refilled), the tiles dealt unevenly over four
    programs, three slots in flight."""
    args = _out_operands(11, 1, 256, 3, 64, 1, 64, 128)
    want = pallas_mosaic_fwd.chunk_out_mosaic(*args, q=128, hpg=3, interpret=True, warpgroups=2)
    got = pallas_mosaic_fwd.chunk_out_persistent_mosaic(*args, q=128, hpg=3, interpret=True,
                                                        programs=programs, slots=slots)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_persistent_chunk_output_refuses_what_it_does_not_take():
    """One-line errors for float32 x, chunk 64, tiles past shared memory, fewer than 2 slots."""
    f = pallas_mosaic_fwd.chunk_out_persistent_mosaic
    x, b, c, dtk, s, h, d = _out_operands(12, 1, 128, 2, 64, 1, 64, 128)
    with pytest.raises(ValueError, match="bfloat16/float16"):
        f(x.astype(jnp.float32), b, c, dtk, s, h, d, q=128, hpg=2, interpret=True)
    with pytest.raises(ValueError, match="block_len 128"):
        f(x, b, c, dtk, s, h, d, q=64, hpg=2, interpret=True)
    with pytest.raises(ValueError, match="slots must be >= 2"):
        f(x, b, c, dtk, s, h, d, q=128, hpg=2, interpret=True, slots=1)
    wide = jnp.zeros((1, 128, 2, 128), jnp.bfloat16), jnp.zeros((1, 128, 1, 128), jnp.bfloat16)
    assert "shared memory" in pallas_mosaic_fwd.persistent_error(*wide, 128)
    assert pallas_mosaic_fwd.persistent_error(x, b, 128) == ""
    assert (pallas_mosaic_fwd.persistent_smem_bytes(128, 64, 128)
            <= hopper.SMEM_LIMIT < pallas_mosaic_fwd.persistent_smem_bytes(128, 64, 128, slots=3))


def test_output_persistent_gives_the_same_forward_in_the_interpreter():
    """ssd_mosaic_forward at chunk 128 in the Mosaic GPU interpreter: y and the final states
    with `KernelConfig.output_persistent` are those of the per-tile chunk output, bit for
    bit (the prologue and state pass are shared; the output kernels give the same y)."""
    args, kw, _ = _inputs(3, 1, 256, 2, 64, 1, 64, jnp.bfloat16)
    y0, fin0, y1, fin1 = (
        v for persistent in (False, True)
        for v in pallas_mosaic.ssd_mosaic_forward(
            *args, 128, interpret=True, return_final_states=True, **kw,
            kernels=KernelConfig(block_len=128, forward_only_block_len=None,
                                 output_persistent=persistent)))
    np.testing.assert_array_equal(np.asarray(y1, np.float32), np.asarray(y0, np.float32))
    np.testing.assert_array_equal(np.asarray(fin1), np.asarray(fin0))


@pytest.mark.parametrize("semantics", ["lane", "warpgroup"])
def test_output_persistent_reaches_the_chunk_output_and_lowers(monkeypatch, semantics):
    """KernelConfig.output_persistent (config.model.ssd_output_persistent: on in the models,
    off in ssd()'s default) runs the persistent kernel in the forward of chunk 128, and the
    forward with its gradient lowers for cuda at base sizes (Mosaic GPU checks shared memory,
    layouts and wgmma shapes while lowering)."""
    from dimba_jax.config import default_config
    m = default_config().model
    assert KernelConfig.from_config(m).output_persistent is True
    assert KernelConfig().output_persistent is False
    seen = []
    real = pallas_mosaic_fwd.chunk_out_persistent_mosaic

    def spy(*a, **k):
        seen.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(pallas_mosaic_fwd, "chunk_out_persistent_mosaic", spy)
    jax.clear_caches()
    s = jax.ShapeDtypeStruct
    b, l, h, p, g, n = 1, 1024, 8, 64, 2, 128
    shapes = (s((b, l, h, p), jnp.bfloat16), s((b, l, h), jnp.float32), s((h,), jnp.float32),
              s((b, l, g, n), jnp.bfloat16), s((b, l, g, n), jnp.bfloat16))
    kernels = KernelConfig(block_len=128, forward_only_block_len=None, output_persistent=True)

    def loss(*a):
        y = pallas_mosaic.ssd_mosaic_forward(*a, CHUNK, dt_softplus=True, kernels=kernels,
                                             semantics=semantics)
        return y.astype(jnp.float32).sum()

    with hopper.cuda_lowering_context():
        text = jax.jit(jax.value_and_grad(loss, argnums=(0, 3, 4))).trace(*shapes).lower(
            lowering_platforms=("cuda",)).as_text()
    assert seen == [(b, l, h, p)] and "custom_call @mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.parametrize("b,l,h,g", [(1, 1024, 48, 2), (4, 1024, 48, 2), (2, 2048, 24, 1)])
def test_gpu_persistent_chunk_output_matches_the_per_tile_kernel(b, l, h, g):
    """Compiled, bf16, chunk 128: the persistent chunk output's y equals the per-tile
    two-warpgroup kernel's bit for bit (the sampler's batch 1 with both directions' 48 heads,
    a training-like batch, one group), and so do the SSD forward and every gradient with
    `output_persistent` on and off."""
    args = _out_operands(20261208, b, l, h, 64, g, 128, 128)
    want = pallas_mosaic_fwd.chunk_out_mosaic(*args, q=128, hpg=h // g, warpgroups=2)
    got = pallas_mosaic_fwd.chunk_out_persistent_mosaic(*args, q=128, hpg=h // g)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    sargs, kw, dy = _inputs(20261208, b, l, h, 64, g, 128, jnp.bfloat16)

    def run(persistent):
        def f(*a):
            return pallas_mosaic.ssd_mosaic_forward(
                *a, CHUNK, **kw, kernels=KernelConfig(block_len=128, forward_only_block_len=None,
                                                      output_persistent=persistent))
        y, vjp = jax.vjp(jax.jit(f), *sargs)
        return y, vjp(dy)

    (y0, g0), (y1, g1) = run(False), run(True)
    np.testing.assert_array_equal(np.asarray(y1, np.float32), np.asarray(y0, np.float32))
    for a, c in zip(g0, g1):
        np.testing.assert_array_equal(np.asarray(c, np.float32), np.asarray(a, np.float32))
