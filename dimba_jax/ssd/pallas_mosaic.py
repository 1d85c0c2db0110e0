"""SSD with Pallas **Mosaic GPU** kernels (Hopper): the differentiable forward that combines them.

The kernels live by stage, each in its own module; this module puts them together and nothing
imports it back but the dispatcher (`pallas_select`):

- forward (`pallas_mosaic_fwd`): chunk states fused with the state pass
  (`segmented_statepass`), then the chunk output (`chunk_out_mosaic`): two Mosaic launches, the
  float32 chunk states never written. dt preprocessing, the chunk-local cumsum s, the state
  weights and chunk-end decays, and the z gate stay in XLA, as in `pallas_gpu`.
- backward (custom_vjp): `pallas_gpu.core_backward`; with `KernelConfig.backward == "mosaic"`
  its two stages are Mosaic GPU kernels, the fused reverse state pass (`pallas_mosaic_rev`) and
  the chunk backward (`pallas_mosaic_bwd`), where they take the call; Triton's otherwise.
- shared Hopper facts (shared-memory budgets, lowering helpers): `hopper`.

Limits (`supported()` says which applies): headdim and dstate multiples of 64 up to 256 whose
tiles fit in shared memory, block_len 64 or 128, no seq_idx. `ssd(impl="pallas")` runs this
forward where `supported()` accepts the call (`pallas_select.py`), else the Triton one.

Imports without a GPU; `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` lowers it
on a CPU-only machine (tests/test_ssd_mosaic.py; under jax 0.11 the Triton stages also need an
abstract GPU device, see `hopper.cuda_lowering_context`).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp

from dimba_jax.ssd import _common, hopper
from dimba_jax.ssd import pallas_gpu as _tri
from dimba_jax.ssd import pallas_mosaic_bwd, pallas_mosaic_rev
from dimba_jax.ssd import pallas_mosaic_fwd as _fwd
from dimba_jax.ssd.hopper import BACKWARD_SEMANTICS, DEFAULT_SEMANTICS
from dimba_jax.ssd.kernel_config import BACKWARDS, DEFAULT, KernelConfig
from dimba_jax.ssd.pallas_prologue import prepare_dt_pallas, prologue_supported

DEFAULT_BLOCK_LEN = 128
logger = logging.getLogger(__name__)


def _warn_once(message: str) -> None:
    _common.warn_once(logger, message)


_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def default_block_len(dtype) -> int:
    """Kernel chunk length: 128 for 16-bit inputs, 64 for float32 (its tiles need 2x SMEM)."""
    return 64 if jnp.dtype(dtype) == jnp.dtype(jnp.float32) else DEFAULT_BLOCK_LEN


def supported(*, x, dt=None, A=None, B, C=None, chunk_size=None, D=None, z=None, dt_bias=None,
              dt_softplus=False, dt_limit=(0.0, math.inf), initial_states=None, seq_idx=None,
              return_final_states=False, block_len: int | None = None,
              check_device: bool = True) -> tuple[bool, str]:
    """Whether `ssd_mosaic_forward` handles these arguments (and, if check_device, this device).

    The chunk-output and the fused chunk-state + state-pass kernels must both fit.

    Returns:
      (True, "") or (False, reason naming the unsupported option).
    """
    del dt, A, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states
    del return_final_states
    q = int(block_len or default_block_len(x.dtype))
    headdim, dstate = x.shape[-1], B.shape[-1]
    if jnp.dtype(x.dtype) not in _SUPPORTED_DTYPES:
        return False, f"mosaic SSD kernel needs x in bfloat16/float16/float32, got {x.dtype}"
    if headdim % 64 or not 64 <= headdim <= 256:
        return False, f"mosaic SSD kernel needs headdim a multiple of 64 in [64, 256], got {headdim}"
    if dstate % 64 or not 64 <= dstate <= 256:
        return False, f"mosaic SSD kernel needs dstate a multiple of 64 in [64, 256], got {dstate}"
    if q not in (64, 128):
        return False, f"mosaic SSD kernel needs block_len 64 or 128, got {q}"
    if seq_idx is not None:
        return False, "mosaic SSD kernel does not support seq_idx yet"
    itemsize = jnp.dtype(x.dtype).itemsize
    smem = itemsize * (q * headdim + 2 * q * dstate + headdim * dstate) + 4 * (3 * q + headdim)
    smem += itemsize * q * headdim  # the y tile
    if itemsize == 4:  # tf32: M also goes through shared memory
        smem += 4 * q * q
    if smem > hopper.SMEM_LIMIT:
        return False, (f"mosaic SSD kernel tiles need {smem} bytes of shared memory "
                       f"(block_len {q}, headdim {headdim}, dstate {dstate}); limit "
                       f"{hopper.SMEM_LIMIT}")
    smem = _fwd.statepass_smem_bytes(q, headdim, 64, itemsize)  # the narrowest column block
    if smem > hopper.SMEM_LIMIT:
        return False, (f"mosaic SSD statepass kernel tiles need {smem} bytes of shared memory "
                       f"(block_len {q}, headdim {headdim}, dstate {dstate}); limit "
                       f"{hopper.SMEM_LIMIT}")
    reason = _tri.backward_size_reason(headdim, dstate)  # the backward is pallas_gpu's
    if reason is not None:
        return False, reason
    if check_device:
        reason = _tri._device_reason()  # Hopper GPU check (shared with the Triton module)
        if reason is not None:
            return False, reason
        try:
            hopper.mosaic_gpu()
        except ImportError as e:
            return False, f"jax.experimental.pallas.mosaic_gpu unavailable ({e})"
    return True, ""


# --------------------------------------------------------------------------------------------
# Differentiable core: the Mosaic forward kernels; pallas_gpu's backward with Mosaic stages.
# --------------------------------------------------------------------------------------------

def _fwd_impl(x, b, c, dt, s, h0, d, q, hpg, interpret, forward, pre=None):
    """The forward kernels; forward = (semantics, KernelConfig.output_warpgroups,
    KernelConfig.output_persistent); pre = (w, dec_rows): the state pass's weights (b, h, Lp)
    and chunk-end decays repeated over the head's channels (b, h, Lp / q, P) of (dt, s) at
    chunk q, computed beforehand (`pallas_prologue`), or None (computed here)."""
    semantics, out_wgs, persistent = forward
    tf32 = x.dtype == jnp.float32
    xin = jnp.transpose(x, (0, 2, 3, 1)) if tf32 else x  # tf32: K-major x, (b, h, P, Lp)
    bin_ = jnp.transpose(b, (0, 2, 3, 1)) if tf32 else b  # (b, g, N, Lp)
    if pre is None:
        w, dec = _fwd.state_weights(dt, s, q), _tri._chunk_end_decay(s, None, q)  # dec (b, h, nc)
        dec_rows = jnp.broadcast_to(dec[..., None], dec.shape + (h0.shape[2],))
    else:
        w, dec_rows = pre
    hprev, fin = _fwd.segmented_statepass(xin, bin_, w, dec_rows, h0,
                                          q=q, hpg=hpg, hprev_dtype=x.dtype,
                                          interpret=interpret, semantics=semantics)
    if persistent and out_wgs == 2 and not _fwd.persistent_error(xin, b, q):
        y = _fwd.chunk_out_persistent_mosaic(xin, b, c, dt, s, hprev, d, q=q, hpg=hpg,
                                             interpret=interpret, semantics=semantics)
    else:
        y = _fwd.chunk_out_mosaic(xin, b, c, dt, s, hprev, d, q=q, hpg=hpg,
                                  interpret=interpret, semantics=semantics, warpgroups=out_wgs)
    return y, fin, hprev


# One jitted function per direction, called from every layer's custom_vjp: a model's layers share
# one traced jaxpr per (shapes, config), which XLA's lowering emits once as a private function
# called from each layer, so each Mosaic GPU kernel is lowered (Pallas -> Mosaic -> serialized
# module, seconds each) once per program instead of once per call site. Without this the
# configs/base.py train step (48 SSD calls: 24 bidirectional blocks) took 203 s to compile with
# two Mosaic kernels per call and more than 290 s with four.
_fwd_impl_once = jax.jit(_fwd_impl, static_argnums=(7, 8, 9, 10))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11, 12))
def _core(x, b, c, dt, s, h0, d, q, hpg, interpret, forward, backward, q_fwd, pre=None):
    """Forward-only calls (no gradient taken: sampling, evaluation) run at chunk q_fwd where it
    divides q; the forward rule used under differentiation keeps chunk q, whose per-chunk
    states the backward needs. The result is the same up to rounding. pre: `_fwd_impl`'s, at
    chunk q (dropped where the call rechunks); functions of dt and s whose gradients the
    backward's ddt and ds already carry, so their own cotangents are zero."""
    q_fwd = q_fwd or q
    if q % q_fwd == 0 and q_fwd != q:
        s = _fwd.rechunk_cumsum(s, q, q_fwd)
        q, pre = q_fwd, None
    y, fin, _ = _fwd_impl_once(x, b, c, dt, s, h0, d, q, hpg, interpret, forward, pre)
    return y, fin


