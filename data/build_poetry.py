"""Build the course's poetry corpus, data/poetry.jsonl.xz, from npm's chinese-poetry 2.0.1.

    python data/build_poetry.py [--cache DIR] [--out DIR]

Fetches the package tarball once with `npm pack` (so npm's own registry, mirror and proxy settings
apply; needs Node.js/npm), caches it in ~/.cache/llmbook and checks it against its sha256 and sha512
integrity, reads the Tang and Song shi (quantangshi/poet.*.json) and the Song ci
(songci/ci.song.*.json), converts them to simplified characters with OpenCC ("t2s"), cleans them,
labels each poem with its form and a train/val/test split, and writes one JSON object per line,
xz-compressed. The output is byte-identical on every run. Needs `pip install opencc` (build only).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

PACKAGE = "chinese-poetry@2.0.1"
TARBALL = "chinese-poetry-2.0.1.tgz"
# sha256sum of the file that `npm pack chinese-poetry@2.0.1 --pack-destination DIR` wrote into DIR
TARBALL_SHA256 = "25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86"
INTEGRITY = ("sha512-KtYARvV7CWNtax0na9+Jn6PlhGgSoid7PWyDzXI4KsCEm2odZcqEQyval5koaLygZnM/"
             "EQ3lfJ//25K8p3uHNg==")  # `npm view chinese-poetry@2.0.1 dist.integrity`
NPM_TIMEOUT_S = 900  # for `npm pack` (85 MB); npm itself gives up sooner when nothing answers
OPENCC_VERSION = "1.4.2"  # the version the committed file was built with
OUT_NAME = "poetry.jsonl.xz"
SEED = 0
SPLITS = (("train", 96), ("val", 2), ("test", 2))  # percent of poems
SONG_SHI_PERCENT = 10  # keep a fixed tenth of the 254k Song shi so the file stays under 10 MB
FORMS = ("五言绝句", "七言绝句", "五言律诗", "七言律诗", "词", "其他")

# (member name pattern, id prefix, dynasty, is ci)
SOURCES = (
    (re.compile(r"package/dist/quantangshi/poet\.tang\.(\d+)\.json"), "tang", "唐", False),
    (re.compile(r"package/dist/quantangshi/poet\.song\.(\d+)\.json"), "song", "宋", False),
    (re.compile(r"package/dist/songci/ci\.song\.(\w+)\.json"), "ci", "宋", True),
)

CJK = r"\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U0003134f"
BODY_OK = re.compile(rf"[{CJK}，。？！、；：]+")
META_OK = re.compile(rf"[{CJK}〇 ·，。、：？！；〈〉]+")
HAS_CJK = re.compile(rf"[{CJK}]")
# Editors' notes in the sources: （一作…） variants, 〖…〗 commentary, 〔…〕 musical modes.
NOTES = [re.compile(p) for p in
         (r"（[^（）\n]*）", r"\([^()\n]*\)", r"〖[^〖〗\n]*〗", r"〔[^〔〕\n]*〕")]
FOOTNOTE = re.compile(r"\[[一二三四五六七八九十○〇0-9]+\]")  # "[三]…" starts a note, not a verse
SUPPLIED = re.compile(r"\[([^\[\]\n]*)\]")  # [字]: a character the editors restored; keep it
HALF_WIDTH = str.maketrans({",": "，", ".": "。", "．": "。", "?": "？", "!": "！", ";": "；",
                            ":": "：", "・": "·", "○": "〇"})
SENTENCE_END = re.compile(r"[，。？！；]")


def check_tarball(data: bytes) -> str | None:
    """None when the bytes are the package tarball, else what is wrong with them."""
    sha256 = hashlib.sha256(data).hexdigest()
    if sha256 != TARBALL_SHA256:
        return f"sha256 {sha256}, expected {TARBALL_SHA256}"
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if integrity != INTEGRITY:
        return f"integrity {integrity}, expected {INTEGRITY}"
    return None


def npm_error(stderr: str) -> str:
    """npm's error report on one line: its error code and its first message line."""
    lines = [re.sub(r"^npm (error|ERR!)\s*", "", line) for line in stderr.splitlines()
             if re.match(r"npm (error|ERR!)", line)]
    code = next((line.split()[1] for line in lines if re.fullmatch(r"code \S+", line)), None)
    noise = re.compile(r"(code|syscall|errno) |at |[{}]|[a-z]+: |A complete log")
    message = next((line for line in lines if line and not noise.match(line)), None)
    text = ": ".join(filter(None, (code, message))) or " ".join(stderr.split()) or "no message"
    return text if len(text) <= 300 else text[:297] + "..."


