"""The exercises are honest by nbgrader's own scores. `llmbook.exercises` releases every chapter and
autogrades its submissions (QUICK mode, two notebooks at a time): the instructor version gets full
marks and runs without an error; the unanswered student version scores 0 on every exercise and runs
without an error up to the first one; and each exercise's plausible wrong solution
(tests/exercises/<chapter>/<grade_id>.py) scores 0 on that exercise. The wrong solutions share a
submission ("wrong") unless one exercise reads a name that another's cells bind (found from the
cells' code): then the later one is answered wrong in another submission ("wrong2", ...) in which
the exercises it reads from keep the reference answer, so its 0 is its own.
"""
import csv
import re
import symtable
import time
from pathlib import Path

import nbformat
import pytest

from llmbook import exercises
from llmbook.cli import main
from llmbook.env import CHAPTERS_DIR

NOTEBOOKS = sorted(CHAPTERS_DIR.glob("[0-9][0-9]_*.ipynb"))
WRONG_DIR = Path(__file__).parent / "exercises"
BLANK = "raise NotImplementedError()"  # what nbgrader puts where the solution was


def _nbgrader(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def _solution_ids(nb) -> list[str]:
    return [_nbgrader(c)["grade_id"] for c in nb.cells if _nbgrader(c).get("solution")]


def _exercises(nb) -> dict[str, list[str]]:
    """Each solution cell's grade_id -> the grade cells after it, up to the next solution cell."""
    found: dict[str, list[str]] = {}
    for cell in nb.cells:
        if _nbgrader(cell).get("solution"):
            found[_nbgrader(cell)["grade_id"]] = current = []
        elif _nbgrader(cell).get("grade") and found:
            current.append(_nbgrader(cell)["grade_id"])
    return found


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


def _errors(nb, upto: int | None = None) -> list[str]:
    """'cell N: Name: message' for each error output in the first `upto` cells (all if None)."""
    return [f"cell {i}: {o.get('ename')}: {str(o.get('evalue', '')).splitlines()[:1]}"
            for i, c in enumerate(nb.cells[:upto]) if c.cell_type == "code"
            for o in c.get("outputs", []) if o.output_type == "error"]


@pytest.fixture(scope="session")
def released(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """The nbgrader course folder and each chapter's student version, released by llmbook."""
    out = tmp_path_factory.mktemp("course")
    return out, exercises.release(None, out)


def _wrong_student(group: int) -> str:
    return "wrong" if group == 0 else f"wrong{group + 1}"


@pytest.fixture(scope="session")
def graded(released, tmp_path_factory) -> dict[tuple[str, str], exercises.Graded]:
    """(student, chapter) -> nbgrader's scores, for every submission of every chapter."""
    out, student_versions = released
    submitted = tmp_path_factory.mktemp("submitted")

    def submit(student: str, nb_path: Path, nb) -> None:
        folder = submitted / student / nb_path.stem
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / nb_path.name)

    for nb_path in NOTEBOOKS:
        source = nbformat.read(nb_path, as_version=4)
        blank = nbformat.read(student_versions[nb_path.stem], as_version=4)
        submit("instructor", nb_path, source)
        submit("blank", nb_path, blank)
        answers = {g: p.read_text(encoding="utf-8") for g, p in _wrong_files(nb_path.stem).items()}
        reference = {_nbgrader(c)["grade_id"]: c.source for c in source.cells
                     if _nbgrader(c).get("solution")}
        for k, group in enumerate(_wrong_groups(source)):
            wrong = nbformat.read(student_versions[nb_path.stem], as_version=4)
            for cell in wrong.cells:
                if (grade_id := _nbgrader(cell).get("solution") and _nbgrader(cell)["grade_id"]):
                    cell.source = answers.get(grade_id, BLANK) if grade_id in group else \
                        reference[grade_id]
            submit(_wrong_student(k), nb_path, wrong)
    start = time.perf_counter()
    results = exercises.grade(submitted, out, jobs=2, quick=True)
    print(f"\nnbgrader autograded {len(results)} notebooks in {time.perf_counter() - start:.0f} s")
    return {(g.student, g.chapter): g for g in results}


def test_no_wrong_solutions_for_chapters_that_do_not_exist():
    stems = {nb.stem for nb in NOTEBOOKS}
    assert not [d.name for d in WRONG_DIR.iterdir() if d.is_dir() and d.name not in stems]


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_has_one_wrong_solution(nb_path):
    assert not (problems := _missing_and_orphaned(nb_path)), "\n".join(problems)


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_nbgrader_releases_the_chapter(nb_path, released):
    source = nbformat.read(nb_path, as_version=4)
    student = nbformat.read(released[1][nb_path.stem], as_version=4)
    assert _solution_ids(student) == _solution_ids(source)
    assert not [o for c in student.cells for o in c.get("outputs", [])]  # no answers in outputs
    for cell in student.cells:
        text = cell.source
        assert "### BEGIN SOLUTION" not in text and "### BEGIN HIDDEN TESTS" not in text
        if _nbgrader(cell).get("solution"):
            assert BLANK in text, cell.source


def _names(source: str) -> tuple[set[str], set[str]]:
    """(names a cell binds at its top level, names it reads from outside itself), by its scopes."""
    table = symtable.symtable(source, "<cell>", "exec")

    def binds(symbol) -> bool:
        return symbol.is_assigned() or symbol.is_imported() or symbol.is_namespace()

    bound = {s.get_name() for s in table.get_symbols() if binds(s)}
    read, scopes = set(), [table]
    while scopes:
        scope = scopes.pop()
        read |= {s.get_name() for s in scope.get_symbols() if s.is_referenced()
                 and (s.is_global() if scope.get_type() != "module" else not binds(s))}
        scopes += scope.get_children()
    return bound, read - bound


def _depends_on(nb) -> dict[str, set[str]]:
    """Each exercise (its solution's grade_id) -> the earlier exercises it reads a name from, also
    through others. An exercise spans its solution cell up to the next one (tests, other cells)."""
    answered: dict[str, str] = {}  # name -> the exercise whose span binds it
    depends: dict[str, set[str]] = {}
    exercise, seen = None, set()
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        bound, read = _names(cell.source)
        if _nbgrader(cell).get("solution"):
            exercise, seen = _nbgrader(cell)["grade_id"], set()
            depends[exercise] = set()
        if exercise:
            depends[exercise] |= {answered[n] for n in read - seen
                                  if answered.get(n, exercise) != exercise}
            seen |= bound
            answered.update(dict.fromkeys(bound, exercise))
    for before in depends.values():  # in order, so the earlier ones are complete
        before |= set().union(*(depends[e] for e in before))
    return depends


def _wrong_groups(nb) -> list[set[str]]:
    """Exercises that can be answered wrong in one submission: none reads from another."""
    groups: list[set[str]] = []
    for exercise, before in _depends_on(nb).items():
        group = next((g for g in groups if not g & before), None)
        if group is None:
            groups.append(group := set())
        group.add(exercise)
    return groups


def test_exercises_that_read_from_each_other_are_answered_wrong_apart():
    def code(source: str, grade_id: str | None = None, solution: bool = False):
        cell = nbformat.v4.new_code_cell(source)
        if grade_id:
            cell.metadata["nbgrader"] = {"grade_id": grade_id, "solution": solution,
                                         "grade": not solution}
        return cell

    nb = nbformat.v4.new_notebook(cells=[
        code("import math\nbase = 2"),
        code("def f(x):\n    return math.sqrt(x) * base", "ex1-solution", solution=True),
        code("assert f(4) == 4", "ex1-test"),
        code("table = [f(i) for i in range(3)]"),  # a plain cell in ex1's span, using its answer
        code("def g(x):\n    return x + 1", "ex2-solution", solution=True),
        code("for i in range(3):\n    assert g(i) == i + 1", "ex2-test"),
        code("def h():\n    return len(table)", "ex3-solution", solution=True),
        code("assert h() == 3", "ex3-test"),
        code("def k():\n    return h() + g(0)", "ex4-solution", solution=True),
        code("assert k() == 4", "ex4-test"),
    ])
    assert _depends_on(nb) == {"ex1-solution": set(), "ex2-solution": set(),
                               "ex3-solution": {"ex1-solution"},
                               "ex4-solution": {"ex1-solution", "ex2-solution", "ex3-solution"}}
    assert _wrong_groups(nb) == [{"ex1-solution", "ex2-solution"}, {"ex3-solution"},
                                 {"ex4-solution"}]
    assert _exercises(nb)["ex3-solution"] == ["ex3-test"]


@pytest.mark.slow
@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_instructor_version_gets_full_marks(nb_path, graded):
    result = graded["instructor", nb_path.stem]
    assert result.max_score > 0 and len(result.scores) >= 3
    assert {g: s for g, (s, m) in result.scores.items() if s != m} == {}
    nb = nbformat.read(result.notebook, as_version=4)
    assert not (errors := _errors(nb)), f"{nb_path.name} failed in autograde: {errors}"


@pytest.mark.slow
@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_unanswered_student_version_scores_zero(nb_path, graded):
    result = graded["blank", nb_path.stem]
    assert set(result.scores) == set(graded["instructor", nb_path.stem].scores)
    assert {g: s for g, (s, _) in result.scores.items() if s != 0} == {}
    nb = nbformat.read(result.notebook, as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if _nbgrader(c).get("solution"))
    assert not (errors := _errors(nb, first)), (
        f"the student version of {nb_path.name} fails before its first exercise: {errors}")


@pytest.mark.slow
@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_wrong_solution_scores_zero(nb_path, graded):
    assert not (problems := _missing_and_orphaned(nb_path)), "\n".join(problems)
    nb = nbformat.read(nb_path, as_version=4)
    tests, passed = _exercises(nb), {}
    for k, group in enumerate(_wrong_groups(nb)):
        scores = graded[_wrong_student(k), nb_path.stem].scores
        for solution in sorted(group):
            assert tests[solution], f"{solution} has no grade cell before the next exercise"
            if got := sum(scores[t][0] for t in tests[solution]):
                passed[f"{WRONG_DIR.name}/{nb_path.stem}/{solution}.py"] = got
    assert not passed, f"wrong solutions that nbgrader gave points: {passed}"


@pytest.mark.slow
def test_the_grade_csv_is_nbgraders_export_of_every_submission(graded, released):
    with (released[0] / exercises.GRADES_CSV).open(newline="") as f:
        rows = {(r["student_id"], r["assignment"]): r for r in csv.DictReader(f)}
    assert set(rows) >= set(graded)
    for key, row in rows.items():  # a chapter a student did not hand in counts 0
        score = graded[key].score if key in graded else 0
        assert float(row["score"]) == pytest.approx(score), key
        if key in graded:
            assert float(row["max_score"]) == pytest.approx(graded[key].max_score)


# ----------------------------------------------------------------------------- bad input


def _submission(root: Path, student: str, chapter: str, content: bytes | None = None) -> Path:
    folder = root / student / chapter
    folder.mkdir(parents=True)
    target = folder / f"{chapter}.ipynb"
    target.write_bytes(content if content is not None else (CHAPTERS_DIR / target.name)
                       .read_bytes())
    return target


@pytest.mark.parametrize("case", ["missing", "empty", "file at the top", "unknown chapter",
                                  "renamed notebook", "not json", "not a notebook"])
def test_bad_submissions_are_one_line_and_exit_2(case, tmp_path, capsys):
    subs, chapter = tmp_path / "subs", NOTEBOOKS[0].stem
    expected = {"missing": "no such folder", "empty": "holds no submissions",
                "file at the top": "expected a folder per student",
                "unknown chapter": "not a chapter's folder", "renamed notebook": "has no",
                "not json": "not a Jupyter notebook", "not a notebook": "not a Jupyter notebook"}
    if case != "missing":
        subs.mkdir()
    if case == "file at the top":
        (subs / f"{chapter}.ipynb").write_bytes(NOTEBOOKS[0].read_bytes())
    elif case == "unknown chapter":
        _submission(subs, "alice", "99_nothing", NOTEBOOKS[0].read_bytes())
    elif case == "renamed notebook":
        _submission(subs, "alice", chapter).rename(subs / "alice" / chapter / "mine.ipynb")
    elif case == "not json":
        _submission(subs, "alice", chapter, b"print('hello')\n")
    elif case == "not a notebook":
        _submission(subs, "alice", chapter, b'{"cells": "none"}')
    assert main(["exercises", "grade", str(subs), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmbook exercises: ") and err.count("\n") == 1, err
    assert expected[case] in err
    assert not (tmp_path / "out" / "autograded").exists()  # checked before anything is graded


def test_release_of_an_unknown_chapter_is_one_line(tmp_path, capsys):
    assert main(["exercises", "release", "99", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmbook exercises: unknown chapter '99'") and err.count("\n") == 1


def test_release_writes_the_student_version_and_says_where(tmp_path, capsys):
    assert main(["exercises", "release", NOTEBOOKS[0].name[:2], "--out", str(tmp_path)]) == 0
    student = tmp_path / "release" / NOTEBOOKS[0].stem / NOTEBOOKS[0].name
    assert str(student) in capsys.readouterr().out
    assert BLANK in student.read_text(encoding="utf-8")
    assert (tmp_path / "gradebook.db").is_file()


@pytest.mark.slow
def test_grade_prints_each_submissions_score_and_writes_the_csv(released, tmp_path, capsys):
    chapter = NOTEBOOKS[1]  # a short chapter: the command end to end, once
    _submission(tmp_path / "subs", "alice", chapter.stem,
                released[1][chapter.stem].read_bytes())  # handed back unanswered
    out = tmp_path / "course"
    assert main(["exercises", "grade", str(tmp_path / "subs"), "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    points = sum(_nbgrader(c)["points"] for c in nbformat.read(chapter, as_version=4).cells
                 if _nbgrader(c).get("grade"))
    assert re.search(rf"^alice +{chapter.stem} +0 +{points:g} *$", printed, re.M), printed
    assert str(out / exercises.GRADES_CSV) in printed
    rows = list(csv.DictReader((out / exercises.GRADES_CSV).open(newline="")))
    assert [(r["student_id"], r["assignment"], float(r["score"])) for r in rows] == [
        ("alice", chapter.stem, 0.0)]
