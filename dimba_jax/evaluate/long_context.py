"""Long-context scaling: one denoiser forward step's time and peak memory against length L.

The paper claims DIMBA scales linearly in the context length. We time one forward pass of the
DIMBA denoiser (the work of one sampling step: embed -> N bidirectional Mamba-2 blocks -> head)
at batch 1 for L = 1k, 4k, 16k, 64k, and fit the log-log slope: linear scaling is slope 1,
attention-like quadratic scaling slope 2.

Time and memory of a forward pass depend on the shapes, not on the values of the weights, so
random weights (freshly initialised from a config) serve as well as a checkpoint and any size of
model can be studied. Each length's step is compiled ahead of time; its memory is reported two
ways: "compiled_gib", XLA's buffer assignment for that program (arguments + outputs +
temporaries: what the step itself needs, per L), and "peak_gib", the device's high-water mark
since the process started (lengths run in increasing order so it is that of the current length
unless earlier work in the process used more; None on CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dimba_jax.evaluate import timing

DEFAULT_LENGTHS = (1024, 4096, 16384, 65536)


def fit_loglog_slope(lengths: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of log(time) against log(L) (the scaling exponent).

    Raises ValueError with fewer than two distinct lengths or a non-positive value.
    """
    x = np.asarray(lengths, np.float64)
    y = np.asarray(times, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"lengths and times must be 1-D of equal size, got {x.shape}, {y.shape}")
    if len(np.unique(x)) < 2:
        raise ValueError("need at least two distinct lengths to fit a slope")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("lengths and times must be positive")
    lx, ly = np.log(x), np.log(y)
    lx_c = lx - lx.mean()
    return float((lx_c * (ly - ly.mean())).sum() / (lx_c ** 2).sum())


def measure_scaling(make_step: Callable[[int], tuple[Callable[..., Any], tuple]],
                    lengths: Sequence[int] = DEFAULT_LENGTHS, *, repeats: int = 5,
                    time_budget_s: float | None = None,
                    on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Times a step function at each length (ascending).

    Args:
      make_step: L -> (jitted fn, args): fn(*args) runs one forward step at length L.
      lengths: the lengths to study (sorted ascending here).
      repeats: timed repeats per length (median reported); compile excluded.
      time_budget_s: stop before a new length once this many seconds have been spent.
      on_result: called with each row as soon as it is measured (to save partial results).
    Returns:
      rows [{"L", "step_ms", "peak_gib", "compiled_gib", "compile_s"}]: peak_gib is the device's
      high-water mark (None on CPU); compiled_gib XLA's static estimate for that program.
    """
    import time

    rows = []
    start = time.perf_counter()
    for L in sorted(int(v) for v in lengths):
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            break
        fn, args = make_step(L)
        t_compile = time.perf_counter()
        compiled_bytes = None
        if hasattr(fn, "lower"):  # compile once, ahead of time; read XLA's memory estimate
            fn = fn.lower(*args).compile()
            compiled_bytes = timing.compiled_memory_bytes(fn)
        t = timing.time_call(fn, *args, repeats=repeats)
        row = {
            "L": L,
            "step_ms": t.median_ms,
            "peak_gib": timing.gib(timing.peak_bytes_in_use()),
            "compiled_gib": timing.gib(compiled_bytes),
            "compile_s": time.perf_counter() - t_compile - sum(t.times_ms) / 1e3,
        }
        rows.append(row)
        if on_result is not None:
            on_result(row)
        del t
    return rows


def slope_of(rows: Sequence[dict]) -> float | None:
    """Log-log slope of step_ms against L over `rows` (None with fewer than two lengths)."""
    pts = [(r["L"], r["step_ms"]) for r in rows if r.get("step_ms")]
    if len({p[0] for p in pts}) < 2:
        return None
    return fit_loglog_slope([p[0] for p in pts], [p[1] for p in pts])


def slope_of_upper(rows: Sequence[dict], min_len: int) -> float | None:
    """Slope using only lengths >= min_len (where fixed per-call overheads no longer dominate)."""
    return slope_of([r for r in rows if r["L"] >= min_len])


def dimba_forward_step_factory(model: Any, *, batch: int = 1, seed: int = 0, t_value: int = 500
                               ) -> Callable[[int], tuple[Callable[..., Any], tuple]]:
    """make_step for `measure_scaling`: one DIMBA denoiser forward at length L.

    `model` is a ``dimba_jax.models.dimba.DimbaModel`` (random weights are fine). The step is
    ``model(x_t, t, tokens, cond_mask, self_cond=x0_prev)`` with nothing known (unconditional)
    and the self-conditioning input present when the model has that channel: exactly the
    denoiser call of one sampling step, without the sampler's cheap elementwise update and
    without clamping's vocabulary projection (both linear in L too).
    """
    from flax import nnx  # local: keeps this module importable for slope fitting alone

    graphdef, state = nnx.split(model)
    width = int(model.embed_dim)  # the diffusion space
    use_sc = bool(getattr(model, "self_condition", False))

    @jax.jit
    def step(state, x_t, t, tokens, cond, sc):
        m = nnx.merge(graphdef, state)
        return m(x_t, t, tokens, cond, self_cond=sc if use_sc else None)

    def make_step(L: int):
        k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
        x_t = jax.random.normal(k1, (batch, L, width), jnp.float32)
        sc = jax.random.normal(k2, (batch, L, width), jnp.float32)
        tokens = jnp.zeros((batch, L), jnp.int32)
        cond = jnp.zeros((batch, L), jnp.bool_)
        t = jnp.full((batch,), t_value, jnp.int32)
        return step, (state, x_t, t, tokens, cond, sc)

    return make_step


def default_lengths_for(max_len: int) -> list[int]:
    """The standard lengths (1k..64k) capped at max_len, at least two of them."""
    out = [L for L in DEFAULT_LENGTHS if L <= max_len]
    if len(out) < 2:
        out = [max(16, max_len // 4), max_len]
    return out


def tokens_per_second(L: int, step_ms: float) -> float:
    """Tokens processed per second by one forward over L tokens."""
    return L / (step_ms / 1e3) if step_ms > 0 else math.inf
