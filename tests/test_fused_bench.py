"""benchmarks/fused_bench.py on CPU (the kernels interpreted): its rows, the tuned row's check
against the jnp reference, and its outputs."""

import json

import pytest

from benchmarks import fused_bench


def test_sweep_rows_set_plain_tiles_and_defaults_resolve_the_backward():
    """A sweep row's unnamed tiles are PLAIN's whatever the function's defaults; a backward
    default of None reads as the forward's."""
    seen = {}

    def kernel(y, *, ngroups, block_rows=8, num_warps=2, num_stages=3, block_cols=128,
               block_rows_bwd=None, num_warps_bwd=8, num_stages_bwd=None, block_cols_bwd=64,
               interpret=False):
        seen.update(block_rows=block_rows, num_stages=num_stages, block_cols=block_cols,
                    num_warps_bwd=num_warps_bwd)
        return y

    fused_bench.maker(kernel, dict(ngroups=1))(block_rows=32)(0)
    assert seen == dict(block_rows=32, num_stages=1, block_cols=0, num_warps_bwd=8)
    assert fused_bench.tile_defaults(kernel) == dict(
        block_rows=8, num_warps=2, num_stages=3, block_cols=128, block_rows_bwd=8,
        num_warps_bwd=8, num_stages_bwd=3, block_cols_bwd=64)


def test_sweep_writes_rows_and_checks_the_tuned_kernels(tmp_path):
    """The sweep's rows for both kernels, the tuned row checked against XLA, and --bwd-sums
    ROWS:STEP:PROGRAMS: the conv backward timed with its weight sums elementwise over row steps
    and its column tiles split (rows longer than L skipped); those rows record sums_bwd and
    min_programs_bwd, and the table names them."""
    prefix = str(tmp_path / "fb")
    result = fused_bench.main(["--config", "configs/tiny.py", "--batch", "1", "--seq-len", "8",
                               "--rows", "4", "--warps", "1", "--stages", "1,2", "--cols", "0",
                               "--bwd-sums", "8:2:1024,8:8:1,64:8:1",
                               "--runs", "1", "--inner", "1", "--out", prefix])
    rows = result["rows"]
    assert all("ms" in r for r in rows), [r for r in rows if "ms" not in r]
    tiled = [(r["kernel"], r["block_rows_bwd"], r["step_rows_bwd"], r["min_programs_bwd"])
             for r in rows if r.get("sums_bwd") == "tile" and r["impl"] == "pallas"]
    assert tiled == [("conv", 8, 2, 1024), ("conv", 8, 8, 1)]
    untiled = [r for r in rows if not (r.get("sums_bwd") == "tile" and r["impl"] == "pallas")]
    for kernel in ("conv", "norm"):
        mine = [r for r in untiled if r["kernel"] == kernel]
        assert {(r["impl"], r["pass"]) for r in mine} == {
            ("xla", "fwd"), ("xla", "fwdbwd"), ("pallas", "fwd"), ("pallas", "fwdbwd"),
            ("pallas (tuned)", "fwdbwd"), ("pallas (defaults)", "fwd"),
            ("pallas (defaults)", "fwdbwd")}
        fwd = [r for r in mine if r["impl"] == "pallas" and r["pass"] == "fwd"]
        steps = [(8, 4)] if kernel == "conv" else []  # 2x the rows in steps of 4 (L = 8)
        assert [(r["block_rows"], r.get("step_rows", 0)) for r in fwd] == [(4, 0)] * 2 + steps
        assert [(r.get("num_stages", 1), r.get("block_cols", 0)) for r in fwd][:2] == [
            (1, 0), (2, 0)]  # rows x warps, then stages x cols
        bwd = [r for r in mine if r["impl"] == "pallas" and r["pass"] == "fwdbwd"]
        assert [(r["block_rows_bwd"], r.get("num_stages_bwd", 1), r.get("block_cols_bwd", 0))
                for r in bwd][:2] == [(4, 1, 0), (4, 2, 0)]
        assert [(r["block_rows_bwd"], r.get("step_rows_bwd", 0)) for r in bwd][2:] == steps
        tuned = [r for r in mine if r["impl"] == "pallas (tuned)"]
        assert len(tuned) == 1
        assert all(r["max_rel_err_vs_xla"] < 2e-2 for r in tuned)  # bf16 activations
    assert result["dims"]["L"] == 8 and result["dims"]["conv_dim"] == (
        result["dims"]["d_inner"] + 2 * result["dims"]["ngroups"] * result["dims"]["d_state"])
    with open(prefix + ".json") as f:
        assert json.load(f)["rows"] == rows
    with open(prefix + ".md") as f:
        md = f.read()
    assert "| conv | 1 | fwdbwd | pallas (tuned) |" in md and "% of HBM" in md
    assert all(r["gbps"] == pytest.approx(fused_bench.hbm_bytes(
        r["kernel"], r["pass"], result["dims"], r["batch"]) / r["ms"] / 1e6) for r in rows)
    assert "sums-tile p1024" in md
    assert "python -m benchmarks.fused_bench" in md


