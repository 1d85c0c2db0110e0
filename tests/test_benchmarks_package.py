"""benchmarks/ is a package: every script imports as `benchmarks.NAME` from the repository root,
and the scripts reach each other only through the package (`from benchmarks import x`), never
by a bare sibling name that works only when that folder happens to be on sys.path."""

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")


def _bare_sibling_imports(source: str) -> list[str]:
    """Top-level names imported by `source` (Python text) that are sibling scripts' bare names."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            heads = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            heads = [node.module.split(".")[0]]
        else:
            continue
        found += [h for h in heads if h in SCRIPTS]
    return found


def test_the_scripts_are_found():
    assert {"pareto", "profile_summary", "train_throughput", "step_breakdown"} <= set(SCRIPTS)
    assert (ROOT / "benchmarks" / "__init__.py").is_file()
    # the checker sees both spellings of a bare sibling import, and lets the package form pass
    assert _bare_sibling_imports("import pareto\nfrom profile_summary import find_trace_file\n"
                                 "from benchmarks import train_throughput\nimport json\n") == \
        ["pareto", "profile_summary"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_imports_as_a_module(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.__doc__, f"benchmarks/{name}.py has no module docstring (its manual)"
    assert pathlib.Path(module.__file__).resolve() == ROOT / "benchmarks" / f"{name}.py"


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_import_siblings_through_the_package(name):
    source = (ROOT / "benchmarks" / f"{name}.py").read_text()
    assert _bare_sibling_imports(source) == [], (
        f"benchmarks/{name}.py imports a sibling by bare name; use `from benchmarks import ...`")


def test_ssd_bench_variants_name_the_mosaic_prologue():
    """ssd_pallas_bench's "mosaic:BLOCK:BACKWARD:PROLOGUE" variants: the prologue kernel is
    named in the label and the row's fields; without it the old labels stay."""
    from benchmarks import ssd_pallas_bench as bench

    label, fields, _ = bench.parse_variant("mosaic:128:mosaic:pallas")
    assert label == "mosaic_128_mosaic_bwd_pallas_prologue"
    assert fields == {"block_len": 128, "backward": "mosaic", "prologue": "pallas"}
    assert bench.parse_variant("mosaic:64")[:2] == ("mosaic_64_triton_bwd",
                                                   {"block_len": 64, "backward": "triton"})


def test_ssd_bench_variants_name_two_warpgroups():
    """The fifth field's flags joined by "+": "wg2" (two consumer warpgroups in the Mosaic
    chunk backward), "owg2" (in the chunk output), "fo128" (forward-only calls at chunk 128),
    named in the label and the fields; an unknown flag is refused."""
    from benchmarks import ssd_pallas_bench as bench

    label, fields, _ = bench.parse_variant("mosaic:128:mosaic:pallas:wg2")
    assert label == "mosaic_128_mosaic_bwd_pallas_prologue_wg2"
    assert fields["backward_warpgroups"] == 2 and "output_warpgroups" not in fields
    label, fields, _ = bench.parse_variant("mosaic:128:mosaic:pallas:wg2+owg2")
    assert label.endswith("_wg2_owg2") and fields["output_warpgroups"] == 2
    label, fields, _ = bench.parse_variant("mosaic:128:mosaic:pallas:owg2+fo128")
    assert label.endswith("_owg2_fo128") and fields["forward_only_block_len"] == 128
    assert "output_persistent" not in fields
    label, fields, _ = bench.parse_variant("mosaic:128:mosaic:pallas:wg2+owg2+persist")
    assert label.endswith("_wg2_owg2_persist") and fields["output_persistent"] is True
    with pytest.raises(ValueError, match="fifth field"):
        bench.parse_variant("mosaic:128:mosaic:pallas:wg3")
