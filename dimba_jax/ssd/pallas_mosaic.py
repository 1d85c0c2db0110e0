"""SSD forward with Pallas **Mosaic GPU** kernels (Hopper: TMA + wgmma).

The Mosaic GPU port asked for by issue 5 (`jax.experimental.pallas.mosaic_gpu`, imported as
plgpu). Three forward kernels, one warpgroup per program:

- `_chunk_out_mosaic`, grid (chunk, head, batch): the chunk output
      y = ((C B^T) o L) (x dt) + exp(s) * (C h_c^T) + D x,   L_ij = exp(s_i - s_j) [i >= j]
  TMA copies of the x, B, C tiles (swizzled SMEM), of the incoming state h_c (P x N) and of the
  dt, s, D vectors; wgmma G = C B^T (Q x Q) and C h_c^T (Q x P) issued together; in registers
  M = G * L * dt_j (dt folded into M's columns, so x is used straight from SMEM) and the
  off-chunk term scaled by exp(s_i); wgmma acc += M @ x (M from registers, 16-bit), + D x; y
  cast to x.dtype and written through SMEM by a TMA store.
- `_chunk_state_mosaic`, grid (chunk x dstate block, head, batch): the chunk states
      S_c = (x dt)^T (B exp(s_end - s)) = x^T (w * B),   w = dt exp(s_end - s) (from XLA)
  x * w in registers, back to SMEM, one wgmma (P x Q) @ (Q x N) with x^T as a transposed
  16-bit operand; S_c (float32) written by TMA.
- `_chunk_statepass_mosaic`, grid (dstate block, head, batch): chunk states fused with the
  state pass, h_{c+1} = exp(s_end,c) h_c + S_c, one program walking all chunks of a sequence
  with h in the wgmma accumulator and the next chunk's tiles prefetched (double-buffered TMA);
  it writes only the h_c the output kernel needs (x.dtype) and the final state.

`ssd_mosaic_forward(..., stages=...)` picks which of them run: "statepass+out" (default: two
Mosaic launches), "state+out" (Mosaic chunk states, pallas_gpu's Triton state pass, Mosaic
output) or "out" (Mosaic output only, Triton chunk states + state pass). dt preprocessing,
the chunk-local cumsum s, w and the chunk-end decays, and the z gate stay in XLA, as in
`pallas_gpu`. float32 inputs use tf32 wgmma, which takes A only from SMEM and both operands
K-major: x (and for the state kernels B) arrive transposed from XLA, M goes through SMEM, D x
is added in XLA, and the chunk is 64 long (the f32 tiles of a 128 chunk exceed shared memory).
The backward (custom_vjp) is `pallas_gpu.core_backward`: with `backward="mosaic"` (what
`ssd(impl="pallas")` uses) its two stages are Mosaic GPU kernels, the fused reverse state pass
(`pallas_mosaic_rev`) and the chunk backward (`pallas_mosaic_bwd`), where they take the call;
Triton's otherwise. Every stages value keeps exactly the residuals it needs.

Limits (`supported()` says which applies): headdim and dstate multiples of 64 up to 256 whose
tiles fit in shared memory, block_len 64 or 128, no seq_idx. One chunk per program in the
chunk kernels, no warp specialisation yet. `ssd(impl="pallas")` runs this forward where
`supported()` accepts the call (`pallas_select.py`), else the Triton one.

Mosaic GPU lowering semantics: the kernels lower under both Lane and Warpgroup semantics (jax
0.10 and 0.11.2), pinned by `semantics=` (default DEFAULT_SEMANTICS) rather than left to jax's
default, which became Warpgroup in jax 0.11. The first version failed Warpgroup layout
inference ("Layout inference failed to find a solution") because it loaded the s vector twice
from one SMEM buffer in two layouts; CSE merged the loads (see the s_col_smem comment).

Imports without a GPU; `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` lowers it
on a CPU-only machine (tests/test_ssd_mosaic.py; under jax 0.11 the Triton stages also need an
abstract GPU device, see `cuda_lowering_context`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dimba_jax.ssd import _common
from dimba_jax.ssd import pallas_gpu as _tri

DEFAULT_BLOCK_LEN = 128
# Chunk length of forward-only calls (no gradient: the custom_vjp's primal). On the H200 the
# fused forward at chunk 64 is 1.2-1.3x faster than at 128 (benchmarks/results/ssd_h200.md,
# mosaic_64 rows), while fwd+bwd is faster at 128 (the backward's per-chunk work). None = the
# call's block_len.
FORWARD_ONLY_BLOCK_LEN = 64
DEFAULT_SEMANTICS = "lane"  # Mosaic GPU lowering semantics of the kernels (see below)
# ... and of the two backward kernels (pallas_mosaic_bwd, pallas_mosaic_rev) under `ssd_mosaic_
# forward`: Warpgroup was faster for both on the H200 (chunk backward 0.62 vs 0.65 ms at q128,
# reverse pass 0.28-0.29 vs 0.31 ms at 1.3b-L2k; mosaic_bwd_stage_h200.md, mosaic_rev_stage_h200.md).
BACKWARD_SEMANTICS = "warpgroup"
# Which forward stages are Mosaic GPU kernels: "state+out" chunk states and chunk output (the
# Triton state pass between them); "statepass+out" chunk states fused with the state pass, then
# chunk output; "out" chunk output only (Triton chunk states and state pass).
STAGES = ("state+out", "statepass+out", "out")
DEFAULT_STAGES = "statepass+out"  # fastest forward on the H200 (mosaic_probe_h200.md)
BACKWARDS = ("triton", "mosaic")  # ssd_mosaic_forward(backward=...)
# Chunk-output kernel of the forward at block_len 128 with 16-bit inputs (opt-in): "whole"
# (`_chunk_out_mosaic`, one block per SM at q 128) or "slab" (`pallas_mosaic_out`: the chunk in
# 64-row slabs, shared memory for two blocks per SM). Read when the forward is traced (it is
# jitted once per config: set it before the first call, or call jax.clear_caches() after).
OUT_KERNELS = ("whole", "slab")
OUT_KERNEL = "whole"
logger = logging.getLogger(__name__)


def _warn_once(message: str) -> None:
    _common.warn_once(logger, message)


_SMEM_LIMIT = 220 * 1024  # an H100/H200 block may use up to 227 KB of shared memory
_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def default_block_len(dtype) -> int:
    """Kernel chunk length: 128 for 16-bit inputs, 64 for float32 (its tiles need 2x SMEM)."""
    return 64 if jnp.dtype(dtype) == jnp.dtype(jnp.float32) else DEFAULT_BLOCK_LEN


def _plgpu():
    """The Pallas Mosaic GPU module, imported on first use."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
    return plgpu


def _interpret_params():
    """The Mosaic GPU interpreter's parameters (not public API in jax 0.10; private import)."""
    plgpu = _plgpu()
    if hasattr(plgpu, "InterpretGPUParams"):
        return plgpu.InterpretGPUParams()
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=g-import-not-at-top
    return InterpretGPUParams()


def _compiler_params(plgpu, semantics: str = "lane"):
    """Compiler parameters pinning Mosaic GPU's lowering semantics ("lane" or "warpgroup").

    The kernel gives explicit register layouts (plgpu.load(..., layout=...),
    broadcasted_iota(..., layout=WGMMA)) and lowers under both semantics, so it pins one rather
    than inherit jax's default, which changed from Lane (jax 0.10) to Warpgroup (jax 0.11).
    Under Warpgroup semantics the layouts of all other values come from Mosaic's layout
    inference (it failed on the first version of this kernel: see the s_col_smem comment).
    """
    if semantics not in ("lane", "warpgroup"):
        raise ValueError(f"semantics must be 'lane' or 'warpgroup', got {semantics!r}")
    kinds = plgpu.LoweringSemantics
    return plgpu.CompilerParams(
        lowering_semantics=kinds.Lane if semantics == "lane" else kinds.Warpgroup)


