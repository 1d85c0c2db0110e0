"""Mamba-2 SSD: one function, `ssd`, with three implementations behind it.

    from dimba_jax.ssd import ssd
    y = ssd(x, dt, A, B, C, chunk_size=256, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)

- impl="reference": the sequential recurrence (`lax.scan` over time); the ground truth.
- impl="xla": chunked SSD in plain XLA (`chunked.py`); runs everywhere, differentiable.
- impl="pallas": Pallas GPU kernels (Hopper): the Mosaic GPU forward and backward
  (`pallas_mosaic.py` combining `pallas_mosaic_fwd.py`, `pallas_mosaic_rev.py`,
  `pallas_mosaic_bwd.py`; Hopper facts in `hopper.py`) where they take the call, else the Triton
  kernels (`pallas_gpu.py`); `pallas_select.py` chooses as the static argument `kernels` (a
  `KernelConfig`) says. Falls back to "xla", with a logged warning giving the reason, when the
  module is absent or does not support the call.
- impl="auto": "pallas" on a Hopper GPU when it supports the call, else "xla". Never fails
  because a kernel is missing. On the H200 the Pallas SSD is 2.2-3.1x faster than "xla" in the
  forward and 2.2-2.6x in forward+backward (benchmarks/results/ssd_h200.md); impl="xla"
  (config.model.ssd_impl) is the way to run XLA there.
"""

from __future__ import annotations

import importlib
import logging
import math

import jax

from dimba_jax.ssd import _common, hopper
from dimba_jax.ssd.chunked import chunked_scan
from dimba_jax.ssd.kernel_config import DEFAULT as DEFAULT_KERNELS
from dimba_jax.ssd.kernel_config import KernelConfig
from dimba_jax.ssd.reference import reference_scan

__all__ = ["ssd", "reference_scan", "chunked_scan", "resolve_impl", "IMPLS", "KernelConfig"]

IMPLS = _common.IMPLS
logger = logging.getLogger(__name__)


def _warn_once(message: str) -> None:
    _common.warn_once(logger, message)


def _load_pallas():
    """Returns the `pallas_select` module (the Pallas entry point: `supported`, `ssd_pallas`),
    or (None, reason) when it cannot be imported."""
    try:
        return importlib.import_module("dimba_jax.ssd.pallas_select"), ""
    except Exception as e:  # absent module, or a jax without Mosaic GPU: fall back, never fail
        return None, f"dimba_jax.ssd.pallas_select could not be imported ({type(e).__name__}: {e})"


def resolve_impl(impl: str, **kwargs) -> tuple[str, str]:
    """Which implementation `ssd(..., impl=impl)` runs for these arguments, and why.

    Args:
      impl: one of IMPLS.  kwargs: the keyword arguments of `ssd` (forwarded to
        `pallas_select.supported` when the Pallas kernel is a candidate).
    Returns:
      (chosen impl in {"reference", "xla", "pallas"}, reason string; "" when impl was honoured).
    """
    if impl in ("reference", "xla"):
        return impl, ""
    if impl == "auto" and not hopper.on_hopper_gpu():
        return "xla", "auto: not on a Hopper GPU"
    module, reason = _load_pallas()
    if module is None:
        return "xla", reason
    try:
        ok, why = module.supported(**kwargs)
    except Exception as e:
        ok, why = False, f"pallas_select.supported raised {type(e).__name__}: {e}"
    if not ok:
        return "xla", f"pallas kernel does not support this call: {why}"
    return "pallas", ""


