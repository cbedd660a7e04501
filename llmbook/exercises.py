"""The chapters' exercises released and graded by nbgrader (`llmbook exercises release|grade`):
student versions, autograded submissions and a grade CSV, with nbgrader doing all the grading."""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .book import find_chapters, kernel_config, select
from .env import CHAPTERS_DIR, REPO_ROOT
from .errors import UserError

if TYPE_CHECKING:
    from nbgrader.apps import NbGraderAPI
    from traitlets.config import Config

CONFIG_FILE = REPO_ROOT / "nbgrader_config.py"
DEFAULT_OUT = Path("build") / "exercises"
LAYOUT = "STUDENT/CHAPTER/CHAPTER.ipynb, e.g. alice/00_setup/00_setup.ipynb"
GRADES_CSV = "grades.csv"


@dataclass
class Graded:
    """One autograded submission: nbgrader's score for each grade cell and the executed notebook."""

    student: str
    chapter: str  # the assignment: the chapter notebook's stem, e.g. "00_setup"
    scores: dict[str, tuple[float, float]]  # grade_id -> (score, max score)
    notebook: Path

    @property
    def score(self) -> float:
        return sum(s for s, _ in self.scores.values())

    @property
    def max_score(self) -> float:
        return sum(m for _, m in self.scores.values())


def course_config(root: Path) -> Config:
    """nbgrader_config.py with the course folder at `root` and the kernels' sockets kept private."""
    from traitlets.config import PyFileConfigLoader

    config = PyFileConfigLoader(CONFIG_FILE.name, path=str(CONFIG_FILE.parent)).load_config()
    config.CourseDirectory.root = str(Path(root).resolve())
    config.merge(kernel_config())
    return config


def _api(root: Path) -> NbGraderAPI:
    try:
        from nbgrader.apps import NbGraderAPI
    except ImportError:
        raise UserError("nbgrader is not installed: pip install -e '.[dev]'") from None
    if shutil.which("alembic") is None:  # nbgrader's gradebook runs it: the one beside this Python
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                              os.environ.get("PATH", "")])
    return NbGraderAPI(config=course_config(root))


def _why(result: dict) -> str:
    """The line of nbgrader's captured log that says what went wrong."""
    lines = [line.strip() for line in
             f"{result.get('log', '')}\n{result.get('error', '')}".splitlines()]
    reasons = [line for line in lines if re.match(r"[\w.]+(Error|Exception): ", line)
               and "see the the above traceback" not in line]
    errors = [line.removeprefix("[ERROR]").strip() for line in lines if line.startswith("[ERROR]")]
    return (reasons or errors or ["nbgrader gave no reason"])[0]


def release(chapters: list[str] | None = None, out: Path = DEFAULT_OUT,
            source: Path = CHAPTERS_DIR) -> dict[str, Path]:
    """Student versions of the chapters (all if none named) under out/release, made by nbgrader's
    generate_assignment, which also enters each chapter in out/gradebook.db for grading."""
    picked = select(chapters, source)
    api = _api(out)
    released = {}
    for _, nb in picked:
        folder = Path(out) / "source" / nb.stem
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        shutil.copy2(nb, folder / nb.name)
        result = api.generate_assignment(nb.stem, force=True, create=True)
        if not result["success"]:
            raise UserError(f"nbgrader cannot release {nb.name}: {_why(result)}")
        released[nb.stem] = Path(out) / "release" / nb.stem / nb.name
    return released


