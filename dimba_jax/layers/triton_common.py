"""What the layers' Pallas Triton kernels (fused_norm, fused_conv) share: where they run and how
their sequences split into row blocks."""

from __future__ import annotations

import jax

IMPLS = ("xla", "pallas")  # the values of the kernel knobs (model.norm_impl, model.conv_impl)
DEFAULT_BLOCK_ROWS = 16  # time rows per program, at most (see rows_per_program)


def check_impl(knob: str, impl: str) -> str:
    """Returns `impl` if it is one of IMPLS, else raises a one-line ValueError naming `knob`."""
    if impl not in IMPLS:
        raise ValueError(f"{knob} must be one of {IMPLS}, got {impl!r}")
    return impl


def default_interpret() -> bool:
    """True off an NVIDIA GPU: the kernels then run in the Pallas interpreter."""
    return jax.default_backend() != "gpu"


def compiler_params(num_warps: int, interpret: bool):
    """Triton compiler parameters (`num_warps`, one pipeline stage); None in the interpreter."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
    return plt.CompilerParams(num_warps=num_warps, num_stages=1)


def rows_per_program(seqlen: int, max_rows: int) -> int:
    """The largest power of two <= max_rows that divides seqlen (1 at least): time rows per program."""
    q = 1
    while q * 2 <= max_rows and seqlen % (q * 2) == 0:
        q *= 2
    return q
