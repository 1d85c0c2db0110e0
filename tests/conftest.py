"""Shared pytest setup: CPU by default, `gpu`-marked tests skipped without a GPU, and XLA's
backend at optimisation level 0 (set before any backend starts, inherited by the tests'
subprocesses unless they replace XLA_FLAGS): the suite's time is mostly compiling many tiny
programs, which -O0 makes ~20% faster; float32 results move by summation-order amounts only,
inside the tests' tolerances; and one persistent compilation cache for the run."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_backend_optimization_level=0").strip()

import tempfile  # noqa: E402

# One persistent compilation cache for the run's processes (xdist workers, the tests'
# subprocesses): the same small programs compile in many tests.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "dimba_jax_tests_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest

jax.config.update("jax_enable_x64", False)


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip_gpu = pytest.mark.skip(reason="needs a GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