def _core_fwd(x, b, c, dt, s, h0, d, q, hpg, interpret, forward, backward, q_fwd, pre=None):
    y, fin, hprev = _fwd_impl_once(x, b, c, dt, s, h0, d, q, hpg, interpret, forward, pre)
    return (y, fin), (x, b, c, dt, s, hprev, d, pre)


def _mosaic_chunk_bwd(x, b, q, semantics, warpgroups):
    """The Mosaic GPU chunk-backward kernel as a drop-in for pallas_gpu._chunk_bwd_call (with
    warpgroups 2, two consumer warpgroups per program where they fit), or None (with a logged
    reason) where pallas_mosaic_bwd does not take these shapes."""
    ok, why = pallas_mosaic_bwd.supported_bwd(x=x, b=b, q=q)
    if not ok:
        _warn_once(f"Mosaic GPU SSD backward does not take this call ({why}); using Triton's")
        return None

    def chunk_bwd(x, b, c, dt, s, dy, hprev, dstates, d, seg, *, q, hpg, num_warps, interpret):
        del seg, num_warps  # no seq_idx on the Mosaic path; one warpgroup per program
        return pallas_mosaic_bwd.chunk_bwd_mosaic(x, b, c, dt, s, dy, hprev, dstates, d, q=q,
                                                  hpg=hpg, interpret=interpret,
                                                  semantics=semantics, warpgroups=warpgroups)

    return chunk_bwd


