"""Which Pallas kernels run `ssd(..., impl="pallas")`: Mosaic GPU or Triton, as a `KernelConfig`
says (`kernel_config.py`).

- forward "mosaic" (the default): `pallas_mosaic.ssd_mosaic_forward` where
  `pallas_mosaic.supported` accepts the call, otherwise the Triton forward with a logged reason
  (seq_idx, headdim / dstate not multiples of 64, shared memory); its backward's kernels are
  `KernelConfig.backward`'s.
- forward "triton": `pallas_gpu.ssd_pallas`, every option (seq_idx included), any power-of-two
  headdim / dstate in [16, 256]; Triton's backward.
"""

from __future__ import annotations

import logging

from dimba_jax.ssd import _common
from dimba_jax.ssd.kernel_config import DEFAULT, KernelConfig

logger = logging.getLogger(__name__)


def _warn_once(message: str) -> None:
    _common.warn_once(logger, message)


def supported(**kwargs) -> tuple[bool, str]:
    """Whether impl="pallas" takes the call: the Triton kernels' `pallas_gpu.supported` (the
    Mosaic forward takes a subset of those calls and otherwise hands over to Triton)."""
    from dimba_jax.ssd import pallas_gpu

    return pallas_gpu.supported(**kwargs)


def ssd_pallas(x, dt, A, B, C, chunk_size, *, kernels: KernelConfig = DEFAULT, dt_source=None,
               **options):
    """`ssd(..., impl="pallas")`: the Mosaic or Triton forward as `kernels.forward` says.

    Args and returns: those of `dimba_jax.ssd.ssd` (x (batch, seqlen, nheads, headdim) in
    bf16 / f16 / f32; y in x.dtype, final states float32), without `impl`; dt the (batch,
    seqlen, nheads) step sizes and dt_source None or (the wide array, dt_layout) they were
    read from, which the Mosaic forward's prologue kernel reads in place.
    """
    from dimba_jax.ssd import pallas_gpu  # late: imports Pallas' Triton backend

    if kernels.forward == "mosaic":
        try:
            from dimba_jax.ssd import pallas_mosaic
        except Exception as e:  # a jax without Mosaic GPU
            _warn_once(f"ssd(impl='pallas'): Mosaic GPU forward unavailable ({type(e).__name__}: "
                       f"{e}); using the Triton forward")
        else:
            ok, why = pallas_mosaic.supported(x=x, B=B, seq_idx=options.get("seq_idx"),
                                              block_len=kernels.block_len)
            if ok:
                return pallas_mosaic.ssd_mosaic_forward(x, dt, A, B, C, chunk_size,
                                                        kernels=kernels, dt_source=dt_source,
                                                        **options)
            _warn_once(f"ssd(impl='pallas'): Mosaic GPU forward does not take this call ({why}); "
                       f"using the Triton forward")
    return pallas_gpu.ssd_pallas(x, dt, A, B, C, chunk_size, **options)