def npm_pack(dest: Path, cache: Path) -> Path:
    """Download the package tarball into dest with `npm pack`; exit with one line if that fails."""
    npm = shutil.which("npm")
    by_hand = f"or put {TARBALL} (sha256 {TARBALL_SHA256}) into {cache} by hand"
    if npm is None:
        raise SystemExit(f"npm is not installed (not on PATH): install Node.js/npm "
                         f"(e.g. `apt-get install npm`) and rerun, {by_hand}")
    try:
        r = subprocess.run([npm, "pack", PACKAGE, "--pack-destination", str(dest),
                            "--loglevel=error", "--ignore-scripts"], cwd=dest,
                           capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"`npm pack {PACKAGE}` did not finish in {NPM_TIMEOUT_S} s; check "
                         f"npm's registry and proxy settings (`npm config get registry`), "
                         f"{by_hand}") from None
    except OSError as e:
        raise SystemExit(f"could not run npm ({e}); reinstall Node.js/npm, {by_hand}") from None
    if r.returncode != 0:
        raise SystemExit(f"`npm pack {PACKAGE}` failed ({npm_error(r.stderr)}); check that npm "
                         f"can reach its registry (`npm ping`, `npm config get registry`, proxy "
                         f"settings), {by_hand}")
    path = dest / TARBALL
    if not path.exists():
        raise SystemExit(f"`npm pack {PACKAGE}` left no {TARBALL} in {dest}; {by_hand}")
    return path


def fetch_tarball(cache: Path) -> bytes:
    """The package tarball, from the cache or `npm pack`, checked against its sha256 and sha512."""
    path = cache / TARBALL
    if path.exists():
        data = path.read_bytes()
        if problem := check_tarball(data):
            raise SystemExit(f"the cached {path} is not the {PACKAGE} tarball ({problem}); "
                             "delete it and rerun")
        return data
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        got = npm_pack(Path(tmp), cache)
        data = got.read_bytes()
        if problem := check_tarball(data):  # checked before it goes into the cache
            raise SystemExit(f"`npm pack {PACKAGE}` gave a different tarball ({problem}); "
                             "is npm's registry or mirror serving a modified package?")
        os.replace(got, path)
    return data


def read_sources(tarball: bytes) -> list[dict]:
    """Raw poems in a fixed order (source, then file number, then position), each with an id."""
    found = []
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        for member in tar:
            for rank, (pattern, prefix, dynasty, is_ci) in enumerate(SOURCES):
                if m := pattern.fullmatch(member.name):
                    key = (rank, int(m[1]) if m[1].isdigit() else 10**9, m[1])
                    items = json.loads(tar.extractfile(member).read())
                    found.append((key, prefix, m[1], dynasty, is_ci, items))
    poems = []
    for _, prefix, stem, dynasty, is_ci, items in sorted(found, key=lambda f: f[0]):
        for i, p in enumerate(items):
            poems.append({"id": f"{prefix}.{stem}.{i}", "dynasty": dynasty, "is_ci": is_ci,
                          "title": p["rhythmic"] if is_ci else p["title"],
                          "author": p["author"], "paragraphs": p["paragraphs"]})
    return poems


def strip_notes(text: str) -> str:
    """Remove editors' bracketed notes (innermost first, so nested notes go too)."""
    while True:
        new = text
        for pattern in NOTES:
            new = pattern.sub("", new)
        if new == text:
            return text
        text = new


def clean_meta(text: str, author: bool = False) -> str | None:
    """A clean title or author name, or None when it is garbled."""
    text = strip_notes(SUPPLIED.sub(r"\1", text)).translate(HALF_WIDTH)
    text = " ".join(text.replace("《", "〈").replace("》", "〉").split())
    if author:
        text = re.sub(r"[0-9]", "", text)  # the ci sources number namesakes: 王炎1, 王炎2
    return text if META_OK.fullmatch(text) and HAS_CJK.search(text) else None


def clean_body(paragraphs: list[str]) -> list[str] | None:
    """Clean verse lines, or None when the poem is empty, garbled or carries editors' notes."""
    lines = []
    for line in paragraphs:
        if FOOTNOTE.search(line):
            return None
        line = strip_notes(SUPPLIED.sub(r"\1", line)).translate(HALF_WIDTH)
        line = "".join(line.split())
        if not line.strip("，。？！、；："):
            continue  # nothing left once a note like "（见《唐语林》卷七）。" is gone
        if not BODY_OK.fullmatch(line) or not HAS_CJK.search(line):
            return None  # □ lacunae, {…} composed glyphs, quotes of a commentary, stray ASCII
        lines.append(line)
    if not lines or lines[-1][-1] not in "。？！":
        return None  # empty, or cut off mid-sentence
    return lines


