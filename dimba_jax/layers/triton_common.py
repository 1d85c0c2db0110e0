"""What the layers' Pallas Triton kernels (fused_norm, fused_conv) share: where they run and how
their sequences split into row blocks."""

from __future__ import annotations

import jax


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
