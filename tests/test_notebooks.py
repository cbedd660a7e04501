"""The chapters as committed: parameters cell, executed outputs, figures, nbgrader exercises.

nbval executes them (see pyproject's testpaths); these checks read the committed files.
"""

import json
import re

import pytest

from llmbook.env import CHAPTERS_DIR

NOTEBOOKS = sorted(CHAPTERS_DIR.glob("[0-9][0-9]_*.ipynb"))


def _cells(nb_path):
    return json.loads(nb_path.read_text(encoding="utf-8"))["cells"]


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_there_are_chapters():
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_title_and_parameters_cell(nb):
    cells = _cells(nb)
    assert cells[0]["cell_type"] == "markdown"
    title = _src(cells[0]).splitlines()[0]
    assert title.startswith(f"# {nb.name[:2]}") and re.search(r"[\u4e00-\u9fff]", title), title
    first_code = next(c for c in cells if c["cell_type"] == "code")
    assert "parameters" in first_code["metadata"].get("tags", [])
    assert re.search(r"QUICK\s*=.*LLMBOOK_QUICK", _src(first_code))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs_and_a_figure_and_no_errors(nb):
    code = [c for c in _cells(nb) if c["cell_type"] == "code"]
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert all(c.get("execution_count") for c in code), "commit the notebook fully executed"
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "at least one figure"
    assert nb.stat().st_size < 2_000_000


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_at_least_three_nbgrader_exercises(nb):
    cells = _cells(nb)
    grading = [c.get("metadata", {}).get("nbgrader") for c in cells]
    solutions = [c for c, g in zip(cells, grading, strict=True) if g and g.get("solution")]
    tests = [c for c, g in zip(cells, grading, strict=True) if g and g.get("grade")]
    assert len(solutions) >= 3 and len(tests) >= 3
    ids = [g["grade_id"] for g in grading if g]
    assert len(ids) == len(set(ids)), "grade_id must be unique"
    for c in solutions:
        assert "### BEGIN SOLUTION" in _src(c) and "### END SOLUTION" in _src(c)
    for c in tests:
        g = c["metadata"]["nbgrader"]
        assert g["locked"] and g["points"] > 0 and g["schema_version"] == 3
        assert "### BEGIN HIDDEN TESTS" in _src(c) and "assert" in _src(c)
