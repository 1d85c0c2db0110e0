"""benchmarks/vs_mamba_ssm_progress.py: the targets of several results files, call by call."""

import json

import pytest

from benchmarks import vs_mamba_ssm_progress as progress


def _write(path, call_id, started, rows, smoke=False):
    doc = {"device": "NVIDIA H100 80GB HBM3", "command": "python3 -m benchmarks.vs_mamba_ssm",
           "call_id": call_id, "started_utc": started, "smoke": smoke,
           "rows": [dict(r, call_id=call_id) for r in rows]}
    path.write_text(json.dumps(doc))
    return str(path)


def _train(system, model, ms, tps, mfu):
    return {"what": "train_step", "system": system, "model": model, "ms": ms,
            "tokens_per_s": tps, "mfu": mfu}


def test_table_and_plot_follow_each_call_in_time_order(tmp_path):
    """Each call is one row, in start-time order, whatever the file order; a ratio divides two
    rows of its own call; a part a call did not measure is a dash; met targets are starred;
    smoke files are left out; the plot is written."""
    late = _write(tmp_path / "a.json", "c2", "2026-12-06T10:00:00+00:00", [
        _train("dimba_jax", "ar_base", 50.0, 330.0, 0.2),
        _train("mamba_ssm", "mamba2_130m", 160.0, 100.0, 0.1),
        {"what": "ssd", "system": "dimba_jax", "shape": "130m-L2k", "fwd_ms": 0.2, "fwdbwd_ms": 0.9},
        {"what": "ssd", "system": "mamba_ssm", "shape": "130m-L2k", "fwd_ms": 0.5, "fwdbwd_ms": 2.0}])
    early = _write(tmp_path / "b.json", "c1", "2026-12-05T10:00:00+00:00", [
        {"what": "generate_1024_b1", "system": "dimba_jax", "model": "dimba_base", "steps": 64,
         "ms": 150.0},
        {"what": "generate_1024_b1", "system": "mamba_ssm", "model": "mamba2_130m",
         "steps": 1024, "ms": 1200.0}])
    smoke = _write(tmp_path / "c.json", "c3", "2026-12-07T10:00:00+00:00", [], smoke=True)
    entries = progress.calls([late, early, smoke])
    assert [e["file"] for e in entries] == ["b.json", "a.json"]
    t = entries[1]["targets"]
    assert t["AR base train tokens/s / mamba_ssm 130M's"] == pytest.approx(3.3)
    assert t["SSD 130m-L2k fwd: ours / mamba_ssm"] == pytest.approx(0.4)
    assert t["DIMBA base T=64, 1024 tokens, batch 1 (ms)"] is None
    assert entries[0]["targets"]["mamba_ssm decode ms / DIMBA base T=64 ms"] == pytest.approx(8.0)
    table, png = progress.main(["--results", str(tmp_path / "*.json"),
                                "--table", str(tmp_path / "p.md"), "--plot", str(tmp_path / "p.png")])
    rows = [line for line in open(table).read().splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| b.json") and rows[1].startswith("| a.json")
    assert "| 150 | 8 |" in rows[0] and "| 3.3* |" in rows[1] and "| 0.4* |" in rows[1]
    assert "| 0.45 |" in rows[1]  # 130m-L2k fwd+bwd 0.9 / 2.0, above its 0.4 goal
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_a_damaged_file_is_named(tmp_path):
    bad = _write(tmp_path / "bad.json", "c1", "2026-12-05T10:00:00+00:00",
                 [{"what": "train_step", "system": "dimba_jax"}])
    with pytest.raises(ValueError, match="bad.json: row 0"):
        progress.calls([bad])
    with pytest.raises(ValueError, match="no results files"):
        progress.calls([])
