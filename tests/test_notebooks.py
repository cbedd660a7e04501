"""The chapters as committed: parameters cell, executed outputs, figures, nbgrader exercises.

tests/test_exercises.py executes them (nbgrader's autograde, QUICK mode); these checks read the
committed files.
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


def _execution_span(nb_path) -> float:
    """Seconds from the first code cell's start to the last one's end (nbclient's timestamps)."""
    from datetime import datetime

    code = [c for c in _cells(nb_path) if c["cell_type"] == "code"]
    stamps = [c["metadata"].get("execution", {}) for c in code]
    assert all("iopub.status.busy" in s and "iopub.status.idle" in s for s in stamps), (
        "execute the notebook with nbclient (nbconvert --execute, llmbook book): every code cell "
        "needs its metadata.execution timestamps")

    def when(stamp: str) -> datetime:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))

    end, start = when(stamps[-1]["iopub.status.idle"]), when(stamps[0]["iopub.status.busy"])
    return (end - start).total_seconds()


def _readme_full_seconds() -> dict[str, float]:
    """Chapter number -> the README chapter table's "full" seconds."""
    lines = (CHAPTERS_DIR.parent / "README.md").read_text(encoding="utf-8").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| chapter |"))
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    full = next(k for k, c in enumerate(columns) if c.startswith("full"))
    table = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        chapter = re.search(r"\[(\d\d) ·", cells[0]).group(1)
        table[chapter] = float(re.fullmatch(r"([\d.]+) s", cells[full]).group(1))
    return table


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_readme_full_time_is_the_committed_run(nb):
    readme = _readme_full_seconds()
    assert nb.name[:2] in readme, f"README's chapter table has no row for {nb.name}"
    span = _execution_span(nb)
    assert abs(readme[nb.name[:2]] - span) <= 0.2 * span, (
        f"README says {readme[nb.name[:2]]:.0f} s full for {nb.name}, its committed run took "
        f"{span:.0f} s (first cell's start to last cell's end): update the README's table")


_BAR = re.compile(r"(?:^|\r)([^\r\n]*?):?\s*(\d+)%\|[^|]*\|\s*(\d+)/(\d+)")


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_progress_bars_are_finished_text_bars(nb):
    for cell in _cells(nb):
        outputs = cell.get("outputs", [])
        text = "".join(_src({"source": o.get("text", "")}) for o in outputs)
        assert "IProgress not found" not in text and "TqdmWarning" not in text, (
            "a widget progress bar without ipywidgets: use `from tqdm import tqdm` (text bars)")
        assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                       for o in outputs), "widget bars read 0% on the web: use text bars"
        last = {}
        for desc, _, done, total in _BAR.findall(text):
            last[desc.strip()] = (int(done), int(total))
        unfinished = {d: f"{n}/{t}" for d, (n, t) in last.items() if n != t}
        assert not unfinished, f"progress bars committed unfinished: {unfinished}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_parses_every_knob_of_the_parameters_cell(nb, caplog):
    import papermill as pm

    with caplog.at_level("WARNING"):
        knobs = pm.inspect_notebook(str(nb))
    assert "QUICK" in knobs
    unparsed = [r.getMessage() for r in caplog.records if "Unable to parse" in r.getMessage()]
    assert not unparsed, "write each knob as one simple assignment: " + "; ".join(unparsed)
