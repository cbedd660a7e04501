"""Build data/tones.json, simplified character -> its classical tone (平, 仄 or 平仄: either), from
the 平/仄 markings (`strains`) that npm's chinese-poetry 2.0.1 ships for its Tang and Song shi.

    python data/build_tones.py [--cache DIR] [--out DIR]

Each `dist/strains/json/poet.{tang,song}.N.json` marks every character of the poems with the same
id in `dist/quantangshi/` (入声 counted as 仄; ○ or ？ where its marker did not know the character).
A paragraph counts only when its marks line up with its characters (same length, punctuation in
the same places); its characters are converted to simplified ones with OpenCC t2s in context, as
data/build_poetry.py converts the corpus, and every 平/仄 mark is counted for its character.

A character marked both ways keeps a reading only when at least MIN_SHARE (2%) of its marks give
it. Counting any single mark would make 801 characters "either", among them the commonest, misread
a handful of times (一: 11 平 of 120,475 marks; 不: 4 of 177,336), and shuffled characters of the
corpus would then keep a 七言 pattern in 44-47% of their sentences, not 32-34%. Of the characters
with 500+ marks, 106 have a second reading under 0.5% (stray), 10 between 0.5% and 2% (mostly
stray too: 尽 is 仄 both ways yet has 0.6% 平) and 151 above 2%, where the real second readings
lie (闲 4%, 中 6%, 间 7%, 看 36%). The tarball is fetched and checked by build_poetry.py; needs
`pip install opencc` (build only). The output is byte-identical on every run.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

from build_poetry import CJK, OPENCC_VERSION, PACKAGE, fetch_tarball

from llmbook.data import load_poems

OUT_NAME = "tones.json"
MIN_SHARE = 0.02  # a reading is kept when it has at least this share of a character's marks
STRAINS = re.compile(r"package/dist/strains/json/(poet\.(?:tang|song)\.\d+\.json)")
POEMS = "package/dist/quantangshi/"
IS_CJK = re.compile(rf"[{CJK}]")
UNREAD = "○？"  # the marker's "unknown"; ？ may also be a real question mark
REGULAR = ("五言绝句", "七言绝句", "五言律诗", "七言律诗")


def read_pairs(tarball: bytes) -> list[tuple[list[str], list[str]]]:
    """(paragraphs, strains) of every marked poem, in file-name order, matched by poem id."""
    strains, poems = {}, {}
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        for member in tar:
            if m := STRAINS.fullmatch(member.name):
                strains[m[1]] = json.loads(tar.extractfile(member).read())
            elif member.name.startswith(POEMS) and member.name.endswith(".json"):
                poems[member.name[len(POEMS):]] = json.loads(tar.extractfile(member).read())
    pairs = []
    for name in sorted(strains):
        by_id = {p["id"]: p["paragraphs"] for p in poems.get(name, [])}
        pairs += [(by_id[s["id"]], s["strains"]) for s in strains[name] if s["id"] in by_id]
    return pairs


def lines_up(text: str, marks: str) -> bool:
    """True when a paragraph's marks fit its characters one to one (punctuation on punctuation)."""
    return len(text) == len(marks) and all(bool(IS_CJK.match(t)) == (m in "平仄○" or m == "？" != t)
                                           for t, m in zip(text, marks, strict=True))


def count_marks(pairs: list[tuple[list[str], list[str]]]) -> tuple[dict[str, Counter], Counter]:
    """Simplified character -> Counter of its 平/仄 marks; and how many paragraphs were used."""
    try:
        import opencc
    except ImportError:
        raise SystemExit("the build needs OpenCC: pip install opencc") from None
    if opencc.__version__ != OPENCC_VERSION:
        print(f"warning: OpenCC {opencc.__version__}, the committed file used {OPENCC_VERSION}; "
              "the output may differ")
    t2s = opencc.OpenCC("t2s")
    marks, used = defaultdict(Counter), Counter()
    for paragraphs, strains in pairs:
        converted = t2s.convert("\n".join(paragraphs)).split("\n")
        if len(converted) != len(strains):
            used["poems whose paragraphs and strains differ in number"] += 1
            continue
        for text, tones in zip(converted, strains, strict=True):
            if not lines_up(text, tones):
                used["paragraphs whose marks do not line up"] += 1
                continue
            used["paragraphs used"] += 1
            for char, mark in zip(text, tones, strict=True):
                if mark in "平仄":
                    marks[char][mark] += 1
    return marks, used


def readings(counts: Counter, min_share: float) -> str:
    """平, 仄 or 平仄: the readings with at least `min_share` of a character's marks."""
    total = sum(counts.values())
    return "".join(t for t in "平仄" if counts[t] and counts[t] >= min_share * total)


def write(table: dict[str, str], path: Path) -> None:
    """One `"char": "tone"` per line, sorted, so the bytes depend only on the table."""
    text = json.dumps(table, ensure_ascii=False, sort_keys=True, indent=0) + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def regular_verse(split: str | None = None) -> Counter:
    """Character occurrences in the corpus's poems of the four regular forms."""
    return Counter(c for p in load_poems(split, REGULAR) for line in p["paragraphs"]
                   for c in line if IS_CJK.match(c))


def summary(marks: dict[str, Counter], table: dict[str, str], used: Counter,
            path: Path) -> str:
    """Coverage of the corpus's regular verse, and how many characters count as either."""
    n_marks = sum(sum(c.values()) for c in marks.values())
    rows = [", ".join(f"{k} {v:,}" for k, v in sorted(used.items())),
            f"{n_marks:,} 平/仄 marks on {len(marks):,} characters"]
    either = {"any mark": {c for c, k in marks.items() if len(k) == 2},
              f"at least {MIN_SHARE:.0%}": {c for c, t in table.items() if t == "平仄"}}
    verse = regular_verse()
    for rule, chars in either.items():
        rows.append(f"marked both ways ({rule}): {len(chars):,} characters, "
                    f"{sum(sum(marks[c].values()) for c in chars) / n_marks:.1%} of the marks, "
                    f"{sum(verse[c] for c in chars) / sum(verse.values()):.1%} of the corpus's "
                    "regular verse")
    for split in (None, "test"):
        verse = regular_verse(split)
        total = sum(verse.values())
        known = sum(n for c, n in verse.items() if c in table)
        rows.append(f"regular verse of the {split or 'whole'} corpus: {total:,} characters "
                    f"({len(verse):,} distinct); the table knows {known / total:.3%} of them "
                    f"(all but {total - known:,}) and {sum(c in table for c in verse):,} of the "
                    "distinct")
    rows.append(f"{path}: {len(table):,} characters, {path.stat().st_size:,} bytes, sha256 "
                f"{hashlib.sha256(path.read_bytes()).hexdigest()}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "LLMBOOK_CACHE", Path.home() / ".cache" / "llmbook")), help="where the tarball is kept")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help=f"folder to write {OUT_NAME} into (default: data/)")
    args = parser.parse_args()
    print(f"reading the strains of {PACKAGE}")
    marks, used = count_marks(read_pairs(fetch_tarball(args.cache)))
    table = {c: readings(k, MIN_SHARE) for c, k in marks.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    write(table, args.out / OUT_NAME)
    print(summary(marks, table, used, args.out / OUT_NAME))


if __name__ == "__main__":
    main()
