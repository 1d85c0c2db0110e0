"""Tests of `dimba_jax/ssd/pallas_select.py`: which forward kernels `ssd(impl="pallas")` runs.

CPU: `KernelConfig` (defaults, validation, the config.model fields); the Mosaic forward is
chosen when `pallas_mosaic.supported` accepts the call and its result matches the sequential
reference (both kernels in their interpreters); a call Mosaic does not take (seq_idx) and
forward="triton" go to the Triton forward, whose result matches too. The kernels' own correctness
is tested in test_ssd_pallas.py / test_ssd_mosaic.py; here it is the routing.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dimba_jax.config import default_config
from dimba_jax.ssd import KernelConfig, pallas_gpu, pallas_mosaic, pallas_select, ssd
from _ssd_testing import rel_error as _rel


def test_kernel_config_defaults_validation_and_config_fields():
    assert KernelConfig() == KernelConfig("mosaic", "mosaic", None, 64)
    assert hash(KernelConfig()) == hash(KernelConfig())  # a static jit argument
    for bad in (dict(forward="cuda"), dict(backward="cudnn"), dict(block_len=96),
                dict(forward_only_block_len=32)):
        with pytest.raises(ValueError, match="KernelConfig"):
            KernelConfig(**bad)
    # the models' forward-only chunk is 128 and their dt prologue the Pallas kernel (the batch-1
    # sampler's best)
    config = default_config()
    assert KernelConfig.from_config(config.model) == KernelConfig(forward_only_block_len=128,
                                                                  prologue="pallas",
                                                                  output_persistent=True)
    with config.unlocked():
        config.model.update(ssd_forward="triton", ssd_backward="triton", ssd_block_len=64,
                            ssd_forward_only_block_len=0)
    assert KernelConfig.from_config(config.model) == KernelConfig("triton", "triton", 64, None,
                                                                  prologue="pallas",
                                                                  output_persistent=True)
    assert KernelConfig.from_config(object()) == KernelConfig()  # an older config: defaults


def _inputs(seqlen=70, seq_idx=False):
    ks = jax.random.split(jax.random.key(20261204), 6)
    b, h, p, g, n = 1, 2, 64, 1, 64
    args = (jax.random.normal(ks[0], (b, seqlen, h, p)),
            jax.random.normal(ks[1], (b, seqlen, h)) - 1.0,
            -jnp.exp(jax.random.uniform(ks[2], (h,), minval=-1.0, maxval=1.0)),
            jax.random.normal(ks[3], (b, seqlen, g, n)),
            jax.random.normal(ks[4], (b, seqlen, g, n)))
    kw = dict(D=jax.random.normal(ks[5], (h,)), dt_softplus=True)
    if seq_idx:
        kw["seq_idx"] = jnp.asarray([[0] * (seqlen // 2) + [1] * (seqlen - seqlen // 2)])
    return args, kw


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("kernels,seq_idx,want", [
    (KernelConfig(block_len=64), False, "mosaic"),
    (KernelConfig(block_len=64), True, "triton"),  # Mosaic has no seq_idx: Triton forward
    (KernelConfig(forward="triton"), False, "triton"),
])
def test_routing_and_results(monkeypatch, kernels, seq_idx, want):
    real_supported = pallas_mosaic.supported
    # On the CPU the device check fails; keep every other check of `supported`.
    monkeypatch.setattr(pallas_mosaic, "supported",
                        lambda **k: real_supported(**dict(k, check_device=False)))
    mosaic_calls = _spy(monkeypatch, pallas_mosaic, "ssd_mosaic_forward")
    triton_calls = _spy(monkeypatch, pallas_gpu, "ssd_pallas")
    args, kw = _inputs(seq_idx=seq_idx)
    y = pallas_select.ssd_pallas(*args, 256, kernels=kernels, interpret=True, **kw)
    assert (len(mosaic_calls), len(triton_calls)) == ((1, 0) if want == "mosaic" else (0, 1))
    if want == "mosaic":
        assert mosaic_calls[0]["kernels"] is kernels
    with jax.default_matmul_precision("highest"):
        y_ref = ssd(*args, 256, impl="reference", **kw)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert _rel(y, y_ref) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 1.5e-2), (jnp.float32, 2.5e-3)])
def test_gpu_dispatcher_runs_the_default_forward(monkeypatch, dtype, tol):
    """On a Hopper GPU, ssd(impl="pallas") with the default forward spec calls the Mosaic
    forward for a call it supports; forward and the x / B / C gradients match the reference."""
    mosaic_calls = _spy(monkeypatch, pallas_mosaic, "ssd_mosaic_forward")
    args, kw = _inputs(seqlen=300)
    args = tuple(a.astype(dtype) if i in (0, 3, 4) else a for i, a in enumerate(args))
    y, vjp = jax.vjp(lambda *a: ssd(*a, 256, impl="pallas", **kw), *args)
    with jax.default_matmul_precision("highest"):
        y_ref, vjp_ref = jax.vjp(lambda *a: ssd(*a, 256, impl="reference", **kw), *args)
    assert len(mosaic_calls) == 1
    assert _rel(y, y_ref) < tol
    dy = jax.random.normal(jax.random.key(1), y.shape).astype(dtype)
    for name, g, g_ref in zip(("x", "dt", "A", "B", "C"), vjp(dy), vjp_ref(dy)):
        assert _rel(g, g_ref) < tol, name
