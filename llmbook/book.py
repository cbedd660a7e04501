"""Execute the chapters with papermill: the "run the whole book" job behind `llmbook book`."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .env import CHAPTERS_DIR
from .errors import UserError

if TYPE_CHECKING:
    from traitlets.config import Config


class BookError(UserError):
    """A request `llmbook book` cannot carry out (unknown chapter, missing notebook)."""


@dataclass
class ChapterResult:
    chapter: str
    status: str  # "ok" or "failed"
    seconds: float
    error: str = ""


def find_chapters(source: Path = CHAPTERS_DIR) -> dict[str, Path]:
    """Chapter number ('00') -> notebook, for every `NN_name.ipynb` in `source`."""
    found = {}
    for nb in sorted(Path(source).glob("[0-9][0-9]_*.ipynb")):
        found[nb.name[:2]] = nb
    return found


def select(chapters: list[str] | None, source: Path = CHAPTERS_DIR) -> list[tuple[str, Path]]:
    """Resolve chapter numbers (or notebook names) to notebooks; unknown ones are a BookError."""
    available = find_chapters(source)
    if not available:
        raise BookError(f"no chapter notebooks (NN_name.ipynb) found in {source}")
    if not chapters:
        return list(available.items())
    picked = []
    for ch in chapters:
        key = ch[:2].zfill(2) if ch[:2].isdigit() else ch
        if key not in available:
            raise BookError(f"unknown chapter {ch!r}: the book has {', '.join(available)}")
        picked.append((key, available[key]))
    return picked


def _failing_cell(exc: Exception) -> str:
    """One line naming the cell that raised, from papermill's PapermillExecutionError."""
    index = getattr(exc, "exec_count", None) or getattr(exc, "cell_index", None)
    ename, evalue = getattr(exc, "ename", type(exc).__name__), getattr(exc, "evalue", str(exc))
    where = f"cell In [{index}]" if index is not None else "a cell"
    return f"{where} raised {ename}: {str(evalue).splitlines()[0] if evalue else ''}".strip()


def kernel_config() -> Config:
    """Kernel-manager settings that keep the kernel's sockets private, so ipykernel has no cause
    to warn "Kernel is running over TCP without encryption" once per chapter: CurveZMQ keys that
    jupyter_client provisions (>= 8.10, with a libzmq built with curve), else Unix-socket IPC."""
    import zmq
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config

    if KernelManager.class_traits().get("transport_encryption") and zmq.has("curve"):
        return Config({"KernelManager": {"transport_encryption": "auto"}})
    if os.name == "posix":
        return Config({"KernelManager": {"transport": "ipc"}})
    return Config()


def run_chapter(nb: Path, out_dir: Path, quick: bool, kernel: str | None = None) -> ChapterResult:
    """Execute one notebook into `out_dir`; never raises for a failing cell."""
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        pm.execute_notebook(
            str(nb),
            str(out_dir / nb.name),
            parameters={"QUICK": quick},
            cwd=str(nb.parent),
            kernel_name=kernel,
            progress_bar=False,
            config=kernel_config(),
        )
    except Exception as exc:  # papermill wraps the cell's error; keep the run going
        return ChapterResult(nb.stem, "failed", time.perf_counter() - start, _failing_cell(exc))
    return ChapterResult(nb.stem, "ok", time.perf_counter() - start)


def run_book(
    chapters: list[str] | None = None,
    quick: bool = False,
    out_dir: Path = Path("build"),
    source: Path = CHAPTERS_DIR,
    kernel: str | None = None,
) -> list[ChapterResult]:
    """Execute the selected chapters in order; QUICK also reaches the kernels via LLMBOOK_QUICK."""
    picked = select(chapters, source)
    os.environ["LLMBOOK_QUICK"] = "1" if quick else "0"
    results = []
    for _, nb in picked:
        print(f"running {nb.name} ({'quick' if quick else 'full'}) ...", flush=True)
        results.append(run_chapter(nb, Path(out_dir), quick, kernel))
    return results