def ssd(x, dt, A, B, C, chunk_size, *, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=(0.0, math.inf), initial_states=None, seq_idx=None,
        return_final_states=False, impl="auto", kernels: KernelConfig = DEFAULT_KERNELS,
        dt_layout=None):
    """Mamba-2 SSD scan with the semantics of mamba_ssm's `mamba_chunk_scan_combined`.

    dt <- clip(softplus?(dt + dt_bias), *dt_limit) (float32);
    h_t = exp(dt_t A) h_{t-1} + dt_t (x_t outer B_t) (state headdim x dstate per head);
    y_t = h_t . C_t + D x_t;  y <- y * silu(z) when z is given.
    The state resets to zero wherever seq_idx changes; initial_states is the state before the
    first step and applies to the first segment only.

    Args:
      x: (batch, seqlen, nheads, headdim) float (bf16 / f32); sets the output dtype.
      dt: (batch, seqlen, nheads).
      A: (nheads,) (negative for a decaying state).
      B, C: (batch, seqlen, ngroups, dstate); nheads % ngroups == 0; head h uses group
        h // (nheads // ngroups).
      chunk_size: int > 0, the block length of the chunked algorithms (results do not depend
        on it beyond rounding; seqlen need not be a multiple of it).
      D: (nheads,) or (nheads, headdim) skip weight, or None.
      z: (batch, seqlen, nheads, headdim) gate, or None.
      dt_bias: (nheads,) or None.  dt_softplus: bool.  dt_limit: (min, max) clip of dt.
      initial_states: (batch, nheads, headdim, dstate) or None.
      seq_idx: (batch, seqlen) int or None (packed sequences).
      return_final_states: also return the state after the last step.
      impl: "auto" | "xla" | "reference" | "pallas".
      kernels: the Pallas kernels (a frozen, hashable `KernelConfig`; static) for "pallas" and
        for "auto" on Hopper; ignored by "xla" / "reference".
      dt_layout: None, or (offset, directions): dt is then a wider (batch, seqlen, W) array
        (a mixer's whole input projection) holding the step sizes of nheads / directions heads
        at columns [offset, offset + nheads / directions); with directions 2 heads
        [nheads / 2, nheads) read those columns in reversed time (row seqlen-1-t: a
        bidirectional mixer's backward direction in scan time). The Pallas forward's step-size
        prologue kernel reads them in place; every other path forms the (batch, seqlen,
        nheads) array (`_common.window_dt`). Gradients go to the wide dt.
    Returns:
      y: (batch, seqlen, nheads, headdim) in x.dtype, and, if return_final_states,
      final_states: (batch, nheads, headdim, dstate) float32.
    Raises:
      ValueError on wrong shapes/ranks, mismatched batch/seqlen, nheads % ngroups != 0,
      chunk_size <= 0, a bad dt_limit or an unknown impl.
    """
    dt_source = None
    if dt_layout is not None:
        nheads = x.shape[2] if getattr(x, "ndim", 0) == 4 else 0
        why = _common.dt_window_error(getattr(dt, "shape", ()), dt_layout, nheads)
        if why:
            raise ValueError(why)
        dt_source = (dt, (int(dt_layout[0]), int(dt_layout[1])))
        dt = _common.window_dt(dt, dt_layout, nheads)
    _common.validate_inputs(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                            dt_limit=dt_limit, initial_states=initial_states,
                            seq_idx=seq_idx, impl=impl)
    options = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                   initial_states=initial_states, seq_idx=seq_idx,
                   return_final_states=return_final_states)
    chosen, reason = resolve_impl(impl, x=x, dt=dt, A=A, B=B, C=C, chunk_size=chunk_size,
                                  **options)
    if impl == "pallas" and chosen != "pallas":
        _warn_once(f"ssd(impl='pallas') falls back to 'xla': {reason}")
    if chosen == "pallas":
        module, _ = _load_pallas()
        source = {} if dt_source is None else {"dt_source": dt_source}
        if impl == "pallas":  # asked for explicitly: a kernel error is a bug, let it surface
            return module.ssd_pallas(x, dt, A, B, C, chunk_size, kernels=kernels, **source,
                                     **options)
        try:
            return module.ssd_pallas(x, dt, A, B, C, chunk_size, kernels=kernels, **source,
                                     **options)
        except Exception as e:  # auto must never fail because of the kernel (trace-time errors)
            _warn_once(f"ssd(impl='auto'): pallas kernel failed ({type(e).__name__}: {e}); using 'xla'")

    dt_eff = _common.process_dt(dt, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
    segments = _common.segment_ids(seq_idx)
    if chosen == "reference":
        y, final_states = reference_scan(x, dt_eff, A, B, C, initial_states=initial_states,
                                         segment_ids=segments)
    else:
        y, final_states = chunked_scan(x, dt_eff, A, B, C, int(chunk_size),
                                       initial_states=initial_states, segment_ids=segments)
    y = _common.apply_skip_and_gate(y, x, D=D, z=z)
    return (y, final_states) if return_final_states else y
