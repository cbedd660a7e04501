"""data/build_poetry.py rebuilds data/poetry.jsonl.xz byte for byte (downloads 85 MB once)."""

import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmbook.env import DATA_DIR, REPO_ROOT, data_manifest

CACHE = Path(os.environ.get("LLMBOOK_CACHE", Path.home() / ".cache" / "llmbook"))
TARBALL = CACHE / "chinese-poetry-2.0.1.tgz"
PACKAGE = "chinese-poetry@2.0.1"


def why_npm_cannot_fetch() -> str | None:
    """None when npm can reach its configured registry (mirror, proxy), else what is missing."""
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not on PATH (install Node.js/npm, e.g. apt-get install npm)"
    try:
        r = subprocess.run([npm, "view", PACKAGE, "version"], capture_output=True, text=True,
                           timeout=20)
    except subprocess.TimeoutExpired:
        return f"`npm view {PACKAGE} version` did not answer within 20 s (registry unreachable?)"
    except OSError as e:
        return f"npm could not be run ({e})"
    if r.returncode != 0 or r.stdout.strip() != "2.0.1":
        said = [line for line in r.stderr.splitlines() if line.strip()
                and not re.match(r"npm (error|ERR!) +(code|syscall|errno|at) ", line)]
        said = said[0] if said else r.stdout.strip() or "no output"
        return f"npm cannot reach its configured registry (`npm view {PACKAGE} version`: {said})"
    return None


@pytest.mark.slow
def test_build_reproduces_the_committed_corpus(tmp_path):
    if not TARBALL.exists() and (why := why_npm_cannot_fetch()):
        pytest.skip(f"no cached {TARBALL.name} in {CACHE} and {why}")
    r = subprocess.run([sys.executable, str(REPO_ROOT / "data" / "build_poetry.py"),
                        "--cache", str(CACHE), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    built, committed = tmp_path / "poetry.jsonl.xz", DATA_DIR / "poetry.jsonl.xz"
    digest = hashlib.sha256(built.read_bytes()).hexdigest()
    assert digest in r.stdout  # the summary names the file's checksum
    same_text = lzma.decompress(built.read_bytes()) == lzma.decompress(committed.read_bytes())
    assert digest == data_manifest()["poetry.jsonl.xz"], (
        "the rebuilt corpus differs from the committed one "
        + ("only in its compression (another liblzma?)" if same_text else "in its poems")
        + f"\n{r.stdout}")
