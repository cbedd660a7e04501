"""The book as a static website (`llmbook site`): every chapter with its committed outputs, built
offline by jupyter-book 1.x, with maths typeset by a MathJax copy that the site itself serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .book import find_chapters
from .env import CHAPTERS_DIR, REPO_ROOT
from .errors import UserError

DEFAULT_OUT = Path("build") / "site"
TITLE = "llmbook — large language models from scratch with PyTorch 2"
MATHJAX_DIR = "mathjax"  # under the site's _static/
# MathJax 2 from the jupyter-server-mathjax package, configured in the page (Sphinx allows no
# query string on a local script): TeX in, HTML-CSS out with the one web font the package ships
# (STIX-Web; no look for fonts installed locally, no image fonts; the hidden MathML kept for
# screen readers in a plain font, not in the TeX fonts the package lacks), and only the delimiters
# Sphinx writes, so that a dollar sign in a printed output stays text.
MATHJAX_CONFIG = {"config": ["TeX-AMS-MML_HTMLorMML-full.js"],
                  "tex2jax": {"inlineMath": [["\\(", "\\)"]], "displayMath": [["\\[", "\\]"]]},
                  "HTML-CSS": {"availableFonts": [], "preferredFont": None, "webFont": "STIX-Web",
                               "imageFont": None},
                  "styles": {".MJX_Assistive_MathML *": {"font-family": "serif !important"}},
                  "showMathMenu": False}
WARNING = re.compile(r"\bWARNING\b|\bERROR\b")


@dataclass
class Site:
    """A built site: its folder, the chapter pages in the book's order, and the build's warnings."""

    out: Path
    pages: dict[str, Path]  # chapter stem -> its page
    warnings: list[str]


def chapter_title(notebook: Path) -> str:
    """The notebook's first line without its '#', e.g. '00 · Setting up PyTorch 2 — 环境搭建'."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    first = "".join(cells[0]["source"]) if cells else ""
    title = first.splitlines()[0].lstrip("#").strip() if first.strip() else ""
    if not cells or cells[0]["cell_type"] != "markdown" or not title:
        raise UserError(f"{notebook}: its first cell must be a markdown title ('# NN · ...')")
    return title


def _mathjax() -> Path:
    try:
        import jupyter_server_mathjax
    except ImportError:
        raise UserError("the site's MathJax comes from jupyter-server-mathjax, which is not "
                        "installed: pip install -e '.[dev]'") from None
    return Path(jupyter_server_mathjax.__file__).parent / "static"


def _contents(chapters: dict[str, Path]) -> str:
    lines = [f"# {TITLE}", "",
             "A runnable course: you build a GPT piece by piece, pretrain it on classical Chinese "
             "poetry, then fine-tune and serve it. Each chapter below is a Jupyter notebook shown "
             "with the outputs of its committed run; run them yourself with "
             "`jupyter lab chapters/`.", "", "## Contents", ""]
    lines += [f"- [{chapter_title(nb)}](chapters/{nb.name})" for _, nb in sorted(chapters.items())]
    return "\n".join(lines) + "\n"


def _config(static: Path) -> str:
    config = {
        "title": TITLE, "author": "the llmbook authors", "copyright": "MIT licence",
        "only_build_toc_files": True,
        "execute": {"execute_notebooks": "off"},  # the committed outputs, as they are
        "html": {"use_repository_button": False, "use_issues_button": False,
                 "use_edit_page_button": False, "home_page_in_navbar": True},
        "launch_buttons": {"thebe": False, "binderhub_url": "", "jupyterhub_url": "",
                           "colab_url": "", "deepnote_url": ""},
        "repository": {"url": ""},
        "sphinx": {"config": {
            "mathjax_path": f"{MATHJAX_DIR}/MathJax.js", "mathjax2_config": MATHJAX_CONFIG,
            "mathjax3_config": None, "myst_update_mathjax": False,
            "html_static_path": [str(static)]}},  # copied into the site's _static/
    }
    return json.dumps(config, ensure_ascii=False, indent=1)  # JSON is YAML


def _toc(chapters: dict[str, Path]) -> str:
    toc = {"format": "jb-book", "root": "index",
           "chapters": [{"file": f"chapters/{nb.stem}"} for nb in chapters.values()]}
    return json.dumps(toc, indent=1)


def build_site(out: Path = DEFAULT_OUT, source: Path = CHAPTERS_DIR) -> Site:
    """Build the book into `out` (replacing a site built there before) from a temporary copy of
    the chapters, their images in docs/ and the contents page; nothing is executed."""
    chapters = find_chapters(source)
    if not chapters:
        raise UserError(f"no chapter notebooks (NN_name.ipynb) found in {source}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / "index.html").is_file())):
        raise UserError(f"{out} exists and is not a site built by llmbook site: give another "
                        "--out, or remove it")
    mathjax = _mathjax()
    with tempfile.TemporaryDirectory(prefix="llmbook-site-") as tmp:
        book = Path(tmp) / "book"
        (book / "chapters").mkdir(parents=True)
        for nb in chapters.values():
            shutil.copy2(nb, book / "chapters" / nb.name)
        docs = REPO_ROOT / "docs"
        shutil.copytree(docs, book / "docs", ignore=shutil.ignore_patterns("*.md"))
        # not in the book's own _static/, whose every script jupyter-book puts on every page
        static = Path(tmp) / "static"
        shutil.copytree(mathjax, static / MATHJAX_DIR)
        (book / "index.md").write_text(_contents(chapters), encoding="utf-8")
        (book / "_config.yml").write_text(_config(static), encoding="utf-8")
        (book / "_toc.yml").write_text(_toc(chapters), encoding="utf-8")
        run = subprocess.run(
            [sys.executable, "-c", "from jupyter_book.cli.main import main; main()", "build",
             str(book), "--builder", "html", "--path-output", tmp, "--keep-going"],
            capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=tmp)
        log = run.stdout + run.stderr
        html = Path(tmp) / "_build" / "html"
        if run.returncode != 0 or not (html / "index.html").is_file():
            last = [line for line in log.splitlines() if line.strip()][-1:] or ["no output"]
            raise UserError(f"jupyter-book could not build the site: {last[0].strip()}")
        warnings = [line.strip() for line in log.splitlines() if WARNING.search(line)]
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(html, out)
    pages = {nb.stem: out / "chapters" / f"{nb.stem}.html" for nb in chapters.values()}
    return Site(out, pages, warnings)
