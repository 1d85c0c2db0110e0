"""FLOP counts of a Mamba-2 stack and model-FLOPs utilisation (MFU).

Convention (that of the PaLM / MaxText MFU): count the multiply-adds of matrix products as 2
FLOPs each and ignore elementwise work (activations, norms, gating, softplus, exp). Training
costs 3x the forward (the backward computes two products per forward product). Rematerialised
forwards are not counted (model FLOPs, not hardware FLOPs).

Per token, one Mamba-2 block with d_model D, d_inner E = expand * D, H = E / P heads of
headdim P, G groups, state size N, conv width K and SSD chunk Q (= min(chunk_size, seq_len)):

  in_proj      D -> [z, x, B, C, dt] = 2E + 2GN + H outputs     2 D (2E + 2GN + H)
  conv1d       depthwise, width K, over E + 2GN channels          2 K (E + 2GN)
  SSD, the chunked algorithm (mamba_ssm's ssd_combined):
    CB scores  C_i . B_j for the Q positions of the chunk, per group           2 G Q N
    y_diag     (L o CB) @ x within the chunk, per head                          2 H Q P
    states     sum_j B_j x_j^T per chunk, per head                              2 H N P
    y_off      C_i . h (the state entering the chunk), per head                 2 H N P
    passing    h_c = decay * h_{c-1} + s_c, once per chunk (amortised over Q)   2 H N P / Q
  out_proj     E -> D                                                          2 E D

The LM adds the output head (2 D V per token; the embedding lookup is free). A bidirectional
block runs the mixer twice (forward and flipped); `directions=2` doubles the block count, or,
with `shared_projections=True` (dimba_jax's BidirectionalMamba2 default: in_proj and out_proj are
shared and computed once), doubles only the conv and SSD terms.
"""

from __future__ import annotations

import jax

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity). Matched against
# `jax.Device.device_kind` by substring, longest key first.
PEAK_FLOPS_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def mamba2_block_flops(*, d_model: int, expand: int, headdim: int, d_state: int, ngroups: int,
                       d_conv: int, chunk_size: int, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one Mamba-2 block, term by term (see the module docstring).

    Returns:
      dict with keys in_proj, conv, ssd_cb, ssd_diag, ssd_states, ssd_out, ssd_pass, out_proj
      and total (floats, FLOPs per token).
    """
    d, e, n, g, k = d_model, expand * d_model, d_state, ngroups, d_conv
    if e % headdim:
        raise ValueError(f"d_inner={e} is not divisible by headdim={headdim}")
    h, p = e // headdim, headdim
    q = min(chunk_size, seq_len)
    terms = {
        "in_proj": 2.0 * d * (2 * e + 2 * g * n + h),
        "conv": 2.0 * k * (e + 2 * g * n),
        "ssd_cb": 2.0 * g * q * n,
        "ssd_diag": 2.0 * h * q * p,
        "ssd_states": 2.0 * h * n * p,
        "ssd_out": 2.0 * h * n * p,
        "ssd_pass": 2.0 * h * n * p / q,
        "out_proj": 2.0 * e * d,
    }
    terms["total"] = sum(terms.values())
    return terms


def mamba2_lm_forward_flops(model_config, *, vocab_size: int, seq_len: int,
                            directions: int = 1, shared_projections: bool = False,
                            extra_per_token: float = 0.0, head_width: int = 0) -> float:
    """Forward FLOPs per token of an n_layers Mamba-2 stack plus its output head.

    Args:
      model_config: `config.model` (d_model, n_layers, expand, headdim, d_state, ngroups,
        d_conv, chunk_size).
      vocab_size: rows of the output head (2 * head_width * vocab_size FLOPs per token).
      seq_len: tokens per sequence (sets the effective SSD chunk min(chunk_size, seq_len)).
      directions: 1 for causal blocks, 2 for bidirectional ones (two mixers per block).
      shared_projections: the directions share in_proj / out_proj and compute them once, so only
        the conv and SSD terms are multiplied by `directions`.
      extra_per_token: any further per-token forward FLOPs of the model (conditioning MLPs...).
      head_width: width of the head's input (0 = d_model).
    """
    m = model_config
    block = mamba2_block_flops(d_model=m.d_model, expand=m.expand, headdim=m.headdim,
                               d_state=m.d_state, ngroups=m.ngroups, d_conv=m.d_conv,
                               chunk_size=m.chunk_size, seq_len=seq_len)
    projections = block["in_proj"] + block["out_proj"] if shared_projections else 0.0
    per_block = projections + directions * (block["total"] - projections)
    return m.n_layers * per_block + 2.0 * (head_width or m.d_model) * vocab_size + extra_per_token


def training_flops(forward_flops: float) -> float:
    """Training FLOPs from forward FLOPs: forward + backward = 3 x forward."""
    return 3.0 * forward_flops


def peak_flops_per_device(device: jax.Device | None = None, override: float = 0.0) -> float | None:
    """Peak dense bf16 FLOP/s of `device` (default: the first device), or None if unknown.

    `override` > 0 (config.train.peak_flops) wins over the table.
    """
    if override and override > 0:
        return float(override)
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "") or ""
    for key in sorted(PEAK_FLOPS_BF16, key=len, reverse=True):
        if key.lower() in kind.lower():
            return PEAK_FLOPS_BF16[key]
    return None


def mfu(tokens_per_second: float, train_flops_per_token: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
    """Model-FLOPs utilisation: achieved model FLOP/s over the peak of all devices (None if unknown)."""
    if not peak_per_device or num_devices <= 0:
        return None
    return tokens_per_second * train_flops_per_token / (peak_per_device * num_devices)
