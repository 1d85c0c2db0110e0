"""benchmarks/plot_fused.py: the figure from the committed result files, and a missing file."""

import pytest

from benchmarks import plot_fused


def test_figure_from_committed_results(tmp_path):
    groups = plot_fused.train_groups("benchmarks/results", plot_fused.TRAIN, "h100")
    assert [len(rows) for _, rows in groups] == [2, 3, 2]
    assert all(rows[0][1] > rows[-1][1] for _, rows in groups)  # all-XLA first, slowest
    levers = plot_fused.lever_bars("benchmarks/results", plot_fused.LEVERS, "h100")
    assert {v for v, _, _ in levers} == {"base", "mixer_pallas", "conv_pallas", "norm_pallas"}
    out = plot_fused.main(["--out", str(tmp_path / "f.png")])
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_missing_results_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tt_twopass_h200.json"):
        plot_fused.main(["--device", "h200", "--train", "tt_twopass", "--out",
                         str(tmp_path / "f.png")])