def test_causal_config_sweeps_the_one_direction_kernels(tmp_path):
    """A config with model.bidirectional False (the AR baseline's mixer) times the causal
    kernels (causal_conv_pallas, gated_norm_pallas) and checks them against their references."""
    import os

    tiny = os.path.abspath("configs/tiny.py")
    cfg = tmp_path / "causal_tiny.py"
    cfg.write_text("from dimba_jax.config import load_config_file\n\n\ndef get_config():\n"
                   f"    c = load_config_file({tiny!r})\n    c.model.bidirectional = False\n"
                   "    return c\n")
    result = fused_bench.main(["--config", str(cfg), "--batch", "1", "--seq-len", "8",
                               "--rows", "4", "--warps", "1", "--stages", "1", "--cols", "0",
                               "--runs", "1", "--inner", "1", "--batch1-loop", "2",
                               "--programs", "1,8", "--kernels", "conv,norm",
                               "--out", str(tmp_path / "fb")])
    assert result["dims"]["directions"] == 1
    rows = result["rows"]
    assert all("ms" in r for r in rows), [r for r in rows if "ms" not in r]
    loop = [(r["kernel"], r["impl"], r.get("min_programs")) for r in rows
            if r["pass"] == "fwd (loop)"]
    assert loop == [(k, i, p) for k in ("conv", "norm") for i, p in
                    (("xla", None), ("pallas (defaults)", 1024), ("pallas", 1), ("pallas", 8))]
    tuned = [r for r in rows if r["impl"] == "pallas (tuned)"]
    assert sorted(r["kernel"] for r in tuned) == ["conv", "norm"]
    assert all(r["max_rel_err_vs_xla"] < 2e-2 for r in tuned)


def test_hbm_bytes_count_each_array_once():
    """The bandwidth floor of a row: every array the fused kernels read or write, once, by
    its shape (bf16 activations, float32 dt_cat / ddt_cat), against hbm_bytes."""
    import numpy as np

    dims = dict(L=8, nheads=2, headdim=4, conv_dim=16, directions=2)
    b, L, h, c, d, nd = 3, 8, 2, 16, 8, 2

    def size(*arrays):
        return sum(int(np.prod(shape)) * item for shape, item in arrays)

    conv_fwd = size(((b, L, c), 2), ((b, L, h), 2),  # xbc, dt in
                    ((b, L, nd * c), 2), ((b, L, nd * h), 4))  # x|B|C per direction, dt_cat out
    conv_bwd = size(((b, L, c), 2), ((b, L, nd * c), 2), ((b, L, nd * c), 2),  # bwd_g
                    ((b, L, nd * c), 2), ((b, L, nd * h), 4), ((b, L, c), 2), ((b, L, h), 2))
    norm_fwd = size(((b, L, nd * d), 2), ((b, L, d), 2), ((b, L, d), 2))
    norm_bwd = norm_fwd + size(((b, L, nd * d), 2), ((b, L, d), 2))
    assert fused_bench.hbm_bytes("conv", "fwd", dims, b) == conv_fwd
    assert fused_bench.hbm_bytes("conv", "fwd (loop)", dims, b) == conv_fwd
    assert fused_bench.hbm_bytes("conv", "fwdbwd", dims, b) == conv_fwd + conv_bwd
    assert fused_bench.hbm_bytes("norm", "fwd", dims, b) == norm_fwd
    assert fused_bench.hbm_bytes("norm", "fwdbwd", dims, b) == norm_fwd + norm_bwd
    causal = dict(dims, directions=1)
    assert fused_bench.hbm_bytes("norm", "fwd", causal, b) == size(((b, L, d), 2)) * 3


