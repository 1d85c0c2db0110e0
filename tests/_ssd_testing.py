"""Shared helpers of the SSD kernel tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def rel_error(a, b) -> float:
    """Relative L2 error ||a - b|| / ||b|| in float64 (any shapes, any float dtypes; b not all
    zero). Fails the test when `a` (the result under test) has a non-finite value."""
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64).ravel()
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64).ravel()
    assert np.all(np.isfinite(a)), "non-finite values in the result under test"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def plain_ssd_args(seed, bsz, seqlen, nh, p, g, n):
    """Fresh random bf16 SSD operands without the optional ones: args (x (b, L, h, P),
    dt (b, L, h), A (h,), B, C (b, L, g, N)) and dy (b, L, h, P), the output cotangent."""
    ks = jax.random.split(jax.random.key(seed), 6)
    bf16 = jnp.bfloat16
    args = (jax.random.normal(ks[0], (bsz, seqlen, nh, p)).astype(bf16),
            jax.random.normal(ks[1], (bsz, seqlen, nh)) - 1.0,
            -jnp.exp(jax.random.uniform(ks[2], (nh,), minval=-1.0, maxval=1.0)),
            jax.random.normal(ks[3], (bsz, seqlen, g, n)).astype(bf16),
            jax.random.normal(ks[4], (bsz, seqlen, g, n)).astype(bf16))
    return args, jax.random.normal(ks[5], (bsz, seqlen, nh, p)).astype(bf16)


def ssd_args(seed, bsz, seqlen, nh, p, g, n):
    """Fresh random bf16 SSD operands (never zero) for a full forward + gradient check:
    args (x (b, L, h, P), dt (b, L, h), A (h,), B, C (b, L, g, N)); kw (D (h, P), dt_bias,
    dt_softplus, initial_states (b, h, P, N)); dy (b, L, h, P) the output cotangent."""
    ks = jax.random.split(jax.random.key(seed), 9)
    bf16 = jnp.bfloat16
    args = (jax.random.normal(ks[0], (bsz, seqlen, nh, p)).astype(bf16),           # x
            jax.random.normal(ks[1], (bsz, seqlen, nh)) - 1.0,                      # dt
            -jnp.exp(jax.random.uniform(ks[2], (nh,), minval=-1.0, maxval=1.0)),    # A
            jax.random.normal(ks[3], (bsz, seqlen, g, n)).astype(bf16),             # B
            jax.random.normal(ks[4], (bsz, seqlen, g, n)).astype(bf16))             # C
    kw = dict(D=jax.random.normal(ks[5], (nh, p)), dt_bias=0.5 * jax.random.normal(ks[6], (nh,)),
              dt_softplus=True, initial_states=jax.random.normal(ks[7], (bsz, nh, p, n)))
    dy = jax.random.normal(ks[8], (bsz, seqlen, nh, p)).astype(bf16)
    return args, kw, dy


def check_kernel_knob(field, default, other, bad):
    """`config.model.ssd_<field>` reaches `KernelConfig.<field>`: `default` in the default
    config and in KernelConfig(), `other` once set; KernelConfig(<field>=bad) is a ValueError
    naming the field."""
    from dimba_jax.config import default_config
    from dimba_jax.ssd import KernelConfig
    m = default_config().model
    assert getattr(KernelConfig(), field) == default
    assert getattr(KernelConfig.from_config(m), field) == default
    setattr(m, f"ssd_{field}", other)
    assert getattr(KernelConfig.from_config(m), field) == other
    with pytest.raises(ValueError, match=field):
        KernelConfig(**{field: bad})
