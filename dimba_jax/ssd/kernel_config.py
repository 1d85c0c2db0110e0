"""`KernelConfig`: which Pallas kernels run `ssd(impl="pallas")` (and impl="auto" on Hopper).

One frozen (hashable) object holds every choice of the Pallas path; `ssd` takes it as the
static argument `kernels`, the Mamba-2 layers take it from `config.model`
(`KernelConfig.from_config`), benchmarks pass their own. The defaults are the fastest measured
on an H200 (benchmarks/results/ssd_h200.md, mosaic_probe_h200.md, mosaic_bwd_stage_h200.md,
mosaic_rev_stage_h200.md).
"""

from __future__ import annotations

import dataclasses

FORWARDS = ("mosaic", "triton")
PROLOGUES = ("xla", "pallas", "auto")
BACKWARDS = ("mosaic", "triton")
BLOCK_LENS = (64, 128)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """The Pallas kernels of the SSD (every field has one meaning; nothing else steers them).

    forward: "mosaic": the Mosaic GPU forward (`pallas_mosaic.ssd_mosaic_forward`: chunk states
      fused with the state pass, then the chunk output) where `pallas_mosaic.supported` takes
      the call, else the Triton forward with a logged reason; "triton": `pallas_gpu.ssd_pallas`.
    backward: kernels of the backward under the Mosaic forward: "mosaic" (the Mosaic GPU reverse
      state pass and chunk backward where they take the call, 16-bit inputs; Triton's
      otherwise) or "triton". Under the Triton forward the backward is always Triton's.
    block_len: chunk length of the Mosaic kernels, 64 or 128; None = 128 for 16-bit x, 64 for
      float32 (the f32 tiles of a 128 chunk exceed shared memory). Speed only.
    forward_only_block_len: chunk length of Mosaic forward-only calls (no gradient taken:
      sampling, evaluation) where it divides the training chunk; None = block_len. On the H200
      the forward at chunk 64 is 1.2-1.3x faster than at 128 at the SSD's benchmark shapes,
      while fwd+bwd is faster at 128. The models' default (`config.model`) is 128: the batch-1
      sampler of configs/base.py (T = 64, one H100) takes 165.7 ms at 128 against 177.5 ms at
      64, and 167.2 against 177.2 in a second call
      (benchmarks/results/latency_levers_fo2_h100.md, latency_levers_fo_h100.md).
    prologue: the step sizes in front of the Mosaic kernels (dt bias, softplus, limits, the
      layout transpose, the chunk-local cumulative sum of dt * A, the state pass's weights and
      chunk-end decays): "xla" (six to seven kernels per call), "pallas" (one Triton kernel,
      `pallas_prologue`, where it takes the head count; its backward is XLA's) or "auto" (the
      kernel in calls no gradient goes through, XLA's forward under differentiation). On an
      H100 the kernel makes the forward 3-13% faster at three of the four benchmark shapes and
      fwd+bwd 0.2-1.5% slower at all four (benchmarks/results/ssd_prologue_h100.md), so "auto"
      here; the models' default (`config.model.ssd_prologue`) is "pallas", which the batch-1
      sampler measured faster (156.8 vs 158.2 ms, latency_levers_prenorm_prologue_h100.md) and
      the train step no slower (122.4 vs 122.8 ms, train_throughput_prenorm_prologue*_h100.md).
    backward_warpgroups: consumer warpgroups per program of the Mosaic chunk backward: 1, or 2
      (one per 64-row slab of a 128-chunk, each issuing its own wgmmas, so the two slabs'
      products overlap; `pallas_mosaic_bwd.warpgroups_fit` says where it fits: chunk 128,
      headdim 64, dstate up to 128; elsewhere one). The same bits as 1. On an
      H200 the SSD's forward+backward takes 1.600 against 1.904 ms at 1.3b-L2k, 1.598 against
      1.776 at 130m-L32k, 0.750 against 0.855 at 130m-L2k (one call,
      benchmarks/results/ssd_wg2_h200.md), so 2.
    output_warpgroups: consumer warpgroups per program of the Mosaic chunk output: 1, or 2
      (16-bit x at chunk 128: one per 64-row slab, over the columns the causal mask keeps;
      `pallas_mosaic_fwd.chunk_out_mosaic`; elsewhere one). Used in training (chunk 128) and in
      forward-only calls at chunk 128 (the models' sampler). On an H200, with two backward
      warpgroups: forward+backward 1.562 against 1.600 ms at 1.3b-L2k, 1.489 against 1.598 at
      130m-L32k (ssd_wg2_h200.md); the batch-1 sampler at configs/base.py T = 64 129.2 against
      135.9 ms (latency_levers_owg2_h200.md), so 2. Forward-only calls at chunk 128 with it
      stay slower than at chunk 64 at the benchmark's shapes (0.444 against 0.390 ms at
      1.3b-L2k), so `forward_only_block_len` stays 64.
    output_persistent: with two output warpgroups, whether the chunk output runs as the
      persistent kernel (`pallas_mosaic_fwd.chunk_out_persistent_mosaic`: one program per SM
      walking its tiles with the next tile's loads in flight; the same bits) where
      `persistent_error` takes the call (16-bit x at chunk 128), or one program per tile. On an
      H100 the configs/base.py train step takes 81.7 against 84.6 ms with it and the batch-1
      sampler at T = 64 105.51 against 109.67 ms (train_throughput_s30_h100.md,
      latency_levers_s30_root_h100.md), so the models run it (`config.model`); here off until
      the SSD benchmark's four shapes are timed (at 130m-L2k forward-only at chunk 128: 0.172
      against 0.211 ms at chunk 64 without it, ssd_s30_h100.md; the other shapes not reached).
    """
    forward: str = "mosaic"
    backward: str = "mosaic"
    block_len: int | None = None
    forward_only_block_len: int | None = 64
    prologue: str = "auto"
    backward_warpgroups: int = 2
    output_warpgroups: int = 2
    output_persistent: bool = False

    def __post_init__(self):
        if self.forward not in FORWARDS:
            raise ValueError(f"KernelConfig.forward must be one of {FORWARDS}, got {self.forward!r}")
        if self.backward not in BACKWARDS:
            raise ValueError(f"KernelConfig.backward must be one of {BACKWARDS}, got "
                             f"{self.backward!r}")
        if self.prologue not in PROLOGUES:
            raise ValueError(f"KernelConfig.prologue must be one of {PROLOGUES}, got "
                             f"{self.prologue!r}")
        for name in ("backward_warpgroups", "output_warpgroups"):
            if getattr(self, name) not in (1, 2):
                raise ValueError(f"KernelConfig.{name} must be 1 or 2, got "
                                 f"{getattr(self, name)!r}")
        for name in ("block_len", "forward_only_block_len"):
            value = getattr(self, name)
            if value is not None and value not in BLOCK_LENS:
                raise ValueError(f"KernelConfig.{name} must be None or one of {BLOCK_LENS}, got "
                                 f"{value!r}")

    @classmethod
    def from_config(cls, model_config) -> "KernelConfig":
        """From `config.model`: ssd_forward, ssd_backward, ssd_block_len,
        ssd_forward_only_block_len (0 = None), ssd_prologue, ssd_backward_warpgroups,
        ssd_output_warpgroups and ssd_output_persistent; a missing field keeps the default
        (older runs)."""
        get = lambda name, default: getattr(model_config, name, default)  # noqa: E731
        default = cls()
        return cls(forward=str(get("ssd_forward", default.forward)),
                   backward=str(get("ssd_backward", default.backward)),
                   block_len=int(get("ssd_block_len", 0)) or None,
                   forward_only_block_len=int(get("ssd_forward_only_block_len",
                                                  default.forward_only_block_len)) or None,
                   prologue=str(get("ssd_prologue", default.prologue)),
                   backward_warpgroups=int(get("ssd_backward_warpgroups",
                                               default.backward_warpgroups)),
                   output_warpgroups=int(get("ssd_output_warpgroups",
                                             default.output_warpgroups)),
                   output_persistent=bool(get("ssd_output_persistent",
                                              default.output_persistent)))


DEFAULT = KernelConfig()
