"""benchmarks/ssd_seq_bench.py on CPU (the kernels interpreted): its rows, their check against
the recurrence, and its outputs."""

import json

from benchmarks import ssd_seq_bench


def test_bench_writes_checked_rows(tmp_path):
    """At configs/tiny.py (headdim 32: the Mosaic path refuses it, so those rows carry the
    reason) the sequential kernel's rows are timed and match the recurrence."""
    prefix = str(tmp_path / "seq")
    result = ssd_seq_bench.main(["--config", "configs/tiny.py", "--block-p", "16,32",
                                 "--warps", "4", "--stages", "1", "--loop", "2", "--runs", "1",
                                 "--inner", "1", "--out", prefix])
    rows = result["rows"]
    assert [r["impl"] for r in rows[:2]] == ["ssd_mosaic_forward (mosaic)",
                                             "ssd_mosaic_forward (sequential)"]
    assert all("headdim" in r["error"] for r in rows[:2])
    kernel_rows = rows[2:]
    assert [r["block_p"] for r in kernel_rows] == [16, 32]
    assert all(r["rel_err"] < 1e-2 and r["us"] > 0 for r in kernel_rows)
    assert result["shape"] == dict(batch=1, L=64, nheads=16, headdim=32, ngroups=2, d_state=16)
    with open(prefix + ".json") as f:
        assert json.load(f)["rows"] == rows
    with open(prefix + ".md") as f:
        assert f.read().count("| pallas_seq kernel |") == 2
