"""benchmarks/profile_plot.py: a profile summary's bars and the PNG drawn from them."""

import json

import pytest

from benchmarks import profile_plot


def _summary():
    return {"step_wall_ms": 10.0, "kernel_ms_per_step": 8.0, "idle_ms_per_step": 1.5,
            "kernels_per_step": 40.0,
            "top_families": [
                {"family": "gemm_a", "category": "gemm", "count_per_step": 4.0, "ms_per_step": 3.0},
                {"family": "k" * 80, "category": "ssd", "count_per_step": 2.6666, "ms_per_step": 4.0}]}


def test_bars_put_the_families_largest_first_then_the_rest_and_the_idle_time():
    got = profile_plot.bars(_summary())
    assert [(label.split(" x")[0][:8], ms) for label, ms, _ in got] == [
        ("k" * 8, 4.0), ("gemm_a", 3.0), ("other ke", 1.0), ("idle bet", 1.5)]
    assert got[0][0].endswith("... x3") and len(got[0][0]) < 60
    assert got[1][2] == profile_plot.CATEGORY_COLORS["gemm"]


def test_main_draws_either_summary_file_layout_and_refuses_others(tmp_path):
    for i, doc in enumerate(({"profiles": [_summary()]}, _summary())):
        path = tmp_path / f"p{i}.json"
        path.write_text(json.dumps(doc))
        png = profile_plot.main(["--profile", str(path), "--plot", str(tmp_path / f"p{i}.png")])
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no profile summary"):
        profile_plot.main(["--profile", str(bad), "--plot", str(tmp_path / "bad.png")])
