"""The FLOP count of a Mamba-2 block / LM against a hand count, and MFU arithmetic."""

from __future__ import annotations

import types

import pytest

from dimba_jax.models import flops


def test_block_flops_match_a_hand_count():
    # d_model 4, expand 2 -> d_inner 8, headdim 4 -> 2 heads, 1 group, d_state 3, conv 2,
    # chunk 5 over a sequence of 12 (so Q = 5).
    t = flops.mamba2_block_flops(d_model=4, expand=2, headdim=4, d_state=3, ngroups=1, d_conv=2,
                                 chunk_size=5, seq_len=12)
    # in_proj: 4 -> z(8) + x(8) + B(3) + C(3) + dt(2) = 24 outputs: 2*4*24 = 192
    assert t["in_proj"] == 192
    # conv over x, B, C = 14 channels, width 2: 2*2*14 = 56
    assert t["conv"] == 56
    assert t["ssd_cb"] == 2 * 1 * 5 * 3          # 30: C.B over the chunk's 5 positions
    assert t["ssd_diag"] == 2 * 2 * 5 * 4        # 80: (L o CB) @ x, 2 heads of width 4
    assert t["ssd_states"] == 2 * 2 * 3 * 4      # 48
    assert t["ssd_out"] == 2 * 2 * 3 * 4         # 48
    assert t["ssd_pass"] == pytest.approx(48 / 5)
    assert t["out_proj"] == 2 * 8 * 4            # 64
    assert t["total"] == pytest.approx(192 + 56 + 30 + 80 + 48 + 48 + 9.6 + 64)
    short = flops.mamba2_block_flops(d_model=4, expand=2, headdim=4, d_state=3, ngroups=1,
                                     d_conv=2, chunk_size=5, seq_len=3)
    assert short["ssd_diag"] == 2 * 2 * 3 * 4     # a sequence shorter than the chunk: Q = 3


def test_lm_and_training_flops_and_mfu():
    m = types.SimpleNamespace(d_model=4, n_layers=3, expand=2, headdim=4, d_state=3, ngroups=1,
                              d_conv=2, chunk_size=5)
    block = 192 + 56 + 30 + 80 + 48 + 48 + 9.6 + 64
    fwd = flops.mamba2_lm_forward_flops(m, vocab_size=10, seq_len=12)
    assert fwd == pytest.approx(3 * block + 2 * 4 * 10)
    bi = flops.mamba2_lm_forward_flops(m, vocab_size=10, seq_len=12, directions=2, extra_per_token=7)
    assert bi == pytest.approx(6 * block + 80 + 7)
    # shared in/out projections (computed once) + conv and SSD per direction
    shared = flops.mamba2_lm_forward_flops(m, vocab_size=10, seq_len=12, directions=2, shared_projections=True)
    assert shared == pytest.approx(3 * ((192 + 64) + 2 * (block - 192 - 64)) + 80)
    assert flops.training_flops(fwd) == pytest.approx(3 * fwd)
    # 130M-class check (docs/ssd_reference.md): ~2.7e11 FLOPs per forward over 1056 tokens.
    big = types.SimpleNamespace(d_model=768, n_layers=24, expand=2, headdim=64, d_state=128,
                                ngroups=1, d_conv=4, chunk_size=256)
    per_seq = flops.mamba2_lm_forward_flops(big, vocab_size=50280, seq_len=1056) * 1056
    assert 2.0e11 < per_seq < 3.5e11
    assert flops.mfu(1000.0, 1e9, 2, 1e12) == pytest.approx(0.5)
    assert flops.mfu(1000.0, 1e9, 2, None) is None


def test_peak_table_by_device_kind_and_override():
    dev = types.SimpleNamespace(device_kind="NVIDIA H200")
    assert flops.peak_flops_per_device(dev) == 989e12
    assert flops.peak_flops_per_device(types.SimpleNamespace(device_kind="TPU v5 lite")) == 197e12
    assert flops.peak_flops_per_device(types.SimpleNamespace(device_kind="cpu")) is None
    assert flops.peak_flops_per_device(dev, override=1e15) == 1e15
