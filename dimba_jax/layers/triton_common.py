"""What the layers' Pallas Triton kernels (fused_norm, fused_conv) share: the knob
values that choose them, where they run and how their sequences split into row blocks."""

from __future__ import annotations

import inspect
from typing import NamedTuple

import jax

IMPLS = ("auto", "xla", "pallas")  # kernel knobs' values: model.norm_impl, conv_impl
DEFAULT_BLOCK_ROWS = 16  # time rows per program, at most (see rows_per_program)
# The forward kernels' grid target (`min_programs`): about 8 programs per SM of an H100 (132).
DEFAULT_MIN_PROGRAMS = 1024
SUMS = ("step", "tile")  # `Tiles.sums` values
# `Tiles.kernel` values of the conv prologue's passes (model.conv_forward, model.conv_backward)
CONV_KERNELS = ("triton", "mosaic")


def check_impl(knob: str, impl: str) -> str:
    """Returns `impl` if it is one of IMPLS, else raises a one-line ValueError naming `knob`."""
    if impl not in IMPLS:
        raise ValueError(f"{knob} must be one of {IMPLS}, got {impl!r}")
    return impl


def check_conv_kernel(knob: str, kernel: str) -> str:
    """Returns `kernel` if it is one of CONV_KERNELS, else raises a one-line ValueError naming
    `knob` (model.conv_forward or model.conv_backward)."""
    if kernel not in CONV_KERNELS:
        raise ValueError(f"{knob} must be one of {CONV_KERNELS}, got {kernel!r}")
    return kernel


def use_fused(impl: str, supported: bool, *, shape_supported: bool = True) -> bool:
    """Whether a kernel knob's value runs its fused Pallas kernel on one call.

    Args:
      impl: the knob's value, one of IMPLS.
      supported: the call is one the fused kernel computes (in `BidirectionalMamba2`: shared
        projections, no seq_idx, one dt_limit for both directions); every value takes the XLA
        path where it is not.
      shape_supported: the kernel takes the call's sizes (powers of two for its tiles). "auto"
        takes the XLA path where it does not; "pallas" calls the kernel, which raises a
        ValueError naming the size.
    Returns:
      "xla": False. "pallas": `supported` (the kernel runs in the Pallas interpreter off GPU, see
      `default_interpret`). "auto": `supported and shape_supported` on a GPU
      (jax.default_backend() == "gpu"), else False: never the interpreter. Where True, the
      kernels run in differentiated and undifferentiated calls alike (training and sampling;
      at batch 1 the forward kernels keep their grid full through `Tiles.programs`: on an H100
      DIMBA base samples T = 64 at batch 1 in 176.9 ms with them, 216.5 ms with XLA's conv and
      norm, benchmarks/results/latency_levers_mixer2_h100.md).
    """
    check_impl("impl", impl)
    if impl == "xla" or not supported:
        return False
    if impl == "pallas":
        return True
    return shape_supported and jax.default_backend() == "gpu"


def is_power_of_two(n: int) -> bool:
    """True for n = 1, 2, 4, ...: the sizes a Triton tile takes."""
    return n > 0 and not n & (n - 1)


def default_interpret() -> bool:
    """True off an NVIDIA GPU: the kernels then run in the Pallas interpreter."""
    return jax.default_backend() != "gpu"


class Tiles(NamedTuple):
    """The program shape of one pass (forward or backward) of a fused kernel.

    rows: time rows per program (a power of two dividing seqlen, `rows_per_program`);
    warps: warps per Triton program; stages: Triton software-pipeline stages of the kernels'
    loops over column tiles (1 = no pipelining); cols: columns per tile, a power of two
    (0 = the kernel's natural width: headdim, or d_state for B and C; a kernel narrows any
    value to the largest power of two dividing the region it tiles, `tile_width`); step: time
    rows per inner step of a program (a power of two dividing rows; 0 = rows: one step; the
    conv kernels walk their rows in such steps per column tile, loading the tile's weights
    once, and the conv backward sums its weight gradients over the steps in registers; the
    norm kernels take their rows in one step); programs: the grid target (`split_count`,
    `narrower_rows`; 1 = the plain batch x row-block grid); sums: how the conv backward's
    first kernel sums its weight gradients over its row steps: "step" (each step's rows summed
    across the program at once, carrying (width,) vectors: 2(K+1) cross-row reductions per
    step and direction) or "tile" (carrying (step, width) elementwise sums, reduced once per
    column tile: fewer reductions, 2(K+1) x step x width float32 registers per direction
    spread over the program's threads); kernel: which kernel runs the pass, "triton" (the
    Pallas Triton kernels these tiles shape) or, for the conv prologue, "mosaic" (the Mosaic GPU
    kernels of `mosaic_conv`, which have their own fixed tiles: the forward, or the backward's
    first kernel); passes: how often the norm kernels read a group's column tiles from memory,
    2 (a reduction pass, then a write pass) or 1 (read once, kept in registers for both).
    """

    rows: int
    warps: int
    stages: int
    cols: int
    step: int = 0
    programs: int = 1
    sums: str = "step"
    kernel: str = "triton"
    passes: int = 2


# The tile keywords of the fused kernels' public functions (each takes a subset).
TILE_KWARGS = ("block_rows", "num_warps", "block_rows_bwd", "num_warps_bwd", "num_stages",
               "num_stages_bwd", "block_cols", "block_cols_bwd", "step_rows", "step_rows_bwd",
               "min_programs", "min_programs_bwd", "sums_bwd", "forward_kernel",
               "backward_kernel", "passes", "passes_bwd")