def find_submissions(submissions: Path, source: Path = CHAPTERS_DIR) -> list[tuple[str, str]]:
    """(student, chapter) for each notebook in `submissions` (laid out as nbgrader's submitted/
    folder: STUDENT/CHAPTER/CHAPTER.ipynb); anything else there is a UserError."""
    import nbformat

    submissions = Path(submissions)
    if not submissions.is_dir():
        raise UserError(f"{submissions}: no such folder; give the folder of submissions, laid out "
                        f"as {LAYOUT}")
    chapters = {nb.stem for nb in find_chapters(source).values()}
    found = []
    for student in sorted(p for p in submissions.iterdir() if not p.name.startswith(".")):
        if not student.is_dir():
            raise UserError(f"{student}: expected a folder per student, laid out as {LAYOUT}")
        for chapter in sorted(p for p in student.iterdir() if not p.name.startswith(".")):
            if not chapter.is_dir() or chapter.name not in chapters:
                raise UserError(f"{chapter}: not a chapter's folder; a student's folder holds one "
                                f"per chapter, named {', '.join(sorted(chapters))}")
            notebook = chapter / f"{chapter.name}.ipynb"
            if not notebook.is_file():
                raise UserError(f"{chapter} has no {notebook.name}: submit the released notebook "
                                "under its own name")
            try:
                nbformat.validate(nbformat.read(notebook, as_version=4))
            except Exception as exc:  # JSON, encoding or schema: all mean "not a notebook"
                detail = (str(exc).strip() or type(exc).__name__).splitlines()[0][:200]
                raise UserError(f"{notebook}: not a Jupyter notebook ({detail})") from None
            found.append((student.name, chapter.name))
    if not found:
        raise UserError(f"{submissions} holds no submissions: lay them out as {LAYOUT}")
    return found


def _autograde(root: str, chapter: str, student: str, env: dict[str, str]) -> tuple[bool, str]:
    """One `nbgrader autograde`, in a worker process whose environment the kernel inherits."""
    import warnings

    from sqlalchemy.exc import SAWarning

    os.environ.update(env)
    warnings.simplefilter("ignore", SAWarning)  # nbgrader's own session chatter, nothing to fix
    result = _api(Path(root)).autograde(chapter, student, force=True, create=True)
    return result["success"], "" if result["success"] else _why(result)


def grade(submissions: Path, out: Path = DEFAULT_OUT, jobs: int = 1, quick: bool = False,
          source: Path = CHAPTERS_DIR) -> list[Graded]:
    """Autograde every submission with nbgrader (`jobs` at a time; QUICK mode in the kernels if
    `quick`) and export the gradebook to out/grades.csv; returns each submission's scores."""
    from nbgrader.api import Gradebook
    from nbgrader.coursedir import CourseDirectory
    from nbgrader.plugins import CsvExportPlugin

    found = find_submissions(submissions, source)
    out = Path(out)
    release(sorted({chapter for _, chapter in found}), out, source)
    if Path(submissions).resolve() != (out / "submitted").resolve():  # e.g. `nbgrader collect`'s
        for student, chapter in found:
            target = out / "submitted" / student / chapter
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(Path(submissions) / student / chapter, target)

    env = {"LLMBOOK_QUICK": "1"} if quick else {}
    if jobs > 1:  # the workers share the cores instead of each spreading over all of them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        # later chapters first: they run longest, and starting them first keeps every worker
        # busy to the end
        runs = {key: pool.submit(_autograde, str(out.resolve()), key[1], key[0], env)
                for key in sorted(found, key=lambda k: (k[1], k[0]), reverse=True)}
        failed = {key: run.result()[1] for key, run in runs.items() if not run.result()[0]}

    graded = []  # in the order of `found`
    with Gradebook(CourseDirectory(config=course_config(out)).db_url) as gb:
        for student, chapter in found:
            if (student, chapter) not in failed:
                nb = gb.find_submission_notebook(chapter, chapter, student)
                graded.append(Graded(student, chapter,
                                     {g.name: (g.score, g.max_score) for g in nb.grades},
                                     out / "autograded" / student / chapter / f"{chapter}.ipynb"))
        CsvExportPlugin(to=str(out / GRADES_CSV)).export(gb)
    if failed:
        why = "; ".join(f"{s}/{c}: {line}" for (s, c), line in failed.items())
        raise UserError(f"nbgrader could not grade {len(failed)} submission(s): {why} (the "
                        f"others' grades are in {out / GRADES_CSV})")
    return graded
