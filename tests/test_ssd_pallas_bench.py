"""benchmarks/ssd_pallas_bench.py's results files (named by device, our kernels only: no mamba_ssm
times or ratios), the 4-tuple SHAPES its readers unpack, and docs/plot_ssd.py's figure."""

import argparse
import importlib.util
import json
import pathlib

import pytest

from benchmarks import device_tag, mosaic_probe, ssd_bench, vs_mamba_ssm
from benchmarks import ssd_pallas_bench as bench

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind, tag", [
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H100 PCIe", "h100"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA H200 NVL", "h200"),
    ("NVIDIA GH200 480GB", "nvidia_gh200_480gb"),
    ("NVIDIA A100-SXM4-80GB", "nvidia_a100_sxm4_80gb"),
    ("cpu", "cpu"),
    ("TPU v5 lite", "tpu_v5_lite"),
])
def test_device_tag(kind, tag):
    assert device_tag(kind) == tag


def _row(shape, impl, fwd, fwdbwd, **extra):
    return dict(shape=shape, impl=impl, fwd_ms=fwd, fwdbwd_ms=fwdbwd, fwd_tflops=10.0,
                fwdbwd_tflops=20.0, **extra)


@pytest.mark.parametrize("kind, stem", [("NVIDIA H100 80GB HBM3", "ssd_h100"),
                                        ("NVIDIA H200", "ssd_h200")])
def test_written_files_are_named_by_device_and_hold_no_peer_ratios(tmp_path, kind, stem):
    result = {"device": kind, "command": "python3 -m benchmarks.ssd_pallas_bench", "jax": "0",
              "code_version": bench.KERNEL_VERSION, "errors": {},
              "rows": [_row("130m-L2k", "xla", 0.5, 2.0),
                       _row("130m-L2k", "pallas", 0.2, 0.8, variant="pallas_default")],
              "variant_rows": [_row("130m-L2k", "pallas_default", 0.2, 0.8),
                               _row("130m-L2k", "pallas_128x4x8", 0.3, 1.1),
                               {"shape": "130m-L2k", "impl": "mosaic_128_triton_bwd",
                                "error": "boom"}]}
    bench.write(result, argparse.Namespace(out=str(tmp_path), runs=50))
    assert sorted(p.name for p in tmp_path.iterdir()) == [stem + ".json", stem + ".md"]
    md = (tmp_path / (stem + ".md")).read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0] == "| shape | impl | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s |"
    assert len(table) == 2 + 5 and all(line.count("|") == 7 for line in table)
    assert not any("mamba_ssm" in line for line in table)
    assert "`benchmarks/vs_mamba_ssm.py`" in md  # the only source of ratios to the peer
    assert json.loads((tmp_path / (stem + ".json")).read_text()) == result


def test_shapes_are_four_tuples_and_their_readers_unpack_them():
    assert [s[0] for s in bench.SHAPES] == ["130m-L2k", "130m-L8k", "1.3b-L2k", "130m-L32k"]
    assert all(len(s) == 4 for s in bench.SHAPES)
    assert bench.SHAPES is ssd_bench.SHAPES  # one table for both SSD benchmarks
    assert mosaic_probe.SHAPES is bench.SHAPES
    shapes, p, n, chunk = vs_mamba_ssm.ssd_geometry(argparse.Namespace(smoke=False))
    assert shapes == bench.SHAPES and (p, n, chunk) == (64, 128, 256)


def test_no_stored_peer_times_in_the_benchmark_sources():
    for path in ("benchmarks/ssd_pallas_bench.py", "benchmarks/mosaic_probe.py",
                 "benchmarks/ssd_profile.py", "docs/plot_ssd.py"):
        assert "mamba_ssm_fwd" not in (ROOT / path).read_text(), path


def _plot_ssd():
    spec = importlib.util.spec_from_file_location("plot_ssd", ROOT / "docs" / "plot_ssd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_ssd_draws_our_kernels_from_rows_without_peer_fields(tmp_path):
    plot_ssd = _plot_ssd()
    shapes = [s[0] for s in bench.SHAPES]
    for _, fname, impl, _ in plot_ssd.SERIES:
        path = tmp_path / fname
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [_row(s, "xla", 1.0, 3.0) for s in shapes] + [_row(s, "pallas", 0.4, 1.5) for s in shapes]
        path.write_text(json.dumps({"device": "NVIDIA H200", "rows": rows}))
    got_shapes, rows = plot_ssd.load_rows(str(tmp_path))
    assert got_shapes == shapes and len(rows) == len(plot_ssd.SERIES) * len(shapes)
    out = tmp_path / "ssd.png"
    plot_ssd.draw(str(out), str(tmp_path))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