def default_tiles(fn) -> dict:
    """The defaults of `fn`'s TILE_KWARGS parameters (a fused kernel's public function), as
    `kernel_tiles` takes them: the tiles a caller of the kernels' internals runs them at."""
    params = inspect.signature(fn).parameters
    return {k: params[k].default for k in TILE_KWARGS if k in params}


def split_count(programs: int, grid: int, tiles: int) -> int:
    """Into how many programs a forward kernel splits each of its `grid` programs' `tiles`
    column tiles so that the grid reaches `programs` programs: 1 where `grid` already does,
    else the fewest splits that give every split ceil(tiles / splits) tiles with at least
    `programs` programs in all (at most `tiles`)."""
    if grid >= programs or tiles <= 1:
        return 1
    per = max(1, tiles // -(-programs // grid))  # tiles per split at the needed split count
    return -(-tiles // per)


def narrower_rows(tiles: Tiles, batch: int, seqlen: int) -> Tiles:
    """`tiles` with rows halved and columns doubled (the tile keeps its size) while the grid
    batch * seqlen / rows stays under tiles.programs, down to one row; cols 0 (the natural
    width) stays 0 and the rows alone shrink."""
    rows, cols = tiles.rows, tiles.cols
    while rows > 1 and batch * (seqlen // rows) < tiles.programs:
        rows, cols = rows // 2, cols * 2
    return tiles._replace(rows=rows, cols=cols, step=min(tiles.step, rows) if tiles.step else 0)


def compiler_params(tiles: Tiles, interpret: bool):
    """Triton compiler parameters of one pass (`num_warps`, `num_stages`); None in the
    interpreter."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
    return plt.CompilerParams(num_warps=int(tiles.warps), num_stages=int(tiles.stages))


def kernel_tiles(seqlen: int, block_rows: int, num_warps: int, block_rows_bwd: int | None,
                 num_warps_bwd: int | None, num_stages: int = 1, num_stages_bwd: int | None = None,
                 block_cols: int = 0, block_cols_bwd: int | None = None, step_rows: int = 0,
                 step_rows_bwd: int | None = None,
                 min_programs: int = DEFAULT_MIN_PROGRAMS, min_programs_bwd: int = 1,
                 sums_bwd: str = "step", forward_kernel: str = "triton",
                 backward_kernel: str = "triton", passes: int = 2,
                 passes_bwd: int | None = None) -> tuple[Tiles, Tiles]:
    """(forward Tiles, backward Tiles) of a fused kernel: rows by `rows_per_program`, steps
    clipped to the rows; a backward value of None = the forward's (for rows and warps also 0);
    min_programs / min_programs_bwd the grid targets (`Tiles.programs`); sums_bwd the
    backward's `Tiles.sums`; forward_kernel / backward_kernel the passes' `Tiles.kernel`;
    passes / passes_bwd their `Tiles.passes` (backward None = the forward's).
    ValueError for a stage count or grid target below 1, a negative / non-power-of-two column
    width or step, passes other than 1 or 2, or an unknown sums_bwd, forward_kernel or
    backward_kernel."""
    passes = (int(passes), int(passes if passes_bwd is None else passes_bwd))
    if any(v not in (1, 2) for v in passes):
        raise ValueError(f"passes must be 1 or 2, got {passes}")
    for name, value in (("min_programs", min_programs), ("min_programs_bwd", min_programs_bwd)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if sums_bwd not in SUMS:
        raise ValueError(f"sums_bwd must be one of {SUMS}, got {sums_bwd!r}")
    check_conv_kernel("model.conv_forward", forward_kernel)
    check_conv_kernel("model.conv_backward", backward_kernel)
    stages = (int(num_stages), int(num_stages if num_stages_bwd is None else num_stages_bwd))
    cols = (int(block_cols), int(block_cols if block_cols_bwd is None else block_cols_bwd))
    steps = (int(step_rows), int(step_rows if step_rows_bwd is None else step_rows_bwd))
    if min(stages) < 1:
        raise ValueError(f"num_stages must be >= 1, got {stages}")
    if any(c < 0 or (c and not is_power_of_two(c)) for c in cols):
        raise ValueError(f"block_cols must be 0 or a power of two, got {cols}")
    if any(v < 0 or (v and not is_power_of_two(v)) for v in steps):
        raise ValueError(f"step_rows must be 0 or a power of two, got {steps}")
    rows = tuple(rows_per_program(seqlen, int(r))
                 for r in (block_rows, block_rows_bwd or block_rows))
    warps = (int(num_warps), int(num_warps_bwd or num_warps))
    steps = tuple(min(v, r) if v else 0 for v, r in zip(steps, rows))
    fwd, bwd = (Tiles(*t) for t in zip(rows, warps, stages, cols, steps))
    return (fwd._replace(programs=int(min_programs), kernel=forward_kernel, passes=passes[0]),
            bwd._replace(programs=int(min_programs_bwd), sums=sums_bwd, kernel=backward_kernel,
                         passes=passes[1]))


def tile_width(total: int, natural: int, cols: int) -> int:
    """Columns per tile of a region `total` wide: `natural` for cols 0, else the largest power of
    two <= cols dividing total (1 at least)."""
    if not cols:
        return natural
    w = 1
    while w * 2 <= cols and total % (w * 2) == 0:
        w *= 2
    return w


def rows_per_program(seqlen: int, max_rows: int) -> int:
    """The largest power of two <= max_rows that divides seqlen (1 at least): time rows per program."""
    q = 1
    while q * 2 <= max_rows and seqlen % (q * 2) == 0:
        q *= 2
    return q