def _mosaic_state_bwd(x, b, q, semantics):
    """The fused Mosaic GPU dout chunk-state + reverse state-pass kernel
    (`pallas_mosaic_rev`) as pallas_gpu.core_backward's `state_bwd`, or None (with a logged
    reason) where it does not take these shapes. It writes dS in x.dtype."""
    ok, why = pallas_mosaic_rev.supported_rev(x=x, b=b, q=q)
    if not ok:
        _warn_once(f"Mosaic GPU SSD reverse state pass does not take this call ({why}); "
                   f"using Triton's")
        return None
    return pallas_mosaic_rev.state_bwd_fn(semantics)


def _core_bwd(q, hpg, interpret, forward, backward, q_fwd, res, grads):
    # forward and q_fwd belong to the forward kernels: the backward depends on neither (its
    # kernels use BACKWARD_SEMANTICS).
    del forward, q_fwd
    pre = res[-1]
    return (*_bwd_impl_once(q, hpg, interpret, backward, res[:-1], grads),
            jax.tree.map(jnp.zeros_like, pre))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _bwd_impl_once(q, hpg, interpret, backward, res, grads):
    """The custom_vjp backward, jitted once for all call sites (see `_fwd_impl_once`).
    backward: (KernelConfig.backward, .backward_warpgroups)."""
    x, b, c, dt, s, hprev, d = res
    backward, warpgroups = backward
    chunk_bwd = (_mosaic_chunk_bwd(x, b, q, BACKWARD_SEMANTICS, warpgroups)
                 if backward == "mosaic" else None)
    state_bwd = _mosaic_state_bwd(x, b, q, BACKWARD_SEMANTICS) if backward == "mosaic" else None
    cfg = (q, hpg, 4, 8, interpret)  # pallas_gpu's (q, heads/group, warps fwd, warps bwd, interpret)
    dx, db, dc, ddt, ds, dh0, dd, _ = _tri.core_backward(
        cfg, (x, b, c, dt, s, hprev, d, None), grads, chunk_bwd=chunk_bwd, state_bwd=state_bwd)
    return dx, db, dc, ddt, ds, dh0, dd


_core.defvjp(_core_fwd, _core_bwd)


