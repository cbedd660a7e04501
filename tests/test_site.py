"""`llmbook site`: the book built once for the session by jupyter-book (offline, no execution) into
a temporary folder. It builds with no warning, has a page per chapter with its Chinese title, links
that all resolve, and no page that asks for anything outside the site; in Debian's chromium a
chapter page served from 127.0.0.1 makes no request elsewhere and MathJax typesets its formulas."""

import http.server
import re
import threading
import time
from functools import partial
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from llmbook.book import find_chapters
from llmbook.cli import main
from llmbook.site import build_site, chapter_title

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHAPTERS = find_chapters()
MATHS_CHAPTER = "05"  # the mathematics of attention: inline and display formulas
# What a page fetches by itself (a plain <a href> is only followed if the reader clicks it).
FETCHED = {("script", "src"), ("link", "href"), ("img", "src"), ("iframe", "src"),
           ("source", "src"), ("video", "src"), ("audio", "src"), ("embed", "src"),
           ("object", "data"), ("image", "href"), ("use", "href")}
CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]+)|@import\s+['"]([^'"]+)""")


class _Refs(HTMLParser):
    """Every (tag, attribute, URL) of a page, and the CSS of its <style> elements."""

    def __init__(self):
        super().__init__()
        self.refs, self.css, self._in_style = [], [], False

    def handle_starttag(self, tag, attrs):
        self._in_style = tag == "style"
        for name, value in attrs:
            if value and name in ("href", "src", "data", "xlink:href"):
                self.refs.append((tag, name.removeprefix("xlink:"), value))
            elif value and name == "style":
                self.css.append(value)

    def handle_data(self, data):
        if self._in_style:
            self.css.append(data)


def _refs(page: Path) -> _Refs:
    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _pages(site) -> list[Path]:
    """The site's HTML pages (its _static/ holds the theme's templates, which are no pages)."""
    return sorted(p for p in site.out.rglob("*.html") if "_static" not in p.relative_to(
        site.out).parts)


def _external(url: str) -> bool:
    return bool(urlsplit(url).scheme in ("http", "https", "ftp", "ws", "wss") or
                url.startswith("//"))


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    start = time.perf_counter()
    built = build_site(tmp_path_factory.mktemp("site") / "site")
    seconds = time.perf_counter() - start
    print(f"\nllmbook site built {len(built.pages)} chapters in {seconds:.0f} s")
    return built


def test_the_site_builds_without_a_warning(site):
    assert site.warnings == []  # a broken cross-reference or a missing file is a warning


def test_every_chapter_has_a_page_with_its_title_and_the_contents_page_lists_them(site):
    assert set(site.pages) == {nb.stem for nb in CHAPTERS.values()}
    contents = (site.out / "index.html").read_text(encoding="utf-8")
    linked = {unquote(url) for _, _, url in _refs(site.out / "index.html").refs}
    for number, nb in CHAPTERS.items():
        page = site.pages[nb.stem].read_text(encoding="utf-8")
        title = chapter_title(nb)
        assert re.search(r"[\u4e00-\u9fff]", title), title
        assert f"<title>{title}" in page  # the browser tab shows the Chinese title
        assert title in contents and f"chapters/{nb.stem}.html" in linked, number


def test_every_link_and_asset_inside_the_site_exists(site):
    broken = []
    for page in _pages(site):
        for tag, _, url in _refs(page).refs:
            parts = urlsplit(url)
            if parts.scheme or url.startswith("//") or not parts.path:
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(site.out)}: <{tag}> {url}")
    assert not broken, "\n".join(broken)
    chapter = site.pages[CHAPTERS["01"].stem]  # a chapter links to the ones before and after
    hrefs = {unquote(u) for t, _, u in _refs(chapter).refs if t == "a"}
    assert {f"{CHAPTERS['00'].stem}.html", f"{CHAPTERS['02'].stem}.html"} <= hrefs


def test_no_page_or_stylesheet_fetches_anything_from_outside_the_site(site):
    outside = []
    for page in _pages(site):
        refs = _refs(page)
        outside += [f"{page.relative_to(site.out)}: <{t} {a}={u}>" for t, a, u in refs.refs
                    if (t, a) in FETCHED and _external(u)]
        outside += [f"{page.relative_to(site.out)}: style url {u}" for css in refs.css
                    for m in CSS_URL.finditer(css) for u in m.groups() if u and _external(u)]
    for sheet in sorted(site.out.rglob("*.css")):
        outside += [f"{sheet.relative_to(site.out)}: {u}" for m in
                    CSS_URL.finditer(sheet.read_text(encoding="utf-8", errors="replace"))
                    for u in m.groups() if u and _external(u)]
    assert not outside, "\n".join(outside)


def test_a_site_folder_that_is_something_else_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["site", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmbook site: ") and "not a site" in err and err.count("\n") == 1
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM}")
def test_a_chapter_in_the_browser_fetches_only_from_the_site_and_typesets_its_maths(site):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright")
    handler = partial(_QuietHandler, directory=str(site.out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.server_address[1]}/"
    outside, failed = [], []

    def guard(route):
        if route.request.url.startswith(origin):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
            try:
                page = browser.new_page()
                page.route("**/*", guard)
                page.on("response", lambda r: r.status >= 400 and failed.append(r.url))
                page.on("requestfailed",  # those outside are aborted by guard, and listed
                        lambda r: r.url.startswith(origin) and failed.append(r.url))
                stem = CHAPTERS[MATHS_CHAPTER].stem
                page.goto(f"{origin}chapters/{stem}.html", wait_until="load")
                page.wait_for_function("() => window.MathJax && MathJax.Hub && MathJax.isReady",
                                       timeout=60_000)
                page.evaluate("() => new Promise(done => MathJax.Hub.Queue(done))")
                typeset = page.evaluate("""() => ({
                    sources: document.querySelectorAll('script[type^="math/tex"]').length,
                    rendered: document.querySelectorAll('.MathJax, .MathJax_Display').length,
                    errors: document.querySelectorAll('.MathJax .merror').length,
                    raw: [...document.querySelectorAll('.math')]
                         .filter(e => /\\\\\\(|\\\\\\[/.test(e.textContent)).length,
                })""")
            finally:
                browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert outside == [], f"requests that left the site: {outside}"
    assert failed == [], f"requests the site could not answer: {failed}"
    assert typeset["sources"] >= 5 and typeset["rendered"] >= typeset["sources"], typeset
    assert typeset["errors"] == 0 and typeset["raw"] == 0, typeset


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no line per request in the test output
        pass