def smem_loader(plgpu, interpret: bool):
    """load(ref, layout): a register value of an SMEM ref in a Mosaic GPU register layout, for
    both jax versions (0.10's plgpu.load needs an index, 0.11 deprecates it); a plain read in
    the interpreter, which has no plgpu.load and ignores layouts."""
    takes_idx = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty

    def load(ref, layout):
        if interpret:
            return ref[...]
        if takes_idx:
            return plgpu.load(ref, (), layout=layout)
        return plgpu.load(ref, layout=layout)

    return load


_16BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def tile_operand_reason(kernel: str, x, b, q: int, *, max_dstate: int = 128,
                        float32_note: str = "") -> str | None:
    """Why a 16-bit Mosaic GPU SSD kernel named `kernel` cannot take these operands, or None.

    The checks the backward and slab-output kernels share (each adds its shared-memory check):
    x in bfloat16 / float16 (else the message ends with `float32_note`), headdim 64 or 128,
    dstate a multiple of 64 up to `max_dstate`, block_len q 64 or 128, x (batch, Lp, nheads, P)
    with Lp a multiple of q. x, b: arrays or anything with .shape and .dtype (b: (batch, Lp,
    ngroups, N)).
    """
    p, n = x.shape[-1], b.shape[-1]
    if jnp.dtype(x.dtype) not in _16BIT:
        return f"mosaic SSD {kernel} needs x in bfloat16/float16, got {x.dtype}{float32_note}"
    if p not in (64, 128):
        return f"mosaic SSD {kernel} needs headdim 64 or 128, got {p}"
    if n % 64 or not 64 <= n <= max_dstate:
        allowed = "64 or 128" if max_dstate == 128 else f"a multiple of 64 in [64, {max_dstate}]"
        return f"mosaic SSD {kernel} needs dstate {allowed}, got {n}"
    if q not in (64, 128):
        return f"mosaic SSD {kernel} needs block_len 64 or 128, got {q}"
    if len(x.shape) != 4 or x.shape[1] % q:
        return (f"mosaic SSD {kernel} needs x (batch, Lp, nheads, P) with Lp a multiple of {q}, "
                f"got {tuple(x.shape)}")
    return None


def store_tile_last(plgpu, smem, value, dst) -> None:
    """A kernel's last store: `value` into `smem` once every earlier TMA store has read its
    SMEM, then TMA to the HBM ref `dst`, waiting for the store to complete."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    smem[...] = value
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem, dst)
    plgpu.wait_smem_to_gmem(0)


def _kernel_call(plgpu, body, out_type, scratch_types, **kwargs):
    """plgpu.kernel with `out_type` / `scratch_types` (jax 0.10+) or the older `out_shape` /
    `scratch_shapes` keywords, whichever this jax's signature has."""
    params = inspect.signature(plgpu.kernel).parameters
    out_key = "out_type" if "out_type" in params else "out_shape"
    scratch_key = "scratch_types" if "scratch_types" in params else "scratch_shapes"
    return plgpu.kernel(body, **{out_key: out_type, scratch_key: scratch_types}, **kwargs)


def _smem_transforms(plgpu, minor: int, dtype):
    """(tiling, swizzle) transforms for a 2-D SMEM tile whose last dimension has `minor` items."""
    bits = minor * jnp.dtype(dtype).itemsize * 8
    swizzle = 128
    for cand in (128, 64, 32):
        if bits % (cand * 8) == 0:
            swizzle = cand
            break
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))


def cuda_lowering_context(device_kind: str = "NVIDIA H200", num_cores: int = 132):
    """Context for `jit(...).trace(...).lower(lowering_platforms=("cuda",))` on a machine
    without a GPU.

    jax 0.11's Pallas Triton lowering (the chunk-state / state-pass stages and the backward)
    asks for the target GPU's description and, with no GPU present, needs an abstract GPU device
    on the abstract mesh; the Mosaic GPU lowering then targets sm_90a as well. On a GPU machine
    (or where the abstract-mesh API is missing) this is a no-op context.

    Returns:
      A context manager.
    """
    if jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    try:
        device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=num_cores,
                                             platform="gpu")
        mesh = jax.sharding.AbstractMesh((), (), abstract_device=device)
        return jax.sharding.use_abstract_mesh(mesh)
    except (AttributeError, TypeError):  # an older jax: the Triton lowering needs no device
        return contextlib.nullcontext()


