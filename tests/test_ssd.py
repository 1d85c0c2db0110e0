"""Tests of dimba_jax.ssd.ssd: the chunked XLA scan against the sequential reference, the
reference against an independent float64 numpy loop, gradients, bf16, input validation and the
impl dispatch. Tiny shapes, CPU."""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dimba_jax.ssd as ssd_package
from dimba_jax.ssd import hopper, resolve_impl, ssd


def make_inputs(seed, batch=2, seqlen=19, nheads=4, headdim=3, ngroups=2, dstate=5,
                dtype=jnp.float32, n_segments=0, init=False, D="none", z=False, dt_bias=False):
    """Random SSD inputs; dt is raw (apply softplus in the call for positive steps)."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), dtype=jnp.float32)

    args = dict(
        x=normal(batch, seqlen, nheads, headdim).astype(dtype),
        dt=normal(batch, seqlen, nheads).astype(dtype),
        A=-jnp.asarray(rng.uniform(0.5, 2.0, nheads), jnp.float32),
        B=normal(batch, seqlen, ngroups, dstate).astype(dtype),
        C=normal(batch, seqlen, ngroups, dstate).astype(dtype),
    )
    kwargs = {}
    if n_segments:
        cuts = np.sort(rng.choice(np.arange(1, seqlen), size=(batch, n_segments), replace=True), axis=1)
        seq_idx = np.zeros((batch, seqlen), np.int32)
        for b in range(batch):
            for cut in cuts[b]:
                seq_idx[b, cut:] += 1
        kwargs["seq_idx"] = jnp.asarray(seq_idx)
    if init:
        kwargs["initial_states"] = normal(batch, nheads, headdim, dstate)
    if D == "head":
        kwargs["D"] = normal(nheads)
    elif D == "channel":
        kwargs["D"] = normal(nheads, headdim)
    if z:
        kwargs["z"] = normal(batch, seqlen, nheads, headdim).astype(dtype)
    if dt_bias:
        kwargs["dt_bias"] = normal(nheads, scale=0.5)
    return args, kwargs


def run_ssd(args, kw=None, **static):
    """ssd(**args, **kw, **static) under one jit (array arguments traced, options static)."""
    return jax.jit(lambda a, k: ssd(**a, **k, **static))(args, kw or {})


def max_rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ------------------------------------------------------------------ reference vs float64 numpy
def numpy_recurrence(x, dt, A, B, C, D, z, dt_bias, seq_idx, h0):
    """Independent float64 loop over (batch, time, head) of the Mamba-2 recurrence."""
    x, dt, A, B, C, D, z, dt_bias, h0 = (np.asarray(v, np.float64) for v in (x, dt, A, B, C, D, z, dt_bias, h0))
    batch, seqlen, nheads, headdim = x.shape
    ngroups = B.shape[2]
    y = np.zeros_like(x)
    final = np.zeros_like(h0)
    for b in range(batch):
        for hd in range(nheads):
            g = hd // (nheads // ngroups)
            state = h0[b, hd].copy()
            for t in range(seqlen):
                if t > 0 and seq_idx[b, t] != seq_idx[b, t - 1]:
                    state[:] = 0.0
                step = math.log1p(math.exp(dt[b, t, hd] + dt_bias[hd]))
                state = math.exp(step * A[hd]) * state + step * np.outer(x[b, t, hd], B[b, t, g])
                out = state @ C[b, t, g] + D[hd] * x[b, t, hd]
                gate = z[b, t, hd] / (1.0 + np.exp(-z[b, t, hd]))
                y[b, t, hd] = out * gate
            final[b, hd] = state
    return y, final


def test_reference_matches_float64_numpy_loop():
    args, kw = make_inputs(0, batch=2, seqlen=9, nheads=4, headdim=2, ngroups=2, dstate=3,
                           n_segments=1, init=True, D="channel", z=True, dt_bias=True)
    y, final = run_ssd(args, kw, chunk_size=4, dt_softplus=True, return_final_states=True,
                       impl="reference")
    y_np, final_np = numpy_recurrence(args["x"], args["dt"], args["A"], args["B"], args["C"],
                                      kw["D"], kw["z"], kw["dt_bias"], np.asarray(kw["seq_idx"]),
                                      kw["initial_states"])
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(final), final_np, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ xla vs reference, forward
FORWARD_CASES = [
    # (seed, shape overrides, chunk, options, dt mode)
    (1, dict(seqlen=16, ngroups=1), 4, dict(), "softplus"),
    (2, dict(seqlen=19, ngroups=2), 8, dict(D="head", dt_bias=True), "limit"),  # seqlen % chunk != 0
    (3, dict(seqlen=23, nheads=6, ngroups=3), 5, dict(n_segments=3, D="channel", z=True), "softplus"),
    (4, dict(seqlen=7, ngroups=1), 16, dict(init=True, dt_bias=True), "limit"),  # one short chunk
    (5, dict(seqlen=33, nheads=4, ngroups=4), 8, dict(n_segments=2, init=True, z=True), "limit"),
    (6, dict(seqlen=1, batch=3), 4, dict(init=True, D="head"), "softplus"),
    (7, dict(seqlen=30, ngroups=2, dstate=8, headdim=4), 6,
     dict(n_segments=4, init=True, D="channel", z=True, dt_bias=True), "softplus"),
]


@pytest.mark.parametrize("seed,shape,chunk,opts,dt_mode", FORWARD_CASES)
def test_xla_matches_reference(seed, shape, chunk, opts, dt_mode):
    args, kw = make_inputs(seed, **shape, **opts)
    if dt_mode == "softplus":
        dt_opts = dict(dt_softplus=True)
    else:  # raw dt (negatives clip to the lower limit) with a finite upper limit
        dt_opts = dict(dt_softplus=False, dt_limit=(0.05, 0.9))
    y_ref, f_ref = run_ssd(args, kw, chunk_size=chunk, return_final_states=True, impl="reference", **dt_opts)
    y_xla, f_xla = run_ssd(args, kw, chunk_size=chunk, return_final_states=True, impl="xla", **dt_opts)
    assert y_xla.shape == args["x"].shape and y_xla.dtype == args["x"].dtype
    assert f_xla.shape == f_ref.shape == (args["x"].shape[0], args["x"].shape[2], args["x"].shape[3], args["B"].shape[3])
    assert max_rel_err(y_xla, y_ref) < 2e-5
    assert max_rel_err(f_xla, f_ref) < 2e-5


def test_seq_idx_resets_state_like_separate_sequences():
    """Packing two sequences with seq_idx equals running them separately (initial state on the first only)."""
    args, kw = make_inputs(11, batch=1, seqlen=21, ngroups=1, init=True)
    split = 9
    seq_idx = jnp.asarray([[0] * split + [1] * (21 - split)])
    packed, final = run_ssd(args, dict(kw, seq_idx=seq_idx), chunk_size=4, dt_softplus=True,
                            return_final_states=True, impl="xla")
    first = {k: v[:, :split] for k, v in args.items() if k != "A"}
    second = {k: v[:, split:] for k, v in args.items() if k != "A"}
    y1 = run_ssd(dict(first, A=args["A"]), kw, chunk_size=4, dt_softplus=True, impl="reference")
    y2, f2 = run_ssd(dict(second, A=args["A"]), chunk_size=4, dt_softplus=True,
                     return_final_states=True, impl="reference")
    np.testing.assert_allclose(packed, jnp.concatenate([y1, y2], axis=1), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(final, f2, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_chaining_halves_through_states_equals_whole(impl):
    args, kw = make_inputs(12, seqlen=26, init=True, D="head", z=True)
    opts = dict(chunk_size=6, dt_softplus=True, return_final_states=True, impl=impl, D=kw["D"])
    whole, f_whole = run_ssd(args, dict(initial_states=kw["initial_states"], z=kw["z"]), **opts)
    cut = 11  # not a chunk boundary
    head = {k: (v if k == "A" else v[:, :cut]) for k, v in args.items()}
    tail = {k: (v if k == "A" else v[:, cut:]) for k, v in args.items()}
    y1, f1 = run_ssd(head, dict(initial_states=kw["initial_states"], z=kw["z"][:, :cut]), **opts)
    y2, f2 = run_ssd(tail, dict(initial_states=f1, z=kw["z"][:, cut:]), **opts)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), whole, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(f2, f_whole, rtol=2e-5, atol=2e-5)


def test_result_does_not_depend_on_chunk_size():
    args, kw = make_inputs(13, seqlen=24, n_segments=2, init=True)
    many_chunks = run_ssd(args, kw, chunk_size=3, dt_softplus=True, impl="xla")
    one_chunk = run_ssd(args, kw, chunk_size=64, dt_softplus=True, impl="xla")
    assert max_rel_err(many_chunks, one_chunk) < 2e-5


# ------------------------------------------------------------------ gradients
GRAD_NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]


def _loss_fn(impl, chunk, seq_idx, y_weight, f_weight):
    def loss(x, dt, A, B, C, D, z, dt_bias, initial_states):
        y, final = ssd(x, dt, A, B, C, chunk, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                       initial_states=initial_states, seq_idx=seq_idx, return_final_states=True,
                       impl=impl)
        return jnp.sum(y.astype(jnp.float32) * y_weight) + jnp.sum(final * f_weight)
    return loss


@pytest.mark.parametrize("seed,segments", [(21, 0), (22, 2)])
def test_gradients_match_reference(seed, segments):
    args, kw = make_inputs(seed, seqlen=13, ngroups=2, n_segments=segments, init=True,
                           D="channel", z=True, dt_bias=True)
    seq_idx = kw.pop("seq_idx", None)
    rng = np.random.default_rng(seed + 100)
    y_w = jnp.asarray(rng.standard_normal(args["x"].shape), jnp.float32)
    f_w = jnp.asarray(rng.standard_normal(kw["initial_states"].shape), jnp.float32)
    inputs = [args["x"], args["dt"], args["A"], args["B"], args["C"], kw["D"], kw["z"],
              kw["dt_bias"], kw["initial_states"]]
    argnums = tuple(range(len(inputs)))
    g_ref = jax.jit(jax.grad(_loss_fn("reference", 5, seq_idx, y_w, f_w), argnums))(*inputs)
    g_xla = jax.jit(jax.grad(_loss_fn("xla", 5, seq_idx, y_w, f_w), argnums))(*inputs)
    for name, a, b in zip(GRAD_NAMES, g_xla, g_ref):
        assert a.shape == b.shape, name
        assert np.all(np.isfinite(np.asarray(a))), name
        assert max_rel_err(a, b) < 1e-4, (name, max_rel_err(a, b))


# ------------------------------------------------------------------ bf16
BF16_TOLERANCE = 3e-2  # max |y_bf16 - y_ref| / max |y_ref|: bf16 has an 8-bit mantissa (~4e-3 per rounding)


def test_bf16_forward_within_tolerance_and_dtypes():
    args, kw = make_inputs(31, seqlen=40, headdim=8, dstate=16, ngroups=1, dtype=jnp.bfloat16,
                           n_segments=1, init=True, D="head", z=True, dt_bias=True)
    y, final = run_ssd(args, kw, chunk_size=16, dt_softplus=True, return_final_states=True, impl="xla")
    assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    # The reference sees the same bf16-rounded numbers, computed in float32.
    args32 = {k: v.astype(jnp.float32) for k, v in args.items()}
    kw32 = {k: (v.astype(jnp.float32) if k != "seq_idx" else v) for k, v in kw.items()}
    y_ref, f_ref = run_ssd(args32, kw32, chunk_size=16, dt_softplus=True, return_final_states=True,
                           impl="reference")
    assert max_rel_err(y.astype(jnp.float32), y_ref) < BF16_TOLERANCE
    assert max_rel_err(final, f_ref) < BF16_TOLERANCE


def test_bf16_gradients_finite():
    args, kw = make_inputs(32, seqlen=20, dtype=jnp.bfloat16, n_segments=1, init=True,
                           D="head", z=True, dt_bias=True)
    seq_idx = kw.pop("seq_idx")
    y_w = jnp.ones(args["x"].shape, jnp.float32)
    f_w = jnp.ones(kw["initial_states"].shape, jnp.float32)
    inputs = [args["x"], args["dt"], args["A"], args["B"], args["C"], kw["D"],
              kw["z"].astype(jnp.bfloat16), kw["dt_bias"], kw["initial_states"]]
    grads = jax.jit(jax.grad(_loss_fn("xla", 8, seq_idx, y_w, f_w), tuple(range(9))))(*inputs)
    for name, g, inp in zip(GRAD_NAMES, grads, inputs):
        assert g.dtype == inp.dtype, name
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert float(jnp.max(jnp.abs(g.astype(jnp.float32)))) > 0, name


# ------------------------------------------------------------------ validation
def _good():
    args, _ = make_inputs(41, batch=2, seqlen=8, nheads=4, headdim=3, ngroups=2, dstate=5)
    return args


BAD_INPUTS = [
    ("x", lambda a: dict(a, x=a["x"][0]), "x must have rank 4"),
    ("dt", lambda a: dict(a, dt=a["dt"][:, :5]), "dt must have shape"),
    ("A", lambda a: dict(a, A=a["A"][:3]), "A must have shape"),
    ("B batch", lambda a: dict(a, B=a["B"][:1], C=a["C"][:1]), "do not match x"),
    ("B seqlen", lambda a: dict(a, B=a["B"][:, :5], C=a["C"][:, :5]), "do not match x"),
    ("B vs C", lambda a: dict(a, C=a["C"][..., :4]), "B and C must have the same shape"),
    ("ngroups", lambda a: dict(a, B=jnp.zeros((2, 8, 3, 5)), C=jnp.zeros((2, 8, 3, 5))), "divisible by ngroups"),
]


@pytest.mark.parametrize("label,mutate,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_shapes_raise_value_error(label, mutate, message):
    with pytest.raises(ValueError, match=message):
        ssd(**mutate(_good()), chunk_size=4, impl="xla")


@pytest.mark.parametrize("kwargs,message", [
    (dict(chunk_size=0), "chunk_size must be > 0"),
    (dict(chunk_size=-4), "chunk_size must be > 0"),
    (dict(chunk_size=2.5), "chunk_size must be a positive int"),
    (dict(impl="cuda"), "unknown impl"),
    (dict(D=jnp.ones(3)), "D must have shape"),
    (dict(z=jnp.ones((2, 8, 4, 2))), "z must have the shape of x"),
    (dict(dt_bias=jnp.ones(5)), "dt_bias must have shape"),
    (dict(initial_states=jnp.ones((2, 4, 3, 4))), "initial_states must have shape"),
    (dict(seq_idx=jnp.zeros((2, 7), jnp.int32)), "seq_idx must have shape"),
    (dict(seq_idx=jnp.zeros((2, 8), jnp.float32)), "seq_idx must be an integer"),
    (dict(dt_limit=(1.0, 0.5)), "dt_limit must satisfy"),
])
def test_bad_options_raise_value_error(kwargs, message):
    kwargs = dict(dict(chunk_size=4, impl="xla"), **kwargs)
    with pytest.raises(ValueError, match=message):
        ssd(**_good(), **kwargs)


# ------------------------------------------------------------------ dispatch
def test_auto_and_pallas_work_on_cpu(caplog):
    args, kw = make_inputs(51, seqlen=10, D="head")
    y_xla = run_ssd(args, kw, chunk_size=4, dt_softplus=True, impl="xla")
    chosen, reason = resolve_impl("auto", **args, chunk_size=4)
    if jax.default_backend() == "cpu":
        assert chosen == "xla" and reason
    run = jax.jit(lambda a: ssd(**a, chunk_size=4, dt_softplus=True, impl="auto", **kw))
    np.testing.assert_allclose(run(args), y_xla, rtol=1e-6, atol=1e-6)
    ssd_package._common._WARNED.clear()  # the fallback warning is logged once per reason
    with caplog.at_level(logging.WARNING, logger="dimba_jax.ssd"):
        y_pallas = run_ssd(args, kw, chunk_size=4, dt_softplus=True, impl="pallas")
    chosen, reason = resolve_impl("pallas", **args, chunk_size=4, **kw)
    if chosen == "xla":  # no kernel here: a logged fallback, same numbers as xla
        np.testing.assert_allclose(y_pallas, y_xla, rtol=1e-6, atol=1e-6)
        assert reason and any("falls back to 'xla'" in r.getMessage() for r in caplog.records)
    else:
        np.testing.assert_allclose(y_pallas, y_xla, rtol=2e-2, atol=2e-2)


class _FakeKernelModule:
    """Stands in for dimba_jax.ssd.pallas_gpu: claims support, then fails or answers."""

    def __init__(self, supported=True, fail=False):
        self._supported, self._fail = supported, fail

    def supported(self, **kwargs):
        return self._supported, "" if self._supported else "fake: unsupported"

    def ssd_pallas(self, x, dt, A, B, C, chunk_size, kernels=None, **options):
        if self._fail:
            raise RuntimeError("fake kernel failure")
        return ssd(x, dt, A, B, C, chunk_size, impl="reference", **options)


def test_auto_dispatch_on_a_hopper_with_and_without_a_working_kernel(monkeypatch):
    args, kw = make_inputs(52, seqlen=6)
    monkeypatch.setattr(hopper, "on_hopper_gpu", lambda: True)
    # a kernel that works is used by auto (here it answers with the reference: exact match)
    monkeypatch.setattr(ssd_package, "_load_pallas", lambda: (_FakeKernelModule(), ""))
    assert resolve_impl("auto", **args, chunk_size=4)[0] == "pallas"
    y_ref = ssd(**args, chunk_size=4, impl="reference")
    np.testing.assert_array_equal(ssd(**args, chunk_size=4, impl="auto"), y_ref)
    # an unsupported call, or a kernel that raises, falls back to xla; explicit pallas raises
    y_xla = ssd(**args, chunk_size=4, impl="xla")
    for module in (_FakeKernelModule(supported=False), _FakeKernelModule(fail=True)):
        monkeypatch.setattr(ssd_package, "_load_pallas", lambda m=module: (m, ""))
        np.testing.assert_array_equal(ssd(**args, chunk_size=4, impl="auto"), y_xla)
    with pytest.raises(RuntimeError, match="fake kernel failure"):
        ssd(**args, chunk_size=4, impl="pallas")


@pytest.mark.gpu
def test_xla_matches_reference_on_gpu_moderate_shape():
    """On the device: bf16 xla vs the float32 reference at a Mamba-2-like shape (P 64, N 128)."""
    args, kw = make_inputs(61, batch=2, seqlen=600, nheads=8, headdim=64, ngroups=1, dstate=128,
                           dtype=jnp.bfloat16, n_segments=2, init=True, D="head", dt_bias=True)
    y = run_ssd(args, kw, chunk_size=256, dt_softplus=True, impl="xla")
    args32 = {k: v.astype(jnp.float32) for k, v in args.items()}
    kw32 = {k: (v.astype(jnp.float32) if k != "seq_idx" else v) for k, v in kw.items()}
    with jax.default_matmul_precision("highest"):
        y_ref = run_ssd(args32, kw32, chunk_size=256, dt_softplus=True, impl="reference")
    assert max_rel_err(y.astype(jnp.float32), y_ref) < BF16_TOLERANCE
