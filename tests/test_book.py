"""`llmbook book`: executes chapters with papermill, reports a table, fails clearly."""

import subprocess
import sys

import nbformat
import pytest

from llmbook.book import BookError, find_chapters, select


def _notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    params = nbformat.v4.new_code_cell("QUICK = False")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)


@pytest.fixture
def toy_book(tmp_path):
    src = tmp_path / "chapters"
    src.mkdir()
    _notebook(src / "00_fails.ipynb", "x = 1", "raise RuntimeError('the toy chapter broke')")
    _notebook(src / "01_works.ipynb", "assert QUICK is True\nprint('quick run')")
    return src


def _book(*args):
    return subprocess.run(
        [sys.executable, "-m", "llmbook", "book", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_select_resolves_numbers_and_rejects_unknown(toy_book):
    assert [k for k, _ in select(["1"], toy_book)] == ["01"]
    assert list(find_chapters(toy_book)) == ["00", "01"]
    with pytest.raises(BookError, match="unknown chapter '42'.*00, 01"):
        select(["42"], toy_book)
    with pytest.raises(BookError, match="no chapter notebooks"):
        select(None, toy_book / "nowhere")


def test_unknown_chapter_is_a_one_line_error(toy_book, tmp_path):
    r = _book("--source", str(toy_book), "--chapters", "07", "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown chapter '07'" in r.stderr


def test_failing_cell_is_named_and_other_chapters_still_run(toy_book, tmp_path):
    out = tmp_path / "out"
    r = _book("--quick", "--source", str(toy_book), "--out", str(out))
    assert r.returncode == 1
    # In [4]: the parameters cell, papermill's injected cell, `x = 1`, then the raise
    assert "00_fails failed: cell In [4] raised RuntimeError: the toy chapter broke" in r.stderr
    assert "Traceback" not in r.stderr
    assert (out / "01_works.ipynb").exists() and (out / "00_fails.ipynb").exists()
    table = r.stdout.splitlines()
    assert any(line.split()[:2] == ["00_fails", "failed"] for line in table)
    assert any(line.split()[:2] == ["01_works", "ok"] for line in table)


@pytest.mark.slow
def test_book_runs_a_real_chapter_quick(tmp_path):
    r = _book("--quick", "--chapters", "00", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "00_setup.ipynb").exists()
    executed = nbformat.read(tmp_path / "00_setup.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "QUICK = True" in injected[0].source


def test_kernels_start_without_the_plain_tcp_warning(toy_book, tmp_path):
    # ipykernel logs "Kernel is running over TCP without encryption" to the terminal when the
    # kernel manager gives it neither CurveZMQ keys nor IPC sockets; `book` gives it one of them
    r = _book("--quick", "--source", str(toy_book), "--chapters", "01", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "without encryption" not in r.stderr + r.stdout
    assert "01_works" in r.stdout
