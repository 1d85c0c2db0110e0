"""Shared helper of the SSD kernel tests."""

import jax.numpy as jnp
import numpy as np


def rel_error(a, b) -> float:
    """Relative L2 error ||a - b|| / ||b|| in float64 (any shapes, any float dtypes; b not all
    zero). Fails the test when `a` (the result under test) has a non-finite value."""
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64).ravel()
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64).ravel()
    assert np.all(np.isfinite(a)), "non-finite values in the result under test"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
