"""Chapter 00 run the way a student runs it: JupyterLab on 127.0.0.1, Debian's chromium driven by
Playwright, Run > Run All Cells. No cell may end in an error, the doctor table must appear, and the
page is saved as build/jupyterlab-00.png. Nothing is downloaded and none of the user's Jupyter
settings are read or written; without /usr/bin/chromium or jupyterlab the test is skipped."""

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llmbook.env import CHAPTERS_DIR, REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NOTEBOOK = "00_setup.ipynb"
SCREENSHOT = REPO_ROOT / "build" / "jupyterlab-00.png"
START_S = 90  # for the server to answer (a busy machine, a cold import of jupyterlab)
OPEN_MS = 120_000  # for the page to load and the kernel to start
RUN_MS = 300_000  # for all cells to run: ~11 s quick in `llmbook book`, but the machine may be busy
# Default settings for this server only (JupyterLab's overrides.json in its app settings dir): no
# news or update pop-up (nor their requests), no autosave writing outputs into the chapter, and
# every cell kept in the page so that each one's output can be read.
OVERRIDES = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false",
                                                    "checkForUpdates": False},
    "@jupyterlab/docmanager-extension:plugin": {"autosave": False},
    "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"},
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM} "
                       "(apt-get install chromium); none is downloaded"),
]
pytest.importorskip("jupyterlab", reason="needs jupyterlab (pip install -e '.[dev]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e "
                               "'.[dev]'); its own browser download is not needed")

# The chapter's state, read from JupyterLab's own model (the page exposes it as window.jupyterapp).
STATE = """(path) => {
  const app = window.jupyterapp;
  const panel = app && [...app.shell.widgets("main")].find(w => w.context?.path === path);
  if (!panel || !panel.context.isReady) return null;
  const cells = panel.content.widgets.filter(c => c.model.type === "code");
  return {
    kernel: panel.sessionContext.session?.kernel?.status ?? "none",
    counts: cells.map(c => c.model.executionCount),
    running: cells.filter(c => c.model.executionState === "running").length,
    outputs: cells.reduce((n, c) => n + c.model.outputs.length, 0),
    errors: cells.flatMap((c, i) => c.model.outputs.toJSON().filter(o => o.output_type === "error")
      .map(o => `code cell ${i + 1}: ${o.ename}: ${o.evalue}`)),
  };
}"""
OPENED = f"path => (({STATE})(path) || {{}}).kernel === 'idle'"
FINISHED = f"""path => {{
  const s = ({STATE})(path);
  return !!s && (s.errors.length > 0 || (s.kernel === "idle" && !s.running
                                         && s.counts.every(n => n !== null)));
}}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(the server's URL, its token, its log file): JupyterLab serving chapters/ in QUICK mode."""
    home = tmp_path_factory.mktemp("jupyterlab")
    (home / "app-settings").mkdir()
    (home / "app-settings" / "overrides.json").write_text(json.dumps(OVERRIDES))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "LLMBOOK_QUICK": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "IPYTHONDIR": str(home / "ipython")}
    env.pop("MPLBACKEND", None)  # the kernel's inline backend draws the chapter's figure
    log = home / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",  # CI runs as root
             "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={CHAPTERS_DIR}",
             f"--LabApp.app_settings_dir={home / 'app-settings'}",
             f"--LabApp.user_settings_dir={home / 'user-settings'}",
             f"--LabApp.workspaces_dir={home / 'workspaces'}",
             f"--FileCheckpoints.checkpoint_dir={home / 'checkpoints'}",  # not in chapters/
             "--LabApp.expose_app_in_browser=True"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=CHAPTERS_DIR)
    url = f"http://127.0.0.1:{port}"
    api = httpx.Client(base_url=url, headers={"Authorization": f"token {token}"}, timeout=30)
    try:
        deadline = time.monotonic() + START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"jupyter lab exited with {server.returncode}:\n{log.read_text()}")
            try:
                if api.get("/api/status").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer in {START_S} s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url, token, log
    finally:
        try:  # stop every kernel, then the server itself
            for kernel in api.get("/api/kernels").json():
                api.delete(f"/api/kernels/{kernel['id']}")
            api.post("/api/shutdown")
            server.wait(timeout=30)
        except (httpx.HTTPError, subprocess.TimeoutExpired):
            server.kill()
            server.wait()
        api.close()


def test_chapter_00_runs_in_jupyterlab(lab):
    url, token, log = lab
    saved = (CHAPTERS_DIR / NOTEBOOK).read_bytes()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}")
            page.wait_for_function(OPENED, arg=NOTEBOOK, timeout=OPEN_MS)
            page.evaluate("window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
            state = page.evaluate(STATE, NOTEBOOK)
            assert state["outputs"] == 0 and set(state["counts"]) == {None}, state

            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile("^Run All Cells$")).click()
            try:
                page.wait_for_function(FINISHED, arg=NOTEBOOK, timeout=RUN_MS)
            except sync_api.TimeoutError:
                pytest.fail(f"chapter 00 did not finish in {RUN_MS // 1000} s in JupyterLab: "
                            f"{page.evaluate(STATE, NOTEBOOK)}\nserver log:\n{log.read_text()}")
            state = page.evaluate(STATE, NOTEBOOK)
            assert not state["errors"], "cells failed: " + "; ".join(state["errors"])
            assert state["counts"] == list(range(1, len(state["counts"]) + 1))  # 1, 2, 3, ...

            shown = "\n".join(page.locator(".jp-OutputArea-output").all_text_contents())
            assert "QUICK=True" in shown  # the server's LLMBOOK_QUICK reached the kernel
            assert re.search(r"^check +status +detail *$", shown, re.MULTILINE), shown
            assert re.search(r"^\d+ checks in [\d.]+ s  \(torch\.compile check skipped in QUICK"
                             r" mode\)$", shown, re.MULTILINE), shown
            table = page.locator(".jp-OutputArea-output", has_text="torch.compile check skipped")
            table.first.scroll_into_view_if_needed()  # the screenshot shows the doctor's table
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))
        finally:
            browser.close()
    assert (CHAPTERS_DIR / NOTEBOOK).read_bytes() == saved  # nothing was saved into the chapter