def ssd_mosaic_forward(x, dt, A, B, C, chunk_size, *, D=None, z=None, dt_bias=None,
                       dt_softplus=False, dt_limit=(0.0, math.inf), initial_states=None,
                       seq_idx=None, return_final_states=False,
                       kernels: KernelConfig = DEFAULT, interpret: bool = False,
                       semantics: str = DEFAULT_SEMANTICS, dt_source=None):
    """SSD with Mosaic GPU forward kernels; same semantics and returns as `ssd`.

    Args:
      x: (batch, seqlen, nheads, headdim) bfloat16/float16/float32 (float32: tf32 products).
      dt: (batch, seqlen, nheads).
      A: (nheads,).  B, C: (batch, seqlen, ngroups, dstate).
      chunk_size: accepted for the common signature; the kernels use `kernels.block_len`
        positions per chunk (64 or 128; default 128 for 16-bit x, 64 for float32), and
        `kernels.forward_only_block_len` when no gradient is taken, which changes only speed.
      D, z, dt_bias, dt_softplus, dt_limit, initial_states, return_final_states: as `ssd`.
      seq_idx: must be None (not supported yet).
      kernels: the `KernelConfig` (block lengths; `backward` picks the backward's kernels;
        `forward` is the dispatcher's business).
      interpret: run every kernel in its Pallas interpreter (CPU tests; slow).
      semantics: Mosaic GPU lowering semantics of the forward kernels, "lane" or "warpgroup"
        (both lower; see `hopper.compiler_params`); the backward kernels use BACKWARD_SEMANTICS.
      dt_source: None, or (wide, layout): the array dt was read from and `ssd`'s dt_layout;
        the prologue kernel (KernelConfig.prologue "pallas", or "auto" without a gradient)
        then reads wide in place, so a forward-only program never forms dt.
    Returns:
      y (batch, seqlen, nheads, headdim) in x.dtype [, final_states (batch, nheads, headdim,
      dstate) float32]. Differentiable: pallas_gpu's backward, with kernels.backward "mosaic"
      its kernels replaced by the Mosaic GPU reverse state pass (pallas_mosaic_rev) and chunk
      backward (pallas_mosaic_bwd) where those take the call (16-bit inputs), else Triton's.
    Raises:
      ValueError for invalid shapes or an option this kernel does not support.
    """
    sizes = _common.validate_inputs(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                    dt_limit=dt_limit, initial_states=initial_states,
                                    seq_idx=seq_idx, impl="pallas")
    if not isinstance(kernels, KernelConfig):
        raise ValueError(f"ssd_mosaic_forward: kernels must be a KernelConfig, got {kernels!r}")
    q = int(kernels.block_len or default_block_len(x.dtype))
    ok, why = supported(x=x, B=B, seq_idx=seq_idx, block_len=q, check_device=False)
    if not ok:
        raise ValueError(f"ssd_mosaic_forward: {why}")
    if kernels.backward not in BACKWARDS:
        raise ValueError(f"ssd_mosaic_forward: backward must be one of {BACKWARDS}, "
                         f"got {kernels.backward!r}")
    if semantics not in ("lane", "warpgroup"):
        raise ValueError(f"ssd_mosaic_forward: semantics must be 'lane' or 'warpgroup', "
                         f"got {semantics!r}")
    seqlen, nh = sizes["seqlen"], sizes["nheads"]
    p, g = sizes["headdim"], sizes["ngroups"]
    cdt = x.dtype

    dt_kw = dict(dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
    dt_chunks, pre = None, None
    src, layout = dt_source if dt_source is not None else (dt, None)
    directions = 1 if layout is None else layout[1]
    if (kernels.prologue != "xla" and prologue_supported(nh, q, directions)
            and not p & (p - 1)):
        dtk, sk, w, dec_rows = prepare_dt_pallas(src, A, q, weights=True, dec_cols=p,
                                                 layout=layout, interpret=interpret,
                                                 grad_kernel=kernels.prologue == "pallas",
                                                 **dt_kw)
        dt_chunks, pre = (dtk, sk), (w, dec_rows)
    xk, bk, ck, dtk, sk, h0 = _tri.prepare_chunks(x, dt, A, B, C, q, cdt, **dt_kw,
                                                  initial_states=initial_states,
                                                  dt_chunks=dt_chunks)
    tf32 = cdt == jnp.float32
    if D is None or tf32:  # the tf32 kernel leaves D x to XLA (below)
        d = jnp.zeros((nh, p), jnp.float32)
    else:
        d = jnp.broadcast_to(D.astype(jnp.float32).reshape(nh, -1), (nh, p))
    y, fin = _core(xk, bk, ck, dtk, sk, h0, d, q, nh // g, bool(interpret),
                   (semantics, kernels.output_warpgroups, kernels.output_persistent),
                   (kernels.backward, kernels.backward_warpgroups),
                   kernels.forward_only_block_len, pre)
    y = y[:, :seqlen]
    if (tf32 and D is not None) or z is not None:
        y = _common.apply_skip_and_gate(y, x, D=D if tf32 else None, z=z)
    if return_final_states:
        return y, fin
    return y
