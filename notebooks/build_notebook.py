"""Builds ``dimba_quickstart.ipynb`` from its source script ``dimba_quickstart.py``.

The script is the source of truth (it runs as plain Python, so a test can execute it); the
notebook is generated from it and committed for Colab. Cells use the "percent" format:

    # %% [markdown]
    # # A title            <- markdown cell; the leading "# " of each line is removed
    # %%
    x = 1                  <- code cell

Commented shell lines such as ``# !pip install ...`` stay comments in the notebook: uncomment
them in Colab. The output has no outputs or execution counts, so it is reproducible byte for byte.

    python notebooks/build_notebook.py           # (re)write the .ipynb
    python notebooks/build_notebook.py --check   # exit 1 if the .ipynb is out of date
"""

from __future__ import annotations

import argparse
import os
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "dimba_quickstart.py")
TARGET = os.path.join(HERE, "dimba_quickstart.ipynb")
_CELL_MARK = "# %%"


def parse_cells(text: str) -> list[tuple[str, str]]:
    """Splits percent-format source into cells.

    Args:
      text: the script's contents.
    Returns:
      A list of (kind, source) with kind "markdown" or "code"; text before the first "# %%"
      (the module docstring / header) is dropped; empty cells are dropped.
    """
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith(_CELL_MARK):
            kind = "markdown" if "[markdown]" in line else "code"
            cells.append((kind, []))
        elif cells:
            cells[-1][1].append(line)
    result = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ("" if ln.strip() == "#" else ln) for ln in lines]
        source = "\n".join(lines).strip("\n")
        if source.strip():
            result.append((kind, source))
    return result


def build_notebook(text: str) -> nbformat.NotebookNode:
    """Returns the notebook (nbformat v4) for percent-format source `text`, with stable cell ids."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    }
    for index, (kind, source) in enumerate(parse_cells(text)):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        cell = make(source)
        cell["id"] = f"cell-{index:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(text: str) -> str:
    """Returns the .ipynb file contents (JSON text ending in a newline) for source `text`."""
    return nbformat.writes(build_notebook(text)) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description="Build the quickstart notebook from its script.")
    parser.add_argument("--check", action="store_true", help="only check that the .ipynb is up to date")
    args = parser.parse_args()
    with open(SOURCE, encoding="utf-8") as f:
        wanted = render(f.read())
    if args.check:
        current = open(TARGET, encoding="utf-8").read() if os.path.exists(TARGET) else ""
        if current != wanted:
            print(f"{TARGET} is out of date: run python notebooks/build_notebook.py", file=sys.stderr)
            return 1
        print("notebook is up to date")
        return 0
    with open(TARGET, "w", encoding="utf-8") as f:
        f.write(wanted)
    print("wrote", TARGET)
    return 0


if __name__ == "__main__":
    sys.exit(main())