def classify(paragraphs: list[str], is_ci: bool) -> str:
    """词 for ci; for shi, 五/七言绝句 (律诗) when all 4 (8) sentences have 5 (7) characters."""
    if is_ci:
        return "词"
    sentences = [s for s in SENTENCE_END.split("".join(paragraphs)) if s]
    lengths = {len(s) for s in sentences}
    if lengths in ({5}, {7}) and len(sentences) in (4, 8):
        return ("五言" if lengths == {5} else "七言") + ("绝句" if len(sentences) == 4 else "律诗")
    return "其他"


def bucket(salt: str, poem_id: str) -> int:
    """A stable number in 0..99 for a poem: the same on every machine and Python version."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{poem_id}".encode()).digest()[:8], "big") % 100


def split_of(poem_id: str) -> str:
    """train, val or test, 96/2/2 by a seeded hash of the poem's id."""
    b = bucket(f"split{SEED}", poem_id)
    for name, percent in SPLITS:
        if b < percent:
            return name
        b -= percent
    raise AssertionError("SPLITS must add up to 100")


def t2s_converter():
    """OpenCC's traditional-to-simplified converter (build time only), warning when its version
    is not the one the committed files were built with."""
    try:
        import opencc
    except ImportError:
        raise SystemExit("the build needs OpenCC: pip install opencc") from None
    if opencc.__version__ != OPENCC_VERSION:
        print(f"warning: OpenCC {opencc.__version__}, the committed file used {OPENCC_VERSION}; "
              "the output may differ")
    return opencc.OpenCC("t2s")


def build(raw: list[dict]) -> tuple[list[dict], Counter]:
    """Convert, clean, deduplicate and label the raw poems; also count why poems were dropped."""
    t2s = t2s_converter()
    dropped, seen, poems = Counter(), set(), []
    for p in raw:
        if p["id"].startswith("song.") and bucket("song-subset", p["id"]) >= SONG_SHI_PERCENT:
            continue
        fields = [p["title"], p["author"], *p["paragraphs"]]
        converted = t2s.convert("\n".join(fields)).split("\n")
        if len(converted) != len(fields):  # a line break inside a field
            dropped["garbled, annotated or empty"] += 1
            continue
        title, author, *paragraphs = converted
        if title.split(" ")[0] == "存目":
            dropped["title-only placeholder (存目)"] += 1
            continue
        title, author = clean_meta(title), clean_meta(author, author=True)
        paragraphs = clean_body(paragraphs)
        if title is None or author is None or paragraphs is None:
            dropped["garbled, annotated or empty"] += 1
            continue
        body = "".join(paragraphs)
        if body in seen:
            dropped["duplicate body"] += 1
            continue
        seen.add(body)
        poems.append({"id": p["id"], "title": title, "author": author, "dynasty": p["dynasty"],
                      "form": classify(paragraphs, p["is_ci"]), "paragraphs": paragraphs,
                      "split": split_of(p["id"])})
    return poems, dropped


def write(poems: list[dict], path: Path) -> None:
    """JSON lines, xz-compressed with fixed settings, so the bytes depend only on the poems."""
    text = "".join(json.dumps(p, ensure_ascii=False, separators=(",", ":")) + "\n" for p in poems)
    data = lzma.compress(text.encode(), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def summary(poems: list[dict], dropped: Counter, raw: int, path: Path) -> str:
    """Poems and characters (of verse, punctuation included) per dynasty, form and split."""
    chars = Counter()
    count = Counter()
    for p in poems:
        n = sum(len(line) for line in p["paragraphs"])
        for key in (p["dynasty"], p["form"], p["split"], p["dynasty"] + p["form"], "all"):
            count[key] += 1
            chars[key] += n
    rows = [f"read {raw:,} poems; kept {count['all']:,}; dropped: "
            + ", ".join(f"{k} {v:,}" for k, v in sorted(dropped.items()))
            + f"; {100 - SONG_SHI_PERCENT}% of Song shi left out by design",
            f"{'':10}{'poems':>9}{'chars':>12}"]
    keys = ["唐", "宋", *FORMS, *(d + f for d in "唐宋" for f in FORMS), "train", "val", "test",
            "all"]
    width = {k: sum(1 + (ord(c) > 0x2E80) for c in k) for k in keys}  # CJK takes two columns
    rows += [k + " " * (10 - width[k]) + f"{count[k]:>9,}{chars[k]:>12,}" for k in keys if count[k]]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    rows.append(f"{path}: {path.stat().st_size:,} bytes, sha256 {digest}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "LLMBOOK_CACHE", Path.home() / ".cache" / "llmbook")), help="where the tarball is kept")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder to write poetry.jsonl.xz into (default: data/)")
    args = parser.parse_args()
    start = time.perf_counter()
    raw = read_sources(fetch_tarball(args.cache))
    poems, dropped = build(raw)
    args.out.mkdir(parents=True, exist_ok=True)
    write(poems, args.out / OUT_NAME)
    print(summary(poems, dropped, len(raw), args.out / OUT_NAME))
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
