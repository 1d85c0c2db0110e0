"""Which Pallas kernels run `ssd(..., impl="pallas")`: Mosaic GPU or Triton, forward and backward.

The forward:

- "triton": `pallas_gpu.ssd_pallas`, every option (seq_idx included), any power-of-two
  headdim / dstate in [16, 256].
- "mosaic[:BLOCK[:STAGES]]": `pallas_mosaic.ssd_mosaic_forward` with chunk length BLOCK (64 or
  128) and STAGES ("statepass+out", "state+out" or "out"; pallas_mosaic.STAGES); used where
  `pallas_mosaic.supported` accepts the call, otherwise the Triton forward with a logged reason
  (seq_idx, headdim / dstate not multiples of 64, shared memory).

The default is DEFAULT_FORWARD; the environment variable DIMBA_SSD_PALLAS_FORWARD overrides it
(read at trace time, so benchmarks can A/B the forwards without a config field: the SSD
signature is a contract of DESIGN.md section 3 and stays as it is).

With the Mosaic forward, the backward is DEFAULT_BACKWARD ("mosaic": the fused Mosaic GPU reverse
state pass, pallas_mosaic_rev, and chunk backward, pallas_mosaic_bwd, where they take the call,
16-bit inputs; Triton's kernels otherwise); DIMBA_SSD_PALLAS_BACKWARD=triton|mosaic overrides it.
With the Triton forward the backward is Triton's.
"""

from __future__ import annotations

import logging
import os

from dimba_jax.ssd import _common

logger = logging.getLogger(__name__)

ENV_VAR = "DIMBA_SSD_PALLAS_FORWARD"
BACKWARD_ENV_VAR = "DIMBA_SSD_PALLAS_BACKWARD"
BACKWARDS = ("triton", "mosaic")
# The Mosaic GPU forward at its default chunk (128 for 16-bit inputs, 64 for float32) and stages
# (chunk states fused into the state pass): on the H200 its forward is faster than Triton's and
# its fwd+bwd equal (benchmarks/results/mosaic_probe_h200.md). Shapes or options it does not take
# keep the Triton forward.
DEFAULT_FORWARD = "mosaic"
# The Mosaic GPU backward kernels: correct on the H200 (tests/test_ssd_mosaic_bwd.py,
# test_ssd_mosaic_rev.py) and faster than Triton's (chunk backward 0.60 vs 0.91 ms at 130m-L2k,
# chunk 128, mosaic_bwd_stage_h200.md; reverse pass 0.28 vs 0.58 ms at 1.3b-L2k,
# mosaic_rev_stage_h200.md).
DEFAULT_BACKWARD = "mosaic"


def parse_forward(spec: str) -> tuple[str, int | None, str | None]:
    """"triton" -> ("triton", None, None); "mosaic[:BLOCK[:STAGES]]" -> ("mosaic", BLOCK, STAGES)
    with BLOCK None / STAGES None where not given. Raises ValueError naming a bad spec."""
    parts = spec.strip().split(":")
    kind = parts[0]
    if kind == "triton" and len(parts) == 1:
        return "triton", None, None
    if kind != "mosaic" or len(parts) > 3:
        raise ValueError(f"{ENV_VAR}: expected 'triton' or 'mosaic[:BLOCK[:STAGES]]', got {spec!r}")
    block = None
    if len(parts) > 1 and parts[1]:
        if not parts[1].isdigit():
            raise ValueError(f"{ENV_VAR}: BLOCK must be an integer, got {parts[1]!r} in {spec!r}")
        block = int(parts[1])
    stages = parts[2] if len(parts) > 2 and parts[2] else None
    return "mosaic", block, stages


def forward_spec() -> str:
    """The forward choice in effect: $DIMBA_SSD_PALLAS_FORWARD, else DEFAULT_FORWARD."""
    return os.environ.get(ENV_VAR, "") or DEFAULT_FORWARD


def backward_spec() -> str:
    """$DIMBA_SSD_PALLAS_BACKWARD ("triton" or "mosaic"), else DEFAULT_BACKWARD. ValueError
    otherwise."""
    spec = (os.environ.get(BACKWARD_ENV_VAR, "") or DEFAULT_BACKWARD).strip()
    if spec not in BACKWARDS:
        raise ValueError(f"{BACKWARD_ENV_VAR}: expected one of {BACKWARDS}, got {spec!r}")
    return spec


def _warn_once(message: str) -> None:
    _common.warn_once(logger, message)


def supported(**kwargs) -> tuple[bool, str]:
    """Whether impl="pallas" takes the call: the Triton kernels' `pallas_gpu.supported` (the
    Mosaic forward takes a subset of those calls and otherwise hands over to Triton)."""
    from dimba_jax.ssd import pallas_gpu

    return pallas_gpu.supported(**kwargs)


def ssd_pallas(x, dt, A, B, C, chunk_size, **options):
    """`ssd(..., impl="pallas")`: the Mosaic or Triton forward as `forward_spec()` says.

    Args and returns: those of `dimba_jax.ssd.ssd` (x (batch, seqlen, nheads, headdim) in
    bf16 / f16 / f32; y in x.dtype, final states float32), without `impl`.
    """
    from dimba_jax.ssd import pallas_gpu  # late: imports Pallas' Triton backend

    kind, block, stages = parse_forward(forward_spec())
    if kind == "mosaic":
        try:
            from dimba_jax.ssd import pallas_mosaic
        except Exception as e:  # a jax without Mosaic GPU
            _warn_once(f"ssd(impl='pallas'): Mosaic GPU forward unavailable ({type(e).__name__}: "
                       f"{e}); using the Triton forward")
        else:
            stages = stages or pallas_mosaic.DEFAULT_STAGES
            ok, why = pallas_mosaic.supported(x=x, B=B, seq_idx=options.get("seq_idx"),
                                              block_len=block, stages=stages)
            if ok:
                return pallas_mosaic.ssd_mosaic_forward(x, dt, A, B, C, chunk_size,
                                                        block_len=block, stages=stages,
                                                        backward=backward_spec(), **options)
            _warn_once(f"ssd(impl='pallas'): Mosaic GPU forward does not take this call ({why}); "
                       f"using the Triton forward")
    return pallas_gpu.ssd_pallas(x, dt, A, B, C, chunk_size, **options)