def supported(*, x, dt=None, A=None, B, C=None, chunk_size=None, D=None, z=None, dt_bias=None,
              dt_softplus=False, dt_limit=(0.0, math.inf), initial_states=None, seq_idx=None,
              return_final_states=False, block_len: int | None = None,
              stages: str = DEFAULT_STAGES, check_device: bool = True) -> tuple[bool, str]:
    """Whether `ssd_mosaic_forward` handles these arguments (and, if check_device, this device).

    stages: one of STAGES; the chunk-state ("state+out") or fused chunk-state + state-pass
      ("statepass+out") kernel must fit too.

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
    if smem > _SMEM_LIMIT:
        return False, (f"mosaic SSD kernel tiles need {smem} bytes of shared memory "
                       f"(block_len {q}, headdim {headdim}, dstate {dstate}); limit {_SMEM_LIMIT}")
    if stages not in STAGES:
        return False, f"mosaic SSD stages must be one of {STAGES}, got {stages!r}"
    if stages == "state+out":
        smem = _state_smem_bytes(q, headdim, dstate, itemsize)
    elif stages == "statepass+out":  # the narrowest column block: the fewest bytes
        smem = _statepass_smem_bytes(q, headdim, 64, itemsize)
    if stages != "out" and smem > _SMEM_LIMIT:
        return False, (f"mosaic SSD {stages.split('+')[0]} kernel tiles need {smem} bytes of "
                       f"shared memory (block_len {q}, headdim {headdim}, dstate {dstate}); "
                       f"limit {_SMEM_LIMIT}")
    reason = _tri.backward_size_reason(headdim, dstate)  # the backward is pallas_gpu's
    if reason is not None:
        return False, reason
    if check_device:
        reason = _tri._device_reason()  # Hopper GPU check (shared with the Triton module)
        if reason is not None:
            return False, reason
        try:
            _plgpu()
        except ImportError as e:
            return False, f"jax.experimental.pallas.mosaic_gpu unavailable ({e})"
    return True, ""


# --------------------------------------------------------------------------------------------
# The Mosaic GPU chunk-output kernel.
# --------------------------------------------------------------------------------------------


def _chunk_out_mosaic(x, b, c, dt, s, hprev, d, *, q, hpg, interpret=False,
                      semantics: str = DEFAULT_SEMANTICS):
    """Chunk-output stage on Hopper.

    Args:
      x: (batch, Lp, nheads, P) bf16/f16, Lp a multiple of q; float32 x comes transposed,
        (batch, nheads, P, Lp), and then D is NOT applied (the caller adds D x).
      b, c: (batch, Lp, ngroups, N), x.dtype.
      dt, s: (batch, nheads, Lp) float32 (processed dt; chunk-local cumsum of dt*A).
      hprev: (batch, nheads, Lp // q, P, N) x.dtype, the state entering each chunk.
      d: (nheads, P) float32 skip weight.
      q: chunk length (64 or 128).  hpg: heads per group.
      interpret: run in the Mosaic GPU interpreter (any device; slow, for tests).
      semantics: Mosaic GPU lowering semantics, "lane" (what the kernel is written for) or
        "warpgroup" (jax 0.11's default; a diagnostic, see `_compiler_params`).
    Returns:
      y: (batch, Lp, nheads, P) x.dtype.
    """
    plgpu = _plgpu()
    tf32 = jnp.dtype(x.dtype) == jnp.dtype(jnp.float32)
    if tf32:
        bsz, nh, p, lp = x.shape
    else:
        bsz, lp, nh, p = x.shape
    n = b.shape[-1]
    nc = lp // q
    cdt = x.dtype
    f32 = jnp.float32
    wgmma_layout = plgpu.Layout.WGMMA
    row = plgpu.Layout.WGMMA.reduce(1)  # (q,) vector indexed by the row i
    col = plgpu.Layout.WGMMA.reduce(0)  # vector indexed by the column j

    load = smem_loader(plgpu, interpret)

    def iota(shape, dim):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=wgmma_layout)

    def body(x_ref, b_ref, c_ref, dt_ref, s_ref, h_ref, d_ref, y_ref,
             x_smem, b_smem, c_smem, h_smem, s_smem, s_col_smem, dt_smem, d_smem, bars,
             *extra_smem):
        ci = lax.axis_index("chunk")
        hi = lax.axis_index("head")
        bi = lax.axis_index("batch")
        gi = lax.div(hi, jnp.array(hpg, hi.dtype))
        rows = pl.ds(ci * q, q)
        plgpu.copy_gmem_to_smem(c_ref.at[bi, rows, gi], c_smem, bars.at[0])
        plgpu.copy_gmem_to_smem(b_ref.at[bi, rows, gi], b_smem, bars.at[1])
        plgpu.copy_gmem_to_smem(h_ref.at[bi, hi, ci], h_smem, bars.at[2])
        plgpu.copy_gmem_to_smem(s_ref.at[bi, hi, rows], s_smem, bars.at[3])
        # s is needed along rows (s_i) and along columns (s_j), two register layouts. Two
        # loads of one SMEM buffer are merged by CSE into one value that Warpgroup layout
        # inference cannot relayout to both, so the column copy gets its own buffer.
        plgpu.copy_gmem_to_smem(s_ref.at[bi, hi, rows], s_col_smem, bars.at[7])
        plgpu.copy_gmem_to_smem(dt_ref.at[bi, hi, rows], dt_smem, bars.at[4])
        if tf32:  # x arrives transposed, (batch, nheads, P, Lp): a (P, q) tile
            plgpu.copy_gmem_to_smem(x_ref.at[bi, hi, pl.ds(0, p), rows], x_smem, bars.at[5])
        else:
            plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, hi], x_smem, bars.at[5])
        plgpu.copy_gmem_to_smem(d_ref.at[hi], d_smem, bars.at[6])
        plgpu.barrier_wait(bars.at[0])
        plgpu.barrier_wait(bars.at[1])
        plgpu.barrier_wait(bars.at[2])

        def products(g_acc, off_acc):
            plgpu.wgmma(g_acc, c_smem, b_smem.transpose((1, 0)))     # C B^T
            plgpu.wgmma(off_acc, c_smem, h_smem.transpose((1, 0)))   # C h^T
            return g_acc[...], off_acc[...]

        # The Mosaic GPU interpreter (CPU tests) runs TMA copies, barriers and the elementwise
        # math of this kernel, but its wgmma takes neither transposed operands nor A in
        # registers, and it has no plgpu.load / layouts: there the products are plain dots.
        if interpret:
            c_val = c_smem[...]
            nt = (((1,), (1,)), ((), ()))
            g = lax.dot_general(c_val, b_smem[...], nt, preferred_element_type=f32)
            off = lax.dot_general(c_val, h_smem[...], nt, preferred_element_type=f32)
        else:
            g, off = pl.run_scoped(products, plgpu.ACC((q, q), f32), plgpu.ACC((q, p), f32))

        plgpu.barrier_wait(bars.at[3])
        plgpu.barrier_wait(bars.at[4])
        plgpu.barrier_wait(bars.at[7])
        s_i = load(s_smem, row)
        s_j = load(s_col_smem, col)
        dt_j = load(dt_smem, col)
        i_idx = iota((q, q), 0)
        j_idx = iota((q, q), 1)
        diff = (lax.broadcast_in_dim(s_i, (q, q), [0])
                - lax.broadcast_in_dim(s_j, (q, q), [1]))
        decay = jnp.exp(jnp.where(i_idx >= j_idx, diff, -jnp.inf))
        m = (g * decay * lax.broadcast_in_dim(dt_j, (q, q), [1])).astype(cdt)
        y0 = off * lax.broadcast_in_dim(jnp.exp(s_i), (q, p), [0])

        plgpu.barrier_wait(bars.at[5])

        if tf32:
            # tf32 wgmma: A only from SMEM and both operands K-major, so M goes through SMEM
            # and x is read as the transpose of its (P, q) tile. D x is added by the caller.
            m_smem, y_smem = extra_smem
            if interpret:
                y = y0 + jnp.dot(m, x_smem[...].T, preferred_element_type=f32)
            else:
                m_smem[...] = m
                plgpu.commit_smem()

                def intra_tf32(acc_ref):
                    plgpu.wgmma(acc_ref, m_smem, x_smem.transpose((1, 0)))

                y = pl.run_state(intra_tf32)(plgpu.ACC.init(y0))
            y_smem[...] = y
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(y_smem, y_ref.at[bi, rows, hi])
            plgpu.wait_smem_to_gmem(0)
            plgpu.barrier_wait(bars.at[6])
            return

        if interpret:  # the interpreter's wgmma takes no A in registers: same product
            y = y0 + jnp.dot(m, x_smem[...], preferred_element_type=f32)
        else:  # accumulate M (x) straight onto the off-chunk term
            def intra_init(acc_ref):
                plgpu.wgmma(acc_ref, m, x_smem)                                   # y0 + M (x)

            y = pl.run_state(intra_init)(plgpu.ACC.init(y0))

        plgpu.barrier_wait(bars.at[6])
        d_p = load(d_smem, col)
        xr = load(x_smem, wgmma_layout).astype(f32)
        y = y + xr * lax.broadcast_in_dim(d_p, (q, p), [1])
        (y_smem,) = extra_smem
        y_smem[...] = y.astype(cdt)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_smem, y_ref.at[bi, rows, hi])
        plgpu.wait_smem_to_gmem(0)

    x_tile = (p, q) if tf32 else (q, p)
    scratch = [
        plgpu.SMEM(x_tile, cdt, transforms=_smem_transforms(plgpu, x_tile[1], cdt)),
        plgpu.SMEM((q, n), cdt, transforms=_smem_transforms(plgpu, n, cdt)),
        plgpu.SMEM((q, n), cdt, transforms=_smem_transforms(plgpu, n, cdt)),
        plgpu.SMEM((p, n), cdt, transforms=_smem_transforms(plgpu, n, cdt)),
        plgpu.SMEM((q,), f32),  # s (rows)
        plgpu.SMEM((q,), f32),  # s (columns)
        plgpu.SMEM((q,), f32),  # dt
        plgpu.SMEM((p,), f32),
        plgpu.Barrier(num_barriers=8),
    ]
    if tf32:  # M and y tiles
        scratch += [plgpu.SMEM((q, q), f32, transforms=_smem_transforms(plgpu, q, f32)),
                    plgpu.SMEM((q, p), f32, transforms=_smem_transforms(plgpu, p, f32))]
    else:  # y tile
        scratch += [plgpu.SMEM((q, p), cdt, transforms=_smem_transforms(plgpu, p, cdt))]
    y_shape = (bsz, lp, nh, p)
    return _kernel_call(
        plgpu, body, jax.ShapeDtypeStruct(y_shape, cdt), scratch,
        grid=(nc, nh, bsz), grid_names=("chunk", "head", "batch"),
        **({"interpret": _interpret_params()} if interpret
           else {"compiler_params": _compiler_params(plgpu, semantics)}),
    )(x, b, c, dt, s, hprev, d)


# --------------------------------------------------------------------------------------------
# The Mosaic GPU chunk-state kernel.
# --------------------------------------------------------------------------------------------

_STATE_ACC_ITEMS = 64 * 256  # f32 accumulator items per program: 128 registers per thread


def _state_block_cols(p: int, n: int) -> int:
    """dstate columns of S_c one program computes: all n when the (p, n) float32 accumulator
    fits in 128 registers per thread of the warpgroup, else the widest multiple-of-64 divisor
    of n that does (the remaining column blocks are further programs)."""
    for k in range(n // 64, 0, -1):
        if (n // 64) % k == 0 and p * 64 * k <= _STATE_ACC_ITEMS:
            return 64 * k
    return 64


def _state_smem_bytes(q: int, p: int, n: int, itemsize: int) -> int:
    """Shared memory of the chunk-state kernel: x and scaled x tiles, the B tile, the f32 S_c
    tile, the weight vector."""
    nb = _state_block_cols(p, n)
    return itemsize * (2 * q * p + q * nb) + 4 * (p * nb + q)


def _state_weights(dt, s, q):
    """w_t = dt_t * exp(s_end - s_t), the per-position weight of the chunk states.

    Args:
      dt, s: (batch, nheads, Lp) float32, Lp a multiple of q (s the chunk-local cumsum of dt*A).
    Returns:
      (batch, nheads, Lp) float32.
    """
    bsz, nh, lp = s.shape
    sc = s.reshape(bsz, nh, lp // q, q)
    return (dt.reshape(sc.shape) * jnp.exp(sc[..., -1:] - sc)).reshape(bsz, nh, lp)


def _state_operand_dims(x: jax.Array, b: jax.Array):
    """(tf32, batch, Lp, nheads, P, N) of the chunk-state kernels' x / B operands.

    16-bit operands come as x (batch, Lp, nheads, P), B (batch, Lp, ngroups, N); float32 (tf32)
    ones pre-transposed as x (batch, nheads, P, Lp), B (batch, ngroups, N, Lp).
    """
    tf32 = jnp.dtype(x.dtype) == jnp.dtype(jnp.float32)
    if tf32:
        bsz, nh, p, lp = x.shape
        return tf32, bsz, lp, nh, p, b.shape[2]
    bsz, lp, nh, p = x.shape
    return tf32, bsz, lp, nh, p, b.shape[-1]


def _chunk_state_mosaic(x, b, w, *, q, hpg, interpret=False, semantics: str = DEFAULT_SEMANTICS):
    """Chunk-state stage on Hopper: S_c = x_c^T (w_c * B_c), i.e. (x dt)^T (B exp(s_end - s)).

    One program per (chunk, dstate column block, head, batch), one warpgroup: TMA copies of the
    x and B tiles and of w; x * w in registers (its (q, P) tile is half the size of B's), stored
    back to swizzled SMEM in x's dtype (as pallas_gpu's Triton kernel rounds w * B); one wgmma
    (P x q) @ (q x nb) with a float32 accumulator; S_c written through SMEM by a TMA store.
    16-bit inputs take x^T straight from x's (q, P) tile (wgmma transposes 16-bit operands).
    tf32 takes no transposed operand (both must be K-major, K = q here), so float32 x and B
    arrive transposed: x (batch, nheads, P, Lp) and B (batch, ngroups, N, Lp).

    Args:
      x: (batch, Lp, nheads, P) bf16/f16, or float32 transposed to (batch, nheads, P, Lp).
      b: (batch, Lp, ngroups, N) x.dtype, or float32 transposed to (batch, ngroups, N, Lp).
      w: (batch, nheads, Lp) float32, `_state_weights(dt, s, q)`.
      q: chunk length (64 or 128).  hpg: heads per group.
      interpret: run in the Mosaic GPU interpreter (products as plain dots there).
      semantics: Mosaic GPU lowering semantics, "lane" or "warpgroup".
    Returns:
      states: (batch, nheads, Lp // q, P, N) float32.
    """
    plgpu = _plgpu()
    tf32, bsz, lp, nh, p, n = _state_operand_dims(x, b)
    nc = lp // q
    nb = _state_block_cols(p, n)
    nblk = n // nb
    cdt = x.dtype
    f32 = jnp.float32
    wgmma_layout = plgpu.Layout.WGMMA
    # w scales x's rows (q, P) for 16-bit inputs, the columns of x^T (P, q) for tf32.
    w_layout = wgmma_layout.reduce(0) if tf32 else wgmma_layout.reduce(1)

    load = smem_loader(plgpu, interpret)

    def body(x_ref, b_ref, w_ref, st_ref, x_smem, b_smem, w_smem, xw_smem, st_smem, bars):
        pid = lax.axis_index("chunk")  # chunk * nblk + column block
        ci = lax.div(pid, jnp.array(nblk, pid.dtype))
        ni = lax.rem(pid, jnp.array(nblk, pid.dtype))
        hi = lax.axis_index("head")
        bi = lax.axis_index("batch")
        gi = lax.div(hi, jnp.array(hpg, hi.dtype))
        rows = pl.ds(ci * q, q)
        cols = pl.ds(ni * nb, nb)
        if tf32:
            plgpu.copy_gmem_to_smem(x_ref.at[bi, hi, pl.ds(0, p), rows], x_smem, bars.at[0])
            plgpu.copy_gmem_to_smem(b_ref.at[bi, gi, cols, rows], b_smem, bars.at[1])
        else:
            plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, hi], x_smem, bars.at[0])
            plgpu.copy_gmem_to_smem(b_ref.at[bi, rows, gi, cols], b_smem, bars.at[1])
        plgpu.copy_gmem_to_smem(w_ref.at[bi, hi, rows], w_smem, bars.at[2])
        plgpu.barrier_wait(bars.at[0])
        plgpu.barrier_wait(bars.at[2])
        xv = load(x_smem, wgmma_layout).astype(f32)
        wv = load(w_smem, w_layout)
        if tf32:  # x^T tile (P, q): w along the columns
            xw = xv * lax.broadcast_in_dim(wv, (p, q), [1])
        else:     # x tile (q, P): w along the rows
            xw = xv * lax.broadcast_in_dim(wv, (q, p), [0])
        xw_smem[...] = xw.astype(cdt)
        plgpu.commit_smem()
        plgpu.barrier_wait(bars.at[1])

        if interpret:  # the interpreter's wgmma takes no transposed operands: a plain dot
            a_val = xw_smem[...]
            b_val = b_smem[...]
            if tf32:  # (P, q) @ (nb, q)^T
                st = lax.dot_general(a_val, b_val, (((1,), (1,)), ((), ())),
                                     preferred_element_type=f32)
            else:     # (q, P)^T @ (q, nb)
                st = lax.dot_general(a_val, b_val, (((0,), (0,)), ((), ())),
                                     preferred_element_type=f32)
        else:
            def product(acc_ref):
                if tf32:  # A = x^T tile (K-major), B = (B^T tile)^T (K-major)
                    plgpu.wgmma(acc_ref, xw_smem, b_smem.transpose((1, 0)))
                else:     # A = (x tile)^T (M-major, 16-bit only), B = B tile
                    plgpu.wgmma(acc_ref, xw_smem.transpose((1, 0)), b_smem)
                return acc_ref[...]

            st = pl.run_scoped(product, plgpu.ACC((p, nb), f32))
        st_smem[...] = st
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(st_smem, st_ref.at[bi, hi, ci, pl.ds(0, p), cols])
        plgpu.wait_smem_to_gmem(0)

    x_tile = (p, q) if tf32 else (q, p)
    b_tile = (nb, q) if tf32 else (q, nb)
    scratch = [
        plgpu.SMEM(x_tile, cdt, transforms=_smem_transforms(plgpu, x_tile[1], cdt)),
        plgpu.SMEM(b_tile, cdt, transforms=_smem_transforms(plgpu, b_tile[1], cdt)),
        plgpu.SMEM((q,), f32),
        plgpu.SMEM(x_tile, cdt, transforms=_smem_transforms(plgpu, x_tile[1], cdt)),
        plgpu.SMEM((p, nb), f32, transforms=_smem_transforms(plgpu, nb, f32)),
        plgpu.Barrier(num_barriers=3),
    ]
    return _kernel_call(
        plgpu, body, jax.ShapeDtypeStruct((bsz, nh, nc, p, n), f32), scratch,
        grid=(nc * nblk, nh, bsz), grid_names=("chunk", "head", "batch"),
        **({"interpret": _interpret_params()} if interpret
           else {"compiler_params": _compiler_params(plgpu, semantics)}),
    )(x, b, w)


# --------------------------------------------------------------------------------------------
# The Mosaic GPU chunk-state + state-pass kernel (stages="statepass+out").
# --------------------------------------------------------------------------------------------

_NUM_SMS = 132  # H100 / H200


def _statepass_block_cols(q: int, p: int, n: int, itemsize: int, programs: int) -> int:
    """dstate columns per program of the fused state kernel: as `_state_block_cols`, narrowed
    to 64 when the (batch x heads x column blocks) programs would not fill two waves of SMs
    (each program walks all chunks of its sequence, so programs are the only parallelism) or
    when the wider tiles exceed shared memory."""
    nb = _state_block_cols(p, n)
    if (programs * (n // nb) < 2 * _NUM_SMS
            or _statepass_smem_bytes(q, p, nb, itemsize) > _SMEM_LIMIT):
        nb = 64
    return nb


def _statepass_smem_bytes(q: int, p: int, nb: int, itemsize: int, slots: int = 2) -> int:
    """Shared memory of the fused state kernel: `slots` slots of x, B, w, decay; the scaled x
    tile; two slots of the outgoing h_c tile; one float32 h tile (initial / final state)."""
    loads = slots * (itemsize * (q * p + q * nb) + 4 * (q + p))
    return loads + itemsize * q * p + 2 * itemsize * p * nb + 4 * p * nb


_TWO_BLOCKS_SMEM = 228 * 1024 // 2 - 1024  # per block, for two blocks per SM (1 KB reserved each)
MAX_STATEPASS_SLOTS = 4


def _statepass_slots(q: int, p: int, nb: int, itemsize: int) -> int:
    """TMA slots (chunks in flight) of the fused state kernel: the walk over the chunks is
    sequential, so a step waits on the load of its chunk unless it was issued several steps
    earlier. As many as fit (up to MAX_STATEPASS_SLOTS) without losing the blocks per SM that
    two slots allow (two blocks where two slots fit in half an SM's shared memory)."""
    limit = (_TWO_BLOCKS_SMEM if _statepass_smem_bytes(q, p, nb, itemsize) <= _TWO_BLOCKS_SMEM
             else _SMEM_LIMIT)
    slots = 2
    while (slots < MAX_STATEPASS_SLOTS
           and _statepass_smem_bytes(q, p, nb, itemsize, slots + 1) <= limit):
        slots += 1
    return slots


def _chunk_statepass_mosaic(x, b, w, dec, h0, *, q, hpg, hprev_dtype, block_cols=None,
                            slots=None, segments=1, write_hprev=True, interpret=False,
                            semantics: str = DEFAULT_SEMANTICS):
    """Chunk states and the state pass in one kernel: h_0 = h0, h_{c+1} = dec_c h_c + S_c with
    S_c = x_c^T (w_c * B_c), the states never leaving the chip.

    One program per (dstate column block, head, batch), one warpgroup, walking the chunks in
    order with h in the wgmma accumulator (h_{c+1} = wgmma(acc = dec_c h_c, (x w)^T, B)). The
    x / B / w / decay tiles of chunks c + 1 .. c + slots - 1 are in flight (TMA, `slots`
    buffers) while chunk c is computed; each h_c is written (x.dtype, TMA store from a double-buffered SMEM tile) for the
    output kernel and the backward. Operand layouts as `_chunk_state_mosaic`.

    Args:
      x: (batch, Lp, nheads, P) bf16/f16, or float32 transposed to (batch, nheads, P, Lp).
      b: (batch, Lp, ngroups, N) x.dtype, or float32 transposed to (batch, ngroups, N, Lp).
      w: (batch, nheads, Lp) float32, `_state_weights(dt, s, q)`.
      dec: (batch, nheads, Lp // q, P) float32, exp(s at the chunk's end) repeated over P.
      h0: (batch, nheads, P, N) float32 initial states.
      q: chunk length.  hpg: heads per group.  hprev_dtype: dtype of the h_c output.
      block_cols: dstate columns per program (default `_statepass_block_cols`).
      slots: TMA buffers of the chunk inputs, >= 2 (default `_statepass_slots`).
      segments: the chunks are cut into this many equal segments (it must divide Lp // q),
        walked by separate programs, each from its own initial state: h0 is then
        (batch, segments, nheads, P, N) and `final` (batch, segments, nheads, P, N), the state
        at each segment's end (`_segmented_statepass` combines them).
      write_hprev: False skips the h_c stores (hprev is then a (1, 1, 1, P, block_cols)
        placeholder).
    Returns:
      hprev: (batch, nheads, Lp // q, P, N) hprev_dtype, the state entering each chunk;
      final: (batch, nheads, P, N) float32 (per segment: see `segments`).
    """
    plgpu = _plgpu()
    tf32, bsz, lp, nh, p, n = _state_operand_dims(x, b)
    nc = lp // q
    nb = int(block_cols or _statepass_block_cols(q, p, n, jnp.dtype(x.dtype).itemsize, bsz * nh))
    if n % nb or nb % 64:
        raise ValueError(f"block_cols must be a multiple of 64 dividing dstate {n}, got {nb}")
    nblk = n // nb
    itemsize = jnp.dtype(x.dtype).itemsize
    k = int(slots or _statepass_slots(q, p, nb, itemsize))
    if k < 2:
        raise ValueError(f"slots must be >= 2, got {k}")
    nseg = int(segments)
    if nseg < 1 or nc % nseg:
        raise ValueError(f"segments must be >= 1 and divide the {nc} chunks, got {segments}")
    ncs = nc // nseg  # chunks per segment
    cdt = x.dtype
    f32 = jnp.float32
    wgmma_layout = plgpu.Layout.WGMMA
    w_layout = wgmma_layout.reduce(0) if tf32 else wgmma_layout.reduce(1)
    row = wgmma_layout.reduce(1)  # (P,) vector along the rows of h

    load = smem_loader(plgpu, interpret)

    def body(x_ref, b_ref, w_ref, dec_ref, h0_ref, hp_ref, fin_ref,
             x_smem, b_smem, w_smem, dec_smem, xw_smem, hp_smem, h_smem,
             x_bars, b_bars, w_bars, dec_bars, h_bar):
        ni = lax.axis_index("col")
        hi = lax.axis_index("head")
        bsi = lax.axis_index("batch")  # batch x segment
        bi = lax.div(bsi, jnp.array(nseg, bsi.dtype))
        si = lax.rem(bsi, jnp.array(nseg, bsi.dtype))
        c_first = si * ncs  # the segment's first chunk
        gi = lax.div(hi, jnp.array(hpg, hi.dtype))
        cols = pl.ds(ni * nb, nb)
        h0_at = h0_ref.at[bi, si, hi] if nseg > 1 else h0_ref.at[bi, hi]
        fin_at = fin_ref.at[bi, si, hi] if nseg > 1 else fin_ref.at[bi, hi]

        def fetch(c, slot):  # c counts the segment's chunks; cg is the chunk's global index
            cg = c_first + c
            rows = pl.ds(cg * q, q)
            if tf32:
                plgpu.copy_gmem_to_smem(x_ref.at[bi, hi, pl.ds(0, p), rows], x_smem.at[slot],
                                        x_bars.at[slot])
                plgpu.copy_gmem_to_smem(b_ref.at[bi, gi, cols, rows], b_smem.at[slot],
                                        b_bars.at[slot])
            else:
                plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, hi], x_smem.at[slot], x_bars.at[slot])
                plgpu.copy_gmem_to_smem(b_ref.at[bi, rows, gi, cols], b_smem.at[slot],
                                        b_bars.at[slot])
            plgpu.copy_gmem_to_smem(w_ref.at[bi, hi, rows], w_smem.at[slot], w_bars.at[slot])
            plgpu.copy_gmem_to_smem(dec_ref.at[bi, hi, cg], dec_smem.at[slot], dec_bars.at[slot])

        plgpu.copy_gmem_to_smem(h0_at.at[pl.ds(0, p), cols], h_smem, h_bar.at[0])
        for c0 in range(k - 1):  # chunks 0 .. k - 2 in flight before the walk starts
            if c0 < ncs:
                fetch(c0, c0)
        plgpu.barrier_wait(h_bar.at[0])
        h_init = load(h_smem, wgmma_layout)

        def step(c, h):
            slot = lax.rem(c, k)
            ahead = c + k - 1

            @pl.when(ahead < ncs)
            def _prefetch():  # into the slot chunk c - 1 used; its readers have finished
                fetch(ahead, lax.rem(ahead, k))

            plgpu.barrier_wait(x_bars.at[slot])
            plgpu.barrier_wait(w_bars.at[slot])
            plgpu.barrier_wait(dec_bars.at[slot])
            xv = load(x_smem.at[slot], wgmma_layout).astype(f32)
            wv = load(w_smem.at[slot], w_layout)
            decv = load(dec_smem.at[slot], row)
            if tf32:
                xw = xv * lax.broadcast_in_dim(wv, (p, q), [1])
            else:
                xw = xv * lax.broadcast_in_dim(wv, (q, p), [0])
            xw_smem[...] = xw.astype(cdt)
            if write_hprev:
                # h_c out: the TMA store of chunk c - 2 (same h slot) must have read its tile.
                hslot = lax.rem(c, 2)
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                hp_smem.at[hslot][...] = h.astype(hprev_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(hp_smem.at[hslot],
                                        hp_ref.at[bi, hi, c_first + c, pl.ds(0, p), cols])
            h_dec = h * lax.broadcast_in_dim(decv, (p, nb), [0])
            plgpu.barrier_wait(b_bars.at[slot])
            if interpret:
                if tf32:
                    s_c = lax.dot_general(xw_smem[...], b_smem.at[slot][...],
                                          (((1,), (1,)), ((), ())), preferred_element_type=f32)
                else:
                    s_c = lax.dot_general(xw_smem[...], b_smem.at[slot][...],
                                          (((0,), (0,)), ((), ())), preferred_element_type=f32)
                return h_dec + s_c

            def update(acc_ref):
                if tf32:
                    plgpu.wgmma(acc_ref, xw_smem, b_smem.at[slot].transpose((1, 0)))
                else:
                    plgpu.wgmma(acc_ref, xw_smem.transpose((1, 0)), b_smem.at[slot])

            return pl.run_state(update)(plgpu.ACC.init(h_dec))

        h_fin = lax.fori_loop(0, ncs, step, h_init)
        store_tile_last(plgpu, h_smem, h_fin, fin_at.at[pl.ds(0, p), cols])

    x_tile = (p, q) if tf32 else (q, p)
    b_tile = (nb, q) if tf32 else (q, nb)
    tr = functools.partial(_smem_transforms, plgpu)
    scratch = [
        plgpu.SMEM((k, *x_tile), cdt, transforms=tr(x_tile[1], cdt)),
        plgpu.SMEM((k, *b_tile), cdt, transforms=tr(b_tile[1], cdt)),
        plgpu.SMEM((k, q), f32),
        plgpu.SMEM((k, p), f32),
        plgpu.SMEM(x_tile, cdt, transforms=tr(x_tile[1], cdt)),
        plgpu.SMEM((2, p, nb), hprev_dtype, transforms=tr(nb, hprev_dtype)),
        plgpu.SMEM((p, nb), f32, transforms=tr(nb, f32)),
        plgpu.Barrier(num_barriers=k),
        plgpu.Barrier(num_barriers=k),
        plgpu.Barrier(num_barriers=k),
        plgpu.Barrier(num_barriers=k),
        plgpu.Barrier(num_barriers=1),
    ]
    seg_dims = (nseg,) if nseg > 1 else ()
    if h0.shape != (bsz, *seg_dims, nh, p, n):
        raise ValueError(f"h0 must be {(bsz, *seg_dims, nh, p, n)} for {nseg} segment(s), "
                         f"got {h0.shape}")
    hprev_shape = (bsz, nh, nc, p, n) if write_hprev else (1, 1, 1, p, nb)  # unused if not written
    out_type = (jax.ShapeDtypeStruct(hprev_shape, hprev_dtype),
                jax.ShapeDtypeStruct((bsz, *seg_dims, nh, p, n), f32))
    return _kernel_call(
        plgpu, body, out_type, scratch,
        grid=(nblk, nh, bsz * nseg), grid_names=("col", "head", "batch"),
        **({"interpret": _interpret_params()} if interpret
           else {"compiler_params": _compiler_params(plgpu, semantics)}),
    )(x, b, w, dec, h0)


MAX_STATEPASS_SEGMENTS = 8
_MIN_SEGMENT_CHUNKS = 8


def _statepass_segments(programs: int, nc: int) -> int:
    """Segments of the two-level state walk (`_segmented_statepass`): the walk is sequential in
    the chunks, so with fewer programs than two per SM the chunks are cut into segments walked
    in parallel. The largest power of two (up to MAX_STATEPASS_SEGMENTS) that divides nc, keeps
    at least _MIN_SEGMENT_CHUNKS chunks per segment and programs x segments within two per SM."""
    seg = 1
    while (seg * 2 <= MAX_STATEPASS_SEGMENTS and nc % (seg * 2) == 0
           and nc // (seg * 2) >= _MIN_SEGMENT_CHUNKS and programs * seg * 2 <= 2 * _NUM_SMS):
        seg *= 2
    return seg


def _segmented_statepass(x, b, w, dec, h0, *, q, hpg, hprev_dtype, segments=None,
                         interpret=False, semantics: str = DEFAULT_SEMANTICS):
    """`_chunk_statepass_mosaic` as a two-level walk for long sequences with few programs.

    With S = segments > 1: (1) every segment's end state from a zero start (the kernel without
    h_c stores, S programs per (column block, head, batch)); (2) in XLA, the state entering each
    segment, H_0 = h0, H_{s+1} = D_s H_s + E_s (E_s the segment's end state from zero, D_s the
    product of its chunk decays; S small steps); (3) the kernel again, each segment from H_s,
    writing every h_c. Twice the reads of x and B, in exchange for S times the parallelism of a
    walk whose steps wait on each other. Same arguments and returns as `_chunk_statepass_mosaic`
    (h0 (batch, nheads, P, N)); segments None picks `_statepass_segments`.
    """
    tf32, bsz, lp, nh, p, n = _state_operand_dims(x, b)
    nc = lp // q
    nb = _statepass_block_cols(q, p, n, jnp.dtype(x.dtype).itemsize, bsz * nh)
    nseg = int(segments or _statepass_segments(bsz * nh * (n // nb), nc))
    kw = dict(q=q, hpg=hpg, hprev_dtype=hprev_dtype, block_cols=nb, interpret=interpret,
              semantics=semantics)
    if nseg == 1:
        return _chunk_statepass_mosaic(x, b, w, dec, h0, **kw)
    zeros = jnp.zeros((bsz, nseg, nh, p, n), jnp.float32)
    _, ends = _chunk_statepass_mosaic(x, b, w, dec, zeros, segments=nseg, write_hprev=False,
                                      **kw)
    seg_decay = jnp.prod(dec[..., 0].reshape(bsz, nh, nseg, nc // nseg), axis=-1)  # (b, h, S)
    starts = [h0.astype(jnp.float32)]
    for si in range(nseg - 1):
        starts.append(seg_decay[:, :, si, None, None] * starts[-1] + ends[:, si])
    hprev, fins = _chunk_statepass_mosaic(x, b, w, dec, jnp.stack(starts, axis=1),
                                          segments=nseg, **kw)
    return hprev, fins[:, -1]


# --------------------------------------------------------------------------------------------
# Differentiable core: Mosaic (or Triton) chunk states, Triton state pass, Mosaic output;
# Triton backward.
# --------------------------------------------------------------------------------------------

def _chunk_out_kernel(x, b, q):
    """The chunk-output kernel `_fwd_impl` calls (same arguments): the 64-row-slab kernel
    `pallas_mosaic_out._chunk_out_slab_mosaic` when OUT_KERNEL is "slab", q is 128, x is 16-bit
    and `pallas_mosaic_out.supported_slab` takes the shapes (else, with a logged reason,
    `_chunk_out_mosaic`); `_chunk_out_mosaic` when OUT_KERNEL is "whole" (the default)."""
    if OUT_KERNEL not in OUT_KERNELS:
        raise ValueError(f"pallas_mosaic.OUT_KERNEL must be one of {OUT_KERNELS}, "
                         f"got {OUT_KERNEL!r}")
    if OUT_KERNEL == "slab" and q == 128 and jnp.dtype(x.dtype) != jnp.dtype(jnp.float32):
        from dimba_jax.ssd import pallas_mosaic_out  # late: it imports this module

        ok, why = pallas_mosaic_out.supported_slab(x=x, b=b, q=q)
        if ok:
            return pallas_mosaic_out._chunk_out_slab_mosaic
        _warn_once(f"Mosaic GPU slab chunk-output kernel does not take this call ({why}); "
                   f"using the whole-chunk kernel")
    return _chunk_out_mosaic


def _fwd_impl(x, b, c, dt, s, h0, d, q, hpg, interpret, semantics, stages):
    tf32 = x.dtype == jnp.float32
    xin = jnp.transpose(x, (0, 2, 3, 1)) if tf32 else x  # tf32: K-major x, (b, h, P, Lp)
    bin_ = jnp.transpose(b, (0, 2, 3, 1)) if tf32 and stages != "out" else b  # (b, g, N, Lp)
    dec = _tri._chunk_end_decay(s, None, q)  # (b, h, nc)
    if stages == "statepass+out":
        p = h0.shape[2]
        dec_rows = jnp.broadcast_to(dec[..., None], dec.shape + (p,))
        hprev, fin = _segmented_statepass(xin, bin_, _state_weights(dt, s, q), dec_rows, h0,
                                          q=q, hpg=hpg, hprev_dtype=x.dtype,
                                          interpret=interpret, semantics=semantics)
    else:
        if stages == "state+out":
            states = _chunk_state_mosaic(xin, bin_, _state_weights(dt, s, q), q=q, hpg=hpg,
                                         interpret=interpret, semantics=semantics)
        else:
            states = _tri._chunk_state_call(x, b, dt, s, None, q=q, hpg=hpg, mode="state",
                                            num_warps=4, interpret=interpret)
        hprev, fin = _tri._state_pass_fwd_call(states, dec, h0, hprev_dtype=x.dtype,
                                               interpret=interpret)
    y = _chunk_out_kernel(xin, b, q)(xin, b, c, dt, s, hprev, d, q=q, hpg=hpg,
                                     interpret=interpret, semantics=semantics)
    return y, fin, hprev


# One jitted function per direction, called from every layer's custom_vjp: a model's layers share
# one traced jaxpr per (shapes, config), which XLA's lowering emits once as a private function
# called from each layer, so each Mosaic GPU kernel is lowered (Pallas -> Mosaic -> serialized
# module, seconds each) once per program instead of once per call site. Without this the
# configs/base.py train step (48 SSD calls: 24 bidirectional blocks) took 203 s to compile with
# two Mosaic kernels per call (session 3) and more than 290 s with four (session 4).
_fwd_impl_once = jax.jit(_fwd_impl, static_argnums=(7, 8, 9, 10, 11))


def rechunk_cumsum(s: jax.Array, q: int, q_new: int) -> jax.Array:
    """Chunk-local cumulative sums at chunk q turned into those at chunk q_new (q_new divides q).

    s: (b, h, Lp) float32, restarting at every multiple of q. Returns the same sums restarting at
    every multiple of q_new: each q_new-piece minus the running sum at the end of the piece
    before it inside the same q-chunk.
    """
    if q_new == q:
        return s
    bsz, nh, lp = s.shape
    k = q // q_new
    pieces = s.reshape(bsz, nh, lp // q, k, q_new)
    ends = pieces[..., -1]  # (b, h, nc, k): running sum at the end of each piece
    before = jnp.concatenate([jnp.zeros_like(ends[..., :1]), ends[..., :-1]], axis=-1)
    return (pieces - before[..., None]).reshape(bsz, nh, lp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11, 12))
def _core(x, b, c, dt, s, h0, d, q, hpg, interpret, semantics, stages, backward):
    """Forward-only calls (no gradient taken: sampling, evaluation) run at chunk
    FORWARD_ONLY_BLOCK_LEN where it divides q; the forward rule used under differentiation keeps
    chunk q, whose per-chunk states the backward needs. The result is the same up to rounding."""
    q_fwd = FORWARD_ONLY_BLOCK_LEN or q
    if q % q_fwd == 0 and q_fwd != q:
        s = rechunk_cumsum(s, q, q_fwd)
        q = q_fwd
    y, fin, _ = _fwd_impl_once(x, b, c, dt, s, h0, d, q, hpg, interpret, semantics, stages)
    return y, fin


def _core_fwd(x, b, c, dt, s, h0, d, q, hpg, interpret, semantics, stages, backward):
    y, fin, hprev = _fwd_impl_once(x, b, c, dt, s, h0, d, q, hpg, interpret, semantics, stages)
    return (y, fin), (x, b, c, dt, s, hprev, d)


def _mosaic_chunk_bwd(x, b, q, semantics):
    """The Mosaic GPU chunk-backward kernel as a drop-in for pallas_gpu._chunk_bwd_call, or
    None (with a logged reason) where pallas_mosaic_bwd does not take these shapes."""
    from dimba_jax.ssd import pallas_mosaic_bwd  # late: it imports this module

    ok, why = pallas_mosaic_bwd.supported_bwd(x=x, b=b, q=q)
    if not ok:
        _warn_once(f"Mosaic GPU SSD backward does not take this call ({why}); using Triton's")
        return None

    def chunk_bwd(x, b, c, dt, s, dy, hprev, dstates, d, seg, *, q, hpg, num_warps, interpret):
        del seg, num_warps  # no seq_idx on the Mosaic path; one warpgroup per program
        return pallas_mosaic_bwd._chunk_bwd_mosaic(x, b, c, dt, s, dy, hprev, dstates, d, q=q,
                                                   hpg=hpg, interpret=interpret,
                                                   semantics=semantics)

    return chunk_bwd


def _mosaic_state_bwd(x, b, q, semantics):
    """The fused Mosaic GPU dout chunk-state + reverse state-pass kernel
    (`pallas_mosaic_rev`) as pallas_gpu.core_backward's `state_bwd`, or None (with a logged
    reason) where it does not take these shapes. It writes dS in x.dtype."""
    from dimba_jax.ssd import pallas_mosaic_rev  # late: it imports this module

    ok, why = pallas_mosaic_rev.supported_rev(x=x, b=b, q=q)
    if not ok:
        _warn_once(f"Mosaic GPU SSD reverse state pass does not take this call ({why}); "
                   f"using Triton's")
        return None
    return pallas_mosaic_rev.state_bwd_fn(semantics)


def _core_bwd(q, hpg, interpret, semantics, stages, backward, res, grads):
    # stages and semantics belong to the forward kernels: the backward depends on neither (its
    # kernels use BACKWARD_SEMANTICS).
    del stages, semantics
    return _bwd_impl_once(q, hpg, interpret, backward, res, grads)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _bwd_impl_once(q, hpg, interpret, backward, res, grads):
    """The custom_vjp backward, jitted once for all call sites (see `_fwd_impl_once`)."""
    x, b, c, dt, s, hprev, d = res
    chunk_bwd = _mosaic_chunk_bwd(x, b, q, BACKWARD_SEMANTICS) if backward == "mosaic" else None
    state_bwd = _mosaic_state_bwd(x, b, q, BACKWARD_SEMANTICS) if backward == "mosaic" else None
    cfg = (q, hpg, 4, 8, interpret)  # pallas_gpu's (q, heads/group, warps fwd, warps bwd, interpret)
    dx, db, dc, ddt, ds, dh0, dd, _ = _tri.core_backward(
        cfg, (x, b, c, dt, s, hprev, d, None), grads, chunk_bwd=chunk_bwd, state_bwd=state_bwd)
    return dx, db, dc, ddt, ds, dh0, dd


_core.defvjp(_core_fwd, _core_bwd)


def ssd_mosaic_forward(x, dt, A, B, C, chunk_size, *, D=None, z=None, dt_bias=None,
                       dt_softplus=False, dt_limit=(0.0, math.inf), initial_states=None,
                       seq_idx=None, return_final_states=False, block_len: int | None = None,
                       interpret: bool = False, semantics: str = DEFAULT_SEMANTICS,
                       stages: str = DEFAULT_STAGES, backward: str = "triton"):
    """SSD with Mosaic GPU forward kernels; same semantics and returns as `ssd`.

    Args:
      x: (batch, seqlen, nheads, headdim) bfloat16/float16/float32 (float32: tf32 products).
      dt: (batch, seqlen, nheads).
      A: (nheads,).  B, C: (batch, seqlen, ngroups, dstate).
      chunk_size: accepted for the common signature; the kernels use `block_len` (64 or 128;
        default 128 for 16-bit x, 64 for float32) positions per chunk, which changes only speed.
      D, z, dt_bias, dt_softplus, dt_limit, initial_states, return_final_states: as `ssd`.
      seq_idx: must be None (not supported yet).
      interpret: run every kernel in its Pallas interpreter (CPU tests; slow).
      semantics: Mosaic GPU lowering semantics of the Mosaic forward kernels, "lane" or
        "warpgroup" (both lower; see `_compiler_params`); the backward kernels use
        BACKWARD_SEMANTICS.
      stages: which forward stages are Mosaic GPU kernels: "statepass+out" (default; chunk
        states fused with the state pass, then chunk output: two Mosaic launches, the float32
        chunk states never written), "state+out" (chunk states and chunk output, the Triton
        state pass between them) or "out" (chunk output only; Triton chunk states / state pass).
    Returns:
      y (batch, seqlen, nheads, headdim) in x.dtype [, final_states (batch, nheads, headdim,
      dstate) float32]. Differentiable: pallas_gpu's backward, with `backward="mosaic"` its
      kernels replaced by the Mosaic GPU reverse state pass (pallas_mosaic_rev) and chunk
      backward (pallas_mosaic_bwd) where those take the call (16-bit inputs), else Triton's.
    Raises:
      ValueError for invalid shapes or an option this kernel does not support.
    """
    sizes = _common.validate_inputs(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                    dt_limit=dt_limit, initial_states=initial_states,
                                    seq_idx=seq_idx, impl="pallas")
    q = int(block_len or default_block_len(x.dtype))
    if stages not in STAGES:
        raise ValueError(f"ssd_mosaic_forward: stages must be one of {STAGES}, got {stages!r}")
    ok, why = supported(x=x, B=B, seq_idx=seq_idx, block_len=q, stages=stages,
                        check_device=False)
    if not ok:
        raise ValueError(f"ssd_mosaic_forward: {why}")
    if backward not in BACKWARDS:
        raise ValueError(f"ssd_mosaic_forward: backward must be one of {BACKWARDS}, "
                         f"got {backward!r}")
    if semantics not in ("lane", "warpgroup"):
        raise ValueError(f"ssd_mosaic_forward: semantics must be 'lane' or 'warpgroup', "
                         f"got {semantics!r}")
    seqlen, nh = sizes["seqlen"], sizes["nheads"]
    p, g = sizes["headdim"], sizes["ngroups"]
    cdt = x.dtype

    xk, bk, ck, dtk, sk, h0 = _tri.prepare_chunks(
        x, dt, A, B, C, q, cdt, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
        initial_states=initial_states)
    tf32 = cdt == jnp.float32
    if D is None or tf32:  # the tf32 kernel leaves D x to XLA (below)
        d = jnp.zeros((nh, p), jnp.float32)
    else:
        d = jnp.broadcast_to(D.astype(jnp.float32).reshape(nh, -1), (nh, p))
    y, fin = _core(xk, bk, ck, dtk, sk, h0, d, q, nh // g, bool(interpret), semantics, stages,
                   backward)
    y = y[:, :seqlen]
    if (tf32 and D is not None) or z is not None:
        y = _common.apply_skip_and_gate(y, x, D=D if tf32 else None, z=z)
    if return_final_states:
        return y, fin
    return y
