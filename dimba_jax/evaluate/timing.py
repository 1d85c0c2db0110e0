"""Timing and memory helpers: compile excluded, device synchronised, median of repeats.

``time_call(fn, *args)`` calls ``fn`` once as a warm-up (this is where jit traces and compiles;
its wall time is reported separately as ``compile_s``), then ``repeats`` more times, each
bracketed by ``jax.block_until_ready`` on the result so asynchronous dispatch cannot hide device
work, and reports the median. Host-side work inside ``fn`` (argument preparation, Python
dispatch) is counted: that is what a user waits for.

Peak memory: ``device.memory_stats()["peak_bytes_in_use"]`` where the backend reports it (GPU,
TPU). The counter is the high-water mark since the process started and cannot be reset from JAX,
so callers that want per-shape peaks must measure shapes in increasing size (the long-context
study does). On backends without memory stats (CPU) it returns None; ``compiled_memory_bytes``
gives XLA's static estimate (arguments + outputs + temporaries) instead.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


@dataclasses.dataclass
class Timing:
    """Result of `time_call`: all times in milliseconds except compile_s (seconds)."""

    median_ms: float
    times_ms: list[float]
    compile_s: float
    result: Any = dataclasses.field(repr=False, default=None)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)


def time_call(fn: Callable[..., Any], *args, repeats: int = 5, warmup: int = 1, **kwargs) -> Timing:
    """Times ``fn(*args, **kwargs)``: `warmup` untimed calls (compile), then `repeats` timed ones.

    Returns a `Timing` with the median wall time in ms of the timed calls (each synchronised with
    ``jax.block_until_ready``), the wall time of the warm-up calls (compile + first run) in
    seconds, and the last call's result.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    t0 = time.perf_counter()
    result = None
    for _ in range(warmup):
        result = jax.block_until_ready(fn(*args, **kwargs))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(fn(*args, **kwargs))
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(median_ms=float(statistics.median(times)), times_ms=times, compile_s=compile_s,
                  result=result)


def peak_bytes_in_use(device: jax.Device | None = None) -> int | None:
    """The device's peak allocated bytes since process start, or None where not reported."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    if not stats:
        return None
    value = stats.get("peak_bytes_in_use")
    return int(value) if value is not None else None


def compiled_memory_bytes(compiled: Any) -> int | None:
    """XLA's static memory estimate of a compiled program: argument + output + temp bytes.

    `compiled` is the result of ``jax.jit(f).lower(*args).compile()``; returns None when the
    backend gives no memory analysis.
    """
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements memory_analysis
        return None
    if analysis is None:
        return None
    total = 0
    for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
        total += int(getattr(analysis, name, 0) or 0)
    return total


def gib(num_bytes: int | None) -> float | None:
    """Bytes -> GiB (None passes through)."""
    return None if num_bytes is None else num_bytes / 2**30
