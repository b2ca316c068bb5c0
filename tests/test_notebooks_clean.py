"""The tutorial notebooks are committed clean: no outputs, no execution counts.

They are executed by ``make test`` (``pytest --nbmake notebooks/``); this test only reads
their JSON, so it is fast and needs no kernel.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = [
    "01_explore_split.ipynb",
    "02_train.ipynb",
    "03_predict_and_write.ipynb",
    "04_sampling_audit.ipynb",
]


def _load(name: str) -> dict:
    return json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))


def test_exactly_the_four_notebooks() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_is_stripped(name: str) -> None:
    notebook = _load(name)
    assert notebook.get("nbformat") == 4
    dirty = []
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        if cell.get("outputs"):
            dirty.append(f"cell {index} has {len(cell['outputs'])} output(s)")
        if cell.get("execution_count") is not None:
            dirty.append(f"cell {index} has execution_count {cell['execution_count']}")
    assert not dirty, f"{name} is not stripped: " + "; ".join(dirty)


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_starts_with_a_title(name: str) -> None:
    cells = _load(name)["cells"]
    assert cells, f"{name} has no cells"
    first = cells[0]
    assert first["cell_type"] == "markdown", f"{name} starts with a {first['cell_type']} cell"
    source = "".join(first["source"]) if isinstance(first["source"], list) else first["source"]
    assert source.lstrip().startswith("# "), f"{name}'s first cell has no '# ' title"
    assert any(c["cell_type"] == "code" for c in cells), f"{name} has no code cell"
