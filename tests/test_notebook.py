"""The Colab notebook cannot rot: its source script runs top to bottom, and the committed
.ipynb is exactly what notebooks/build_notebook.py makes from that script."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("nbformat")  # a test extra (CI has it); machines without it (the GPU one) collect the rest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
sys.path.insert(0, NOTEBOOKS)
import build_notebook  # noqa: E402  (notebooks/ is not a package)

sys.path.remove(NOTEBOOKS)


def test_percent_format_parsing():
    text = ('"""header dropped"""\n# %% [markdown]\n# # Title\n#\n# text *here*\n\n'
            '# %%\nx = 1\n\n# %%\n\n# %%\n# !pip install thing\nprint(x)\n')
    assert build_notebook.parse_cells(text) == [
        ("markdown", "# Title\n\ntext *here*"),
        ("code", "x = 1"),
        ("code", "# !pip install thing\nprint(x)"),
    ]
    nb = build_notebook.build_notebook(text)
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "code"]
    assert all(c.get("outputs", []) == [] for c in nb.cells)


def test_committed_notebook_matches_its_source_script():
    with open(build_notebook.SOURCE, encoding="utf-8") as f:
        wanted = build_notebook.render(f.read())
    with open(build_notebook.TARGET, encoding="utf-8") as f:
        committed = f.read()
    assert committed == wanted, "notebook out of date: run python notebooks/build_notebook.py"
    cells = json.loads(committed)["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    for needed in ("train_and_evaluate(", "metrics.jsonl", "dimba_jax.load(", ".generate(", ".infill(",
                   "step_counts"):
        assert needed in code


def test_notebook_script_runs_top_to_bottom(tmp_path):
    # XLA_FLAGS (optimisation level 0, conftest.py) is inherited: compiling dominates the run.
    env = dict(os.environ, DIMBA_NOTEBOOK_SMOKE="1", DIMBA_NOTEBOOK_STEPS="2",
               DIMBA_NOTEBOOK_WORKDIR=str(tmp_path / "run"), MPLBACKEND="Agg")
    out = subprocess.run([sys.executable, build_notebook.SOURCE], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    for marker in ("trained 2 steps", "last logged:", "Pipeline(", "unprompted sample 0", "prompt 'The old man'",
                   "T=  2:", "T=  8:"):
        assert marker in out.stdout, (marker, out.stdout[-3000:])
    assert os.path.exists(tmp_path / "run" / "metrics.jsonl")
    assert os.path.exists(tmp_path / "run" / "config.json")


def test_readme_matches_ci_and_its_links_exist():
    """The README's install and test commands are the ones .ci/run runs; linked files exist."""
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read()
    for command in ('pip install -e ".[test]"', "python -m pytest -n 2 tests"):
        assert command in readme and command in ci, command
    links = re.findall(r"\]\(((?:docs|dimba_jax|notebooks|launch)/[^)#]*)\)", readme)
    assert "docs/dataflow.png" in links
    missing = [link for link in links if not os.path.exists(os.path.join(REPO, link))]
    assert not missing, f"README links to missing files: {missing}"


def test_relative_links_of_the_docs_exist():
    """Every relative link in README.md and docs/**/*.md names a file or folder of the repo."""
    pages = ["README.md"] + sorted(
        os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"),
                                                    recursive=True))
    assert "docs/performance_log.md" in pages
    missing = []
    for page in pages:
        text = open(os.path.join(REPO, page), encoding="utf-8").read()
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:|#", link):
                continue
            target = os.path.normpath(os.path.join(REPO, os.path.dirname(page), link.split("#")[0]))
            if not os.path.exists(target):
                missing.append(f"{page}: {link}")
    assert not missing, f"links to missing files: {missing}"
