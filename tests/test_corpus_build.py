"""data/build_poetry.py rebuilds data/poetry.jsonl.xz byte for byte (downloads 85 MB once)."""

import hashlib
import lzma
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llmbook.env import DATA_DIR, REPO_ROOT, data_manifest

CACHE = Path(os.environ.get("LLMBOOK_CACHE", Path.home() / ".cache" / "llmbook"))
TARBALL = CACHE / "chinese-poetry-2.0.1.tgz"


def registry_reachable() -> bool:
    try:
        socket.create_connection(("registry.npmjs.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_build_reproduces_the_committed_corpus(tmp_path):
    if not TARBALL.exists() and not registry_reachable():
        pytest.skip(f"no cached {TARBALL.name} in {CACHE} and registry.npmjs.org is unreachable")
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