def test_mosaic_kernel_rows_time_both_program_shapes(tmp_path, monkeypatch):
    """--mosaic-kernels: rows for the bare Mosaic conv kernels with both directions per
    program and one (`split` reaches each kernel), the forward, the backward's first kernel and
    the batch-1 loop, each with its bandwidth; none where the Mosaic kernels do not take the
    sizes. The kernels are tests/test_mosaic_conv.py's; here jnp functions of the same
    signature stand in for them (interpreting them would take a minute)."""
    import argparse

    import jax.numpy as jnp

    from dimba_jax.layers import fused_conv, mosaic_conv

    seen = []

    def fwd(xbc, ws, bs, *, ngroups, d_state, split, interpret):
        seen.append(("fwd", split))
        dt = jnp.zeros((*xbc.shape[:2], 8), jnp.float32)  # dims' nheads; x, B, C ignore dt
        return fused_conv.bidirectional_conv_xla(xbc, dt, *ws, *bs, ngroups=ngroups,
                                                 d_state=d_state)[:3]

    def bwd_g(xbc, ws, bs, dx, dbm, dcm, *, ngroups, d_state, split, interpret):
        seen.append(("bwd_g", split))
        b, L, c = xbc.shape
        g = jnp.broadcast_to(xbc[:, :, None, :], (b, L, len(ws), c)) * jnp.sum(dx[..., :1])
        return g, jnp.zeros((b, L // 64, len(ws), ws[0].shape[0] + 1, c)) + bs[0][0]

    monkeypatch.setattr(mosaic_conv, "conv_fwd_mosaic", fwd)
    monkeypatch.setattr(mosaic_conv, "conv_bwd_g_mosaic", bwd_g)
    dims = dict(L=64, d_model=64, d_inner=128, nheads=8, headdim=16, ngroups=1, d_state=64,
                d_conv=4, directions=2, conv_dim=256)
    a = argparse.Namespace(runs=1, inner=1, budget_s=600.0, out=str(tmp_path / "fb"))
    run = fused_bench.Runner(a, dims)
    fused_bench.mosaic_kernel_rows(run, dims, batch=2, loop=2)
    got = [(r["impl"], r["pass"], r["batch"]) for r in run.result["rows"]]
    assert got == [(i, p, 2) for i in ("mosaic kernel", "mosaic kernel split")
                   for p in ("fwd", "bwd_g")] + [
        (i, "fwd (loop)", 1) for i in ("mosaic kernel", "mosaic kernel split")]
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in run.result["rows"])
    assert {("fwd", False), ("fwd", True), ("bwd_g", False), ("bwd_g", True)} <= set(seen)
    with open(tmp_path / "fb.md") as f:
        assert "| conv | 2 | bwd_g | mosaic kernel split |" in f.read()
    fused_bench.mosaic_kernel_rows(run, dict(dims, L=96), batch=2, loop=2)  # L % 64: none
    assert len(run.result["rows"]) == 6


def test_norm_passes_rows_time_one_pass_beside_two(tmp_path):
    """--norm-passes: the norm kernels at their defaults in two passes and in one (forward,
    forward + backward checked against XLA, the batch-1 loop), then one-pass sweeps of the
    forward's and the backward's rows x warps; the table marks the one-pass rows."""
    import argparse

    from dimba_jax.config import load_config_file

    config = load_config_file("configs/tiny.py")
    config.data.seq_len = 8
    dims = fused_bench.mixer_dims(config)
    a = argparse.Namespace(runs=1, inner=1, budget_s=600.0, out=str(tmp_path / "fb"))
    run = fused_bench.Runner(a, dims)
    fused_bench.norm_passes_rows(run, dims, batch=1, loop=2, rows=[4], warps=[1])
    rows = run.result["rows"]
    assert all("ms" in r for r in rows), [r for r in rows if "ms" not in r]
    got = [(r["impl"], r["pass"], r.get("passes"), r.get("passes_bwd")) for r in rows]
    assert got == [
        ("pallas (defaults, 2 passes)", "fwd", 2, 2),
        ("pallas (defaults, 2 passes)", "fwdbwd", 2, 2),
        ("pallas (defaults, 1 passes)", "fwd", 1, 1),
        ("pallas (defaults, 1 passes)", "fwdbwd", 1, 1),
        ("pallas (defaults, 2 passes)", "fwd (loop)", 2, 2),
        ("pallas (defaults, 1 passes)", "fwd (loop)", 1, 1),
        ("pallas", "fwd", 1, 2), ("pallas", "fwdbwd", 2, 1)]
    assert all(r["max_rel_err_vs_xla"] < 2e-2 for r in rows if "max_rel_err_vs_xla" in r)
    with open(tmp_path / "fb.md") as f:
        assert f.read().count("1-pass") >= 4


def test_no_sweeps_times_only_the_rows_asked_for(tmp_path):
    """--no-sweeps --norm-passes: no sweep rows, only norm_passes_rows' (batch 1 here)."""
    result = fused_bench.main(["--config", "configs/tiny.py", "--batch", "1", "--seq-len", "8",
                               "--kernels", "norm", "--norm-passes", "--no-sweeps",
                               "--rows", "4", "--warps", "1", "--runs", "1", "--inner", "1",
                               "--out", str(tmp_path / "fb")])
    impls = {r["impl"] for r in result["rows"]}
    assert impls == {"pallas (defaults, 2 passes)", "pallas (defaults, 1 passes)", "pallas"}
    assert len(result["rows"]) == 6 and all("ms" in r for r in result["rows"])
