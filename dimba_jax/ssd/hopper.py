"""Hopper (sm_90: H100 / H200) facts and the Mosaic GPU plumbing the SSD kernels share.

The hardware budget every Mosaic GPU kernel of this package plans its shared memory against:

- `SMEM_LIMIT`: what one block may use (220 KB of the 227 KB a Hopper block can address).
- `TWO_BLOCKS_SMEM`: the per-block budget for two blocks per SM (one loading while the other
  computes): half of the SM's 228 KB, less the 1 KB the hardware reserves per block.
- `aligned(nbytes)`: Mosaic GPU aligns each SMEM scratch buffer to 1024 bytes;
  `REDUCTION_SCRATCH` is its default scratch for cross-warp reductions.
- `NUM_SMS`: streaming multiprocessors of an H100 / H200 (132).

`on_hopper_gpu()` says whether the default device is one. And the calls to Pallas' Mosaic
GPU backend that differ between jax versions (`mosaic_gpu`, `interpret_params`,
`compiler_params`, `smem_loader`, `kernel_call`), the SMEM tile transforms, the operand checks
and last store the 16-bit kernels share, and `cuda_lowering_context` (lowering for cuda on a
CPU-only machine). Imports without a GPU.
"""

from __future__ import annotations

import contextlib
import inspect

import jax
import jax.numpy as jnp

SMEM_LIMIT = 220 * 1024  # an H100/H200 block may use up to 227 KB of shared memory
TWO_BLOCKS_SMEM = 228 * 1024 // 2 - 1024  # per block, for two blocks per SM (1 KB reserved each)
NUM_SMS = 132  # H100 / H200
REDUCTION_SCRATCH = 2 * 1024  # Mosaic GPU's default scratch for cross-warp reductions
SIXTEEN_BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

DEFAULT_SEMANTICS = "lane"  # Mosaic GPU lowering semantics of the forward kernels
# ... and of the two backward kernels (pallas_mosaic_bwd, pallas_mosaic_rev): Warpgroup was
# faster for both on the H200 (chunk backward 0.62 vs 0.65 ms at q128, reverse pass 0.28-0.29
# vs 0.31 ms at 1.3b-L2k; benchmarks/results/mosaic_bwd_stage_h200.md, mosaic_rev_stage_h200.md).
BACKWARD_SEMANTICS = "warpgroup"


def on_hopper_gpu() -> bool:
    """True when the default backend is an NVIDIA GPU of compute capability 9.x (H100/H200)."""
    try:
        if jax.default_backend() != "gpu":
            return False
        device = jax.devices()[0]
    except RuntimeError:
        return False
    capability = str(getattr(device, "compute_capability", ""))
    if capability:
        return capability.split(".")[0] == "9"
    kind = str(getattr(device, "device_kind", "")).upper()
    return any(name in kind for name in ("H100", "H200", "H800", "GH200"))


def aligned(nbytes: int) -> int:
    """Bytes one SMEM scratch buffer occupies (Mosaic GPU aligns each to 1024)."""
    return -(-nbytes // 1024) * 1024


def mosaic_gpu():
    """The Pallas Mosaic GPU module, imported on first use."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
    return plgpu


def interpret_params():
    """The Mosaic GPU interpreter's parameters (not public API in jax 0.10; private import)."""
    plgpu = mosaic_gpu()
    if hasattr(plgpu, "InterpretGPUParams"):
        return plgpu.InterpretGPUParams()
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=g-import-not-at-top
    return InterpretGPUParams()


def compiler_params(plgpu, semantics: str = "lane", reduction_scratch_bytes: int = 0):
    """Compiler parameters pinning Mosaic GPU's lowering semantics ("lane" or "warpgroup") and,
    if nonzero, the shared-memory bytes reserved for reductions across warps (jax's default,
    2 KiB, holds a (128,) float32 sum over 4 warps' partial sums; wider sums need more).

    The kernel gives explicit register layouts (plgpu.load(..., layout=...),
    broadcasted_iota(..., layout=WGMMA)) and lowers under both semantics, so it pins one rather
    than inherit jax's default, which changed from Lane (jax 0.10) to Warpgroup (jax 0.11).
    Under Warpgroup semantics the layouts of all other values come from Mosaic's layout
    inference (it failed on the first version of this kernel: see the s_col_smem comment).
    """
    if semantics not in ("lane", "warpgroup"):
        raise ValueError(f"semantics must be 'lane' or 'warpgroup', got {semantics!r}")
    kinds = plgpu.LoweringSemantics
    extra = {"reduction_scratch_bytes": reduction_scratch_bytes} if reduction_scratch_bytes else {}
    return plgpu.CompilerParams(
        lowering_semantics=kinds.Lane if semantics == "lane" else kinds.Warpgroup, **extra)


def smem_loader(plgpu, interpret: bool, optimized: bool = True):
    """load(ref, layout): a register value of an SMEM ref in a Mosaic GPU register layout, for
    both jax versions (0.10's plgpu.load needs an index, 0.11 deprecates it); a plain read in
    the interpreter, which has no plgpu.load and ignores layouts. optimized=False lets Mosaic
    emit a transfer with bank conflicts where it finds no conflict-free one (an untiled,
    unswizzled ref read in the WGMMA layout)."""
    takes_idx = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty

    def load(ref, layout):
        if interpret:
            return ref[...]
        if takes_idx:
            return plgpu.load(ref, (), layout=layout, optimized=optimized)
        return plgpu.load(ref, layout=layout, optimized=optimized)

    return load


SIXTEEN_BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


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
    if jnp.dtype(x.dtype) not in SIXTEEN_BIT:
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


def kernel_call(plgpu, body, out_type, scratch_types, **kwargs):
    """plgpu.kernel with `out_type` / `scratch_types` (jax 0.10+) or the older `out_shape` /
    `scratch_shapes` keywords, whichever this jax's signature has. `body`'s name is the kernel's
    in profiles (`<name>_mosaic_gpu_kernel`)."""
    params = inspect.signature(plgpu.kernel).parameters
    out_key = "out_type" if "out_type" in params else "out_shape"
    scratch_key = "scratch_types" if "scratch_types" in params else "scratch_shapes"
    return plgpu.kernel(body, **{out_key: out_type, scratch_key: scratch_types}, **kwargs)


def smem_transforms(plgpu, minor: int, dtype):
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
