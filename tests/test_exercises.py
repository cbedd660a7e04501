"""Every exercise's tests can fail: nbgrader releases each chapter, and in one quick-mode kernel per
chapter each exercise's test cells reject the blank student version and a plausible wrong solution
(tests/exercises/<chapter>/<grade_id>.py) and accept the reference solution.
"""

import os
from pathlib import Path

import nbformat
import pytest

from llmbook.book import kernel_config
from llmbook.env import CHAPTERS_DIR

NOTEBOOKS = sorted(CHAPTERS_DIR.glob("[0-9][0-9]_*.ipynb"))
WRONG_DIR = Path(__file__).parent / "exercises"
BLANK = "raise NotImplementedError()"  # what nbgrader puts where the solution was


def _nbgrader(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def _solution_ids(nb) -> list[str]:
    return [_nbgrader(c)["grade_id"] for c in nb.cells if _nbgrader(c).get("solution")]


def _wrong_files(stem: str) -> dict[str, Path]:
    return {p.stem: p for p in sorted((WRONG_DIR / stem).glob("*.py"))}


def _missing_and_orphaned(nb_path: Path) -> list[str]:
    ids = _solution_ids(nbformat.read(nb_path, as_version=4))
    files = _wrong_files(nb_path.stem)
    where = WRONG_DIR.relative_to(WRONG_DIR.parent.parent) / nb_path.stem
    problems = [f"no wrong solution for {g}: write {where / g}.py" for g in ids if g not in files]
    problems += [f"{where / f}.py matches no solution cell of {nb_path.name}"
                 for f in files if f not in ids]
    return problems


@pytest.fixture(scope="session")
def release(tmp_path_factory):
    """chapter notebook -> (ok, log, released notebook or None), one nbgrader run per chapter."""
    try:
        from nbgrader.apps import NbGraderAPI
    except ImportError:
        pytest.fail("nbgrader is not installed: pip install -e '.[dev]'")
    from traitlets.config import Config

    course = tmp_path_factory.mktemp("course")
    config = Config()
    config.CourseDirectory.root = str(course)
    config.Exchange.root = str(course / "exchange")
    config.GenerateAssignment.no_database = True  # `nbgrader generate_assignment --no-db`
    config.SaveCells.enabled = False
    api = NbGraderAPI(config=config)
    done = {}

    def run(nb_path: Path):
        if nb_path not in done:
            source = course / "source" / nb_path.stem
            source.mkdir(parents=True)
            (source / nb_path.name).write_bytes(nb_path.read_bytes())
            result = api.generate_assignment(nb_path.stem, force=True, create=False)
            released = course / "release" / nb_path.stem / nb_path.name
            done[nb_path] = (result["success"], result.get("error") or result.get("log", ""),
                             released if result["success"] else None)
        return done[nb_path]

    return run


def test_no_wrong_solutions_for_chapters_that_do_not_exist():
    stems = {nb.stem for nb in NOTEBOOKS}
    assert not [d.name for d in WRONG_DIR.iterdir() if d.is_dir() and d.name not in stems]


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_has_one_wrong_solution(nb_path):
    assert not (problems := _missing_and_orphaned(nb_path)), "\n".join(problems)


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_nbgrader_releases_the_chapter(nb_path, release):
    ok, log, released = release(nb_path)
    assert ok, f"nbgrader generate_assignment failed on {nb_path.name}:\n{log[-3000:]}"
    source, student = nbformat.read(nb_path, as_version=4), nbformat.read(released, as_version=4)
    assert _solution_ids(student) == _solution_ids(source)
    for cell in student.cells:
        text = cell.source
        assert "### BEGIN SOLUTION" not in text and "### BEGIN HIDDEN TESTS" not in text
        if _nbgrader(cell).get("solution"):
            assert BLANK in text, cell.source


def _run(client, source: str, index: int) -> str | None:
    """Execute `source` in the chapter's kernel; None if it ran, else 'ErrorName: message'."""
    from nbclient.exceptions import CellExecutionError

    try:
        client.execute_cell(nbformat.v4.new_code_cell(source), index)
    except CellExecutionError as err:
        return f"{err.ename}: {str(err.evalue).splitlines()[0] if err.evalue else ''}"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_exercise_tests_reject_blank_and_wrong_solutions(nb_path, release):
    """One kernel, cells in order; at each exercise: blank, wrong, then reference solution."""
    from nbclient import NotebookClient

    assert not (problems := _missing_and_orphaned(nb_path)), "\n".join(problems)
    ok, log, released = release(nb_path)
    assert ok, f"nbgrader cannot release {nb_path.name}, so there is no blank version:\n{log}"
    blanks = {_nbgrader(c)["grade_id"]: c.source
              for c in nbformat.read(released, as_version=4).cells if _nbgrader(c).get("solution")}
    wrong = {g: p.read_text(encoding="utf-8") for g, p in _wrong_files(nb_path.stem).items()}

    nb = nbformat.read(nb_path, as_version=4)
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    env = dict(os.environ, LLMBOOK_QUICK="1", MPLBACKEND="Agg")
    client = NotebookClient(nb, timeout=900, kernel_name="python3", config=kernel_config(),
                            resources={"metadata": {"path": str(CHAPTERS_DIR)}})
    failures, n_exercises, k = [], 0, 0
    with client.setup_kernel(env=env):
        while k < len(code):
            i, cell = code[k]
            if not _nbgrader(cell).get("solution"):
                if error := _run(client, cell.source, i):
                    pytest.fail(f"{nb_path.name} cell {i} (id {cell.get('id')}) failed: {error}")
                k += 1
                continue
            grade_id = _nbgrader(cell)["grade_id"]
            n_exercises += 1
            end = next((m for m in range(k + 1, len(code))
                        if _nbgrader(code[m][1]).get("solution")), len(code))
            block = code[k + 1:end]  # the cells up to the next exercise; the grade cells test
            last = max((m for m, (_, c) in enumerate(block) if _nbgrader(c).get("grade")),
                       default=-1)
            block = block[:last + 1]
            for variant, source in (("blank", blanks[grade_id]), ("wrong", wrong[grade_id]),
                                    ("reference", cell.source)):
                solution_error = _run(client, source, i)  # blank or wrong may raise: tests decide
                if solution_error and variant == "reference":
                    failures.append(f"{grade_id}: the reference solution fails: {solution_error}")
                results = {}
                for j, c in block:
                    error = _run(client, c.source, j)
                    if _nbgrader(c).get("grade"):
                        results[_nbgrader(c)["grade_id"]] = error
                    elif error and variant == "reference":
                        failures.append(f"{grade_id}: cell {j} after the reference failed: {error}")
                if not results:
                    failures.append(f"{grade_id}: no grade cell before the next exercise")
                elif variant == "blank" and (passed := [t for t, e in results.items() if not e]):
                    failures.append(f"{grade_id}: {passed} passed with the blank solution")
                elif variant == "wrong" and not any(results.values()):
                    failures.append(f"{grade_id}: every test passed with the wrong solution "
                                    f"{(WRONG_DIR / nb_path.stem / grade_id)}.py")
                elif variant == "reference" and any(results.values()):
                    failures.append(f"{grade_id}: the reference fails {results}")
            k = k + 1 + len(block)
    assert n_exercises == len(blanks)
    assert not failures, f"{nb_path.name}:\n" + "\n".join(failures)
