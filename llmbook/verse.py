"""The rules of regular verse as functions of a poem's text: form, rhyme (by pinyin), 重韵, the
tonal patterns (平仄), copying.

They measure what a loss cannot: is a sampled poem well formed, does it rhyme more than chance,
does it keep the tones of regulated verse, is it copied verbatim?
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from pypinyin import Style, pinyin

from .data import format_poem, load_poems
from .env import DATA_DIR
from .errors import UserError

CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
# form -> (characters per sentence, sentences); a couplet is two sentences
FORM_SHAPES = {"五言绝句": (5, 4), "七言绝句": (7, 4), "五言律诗": (5, 8), "七言律诗": (7, 8)}

# 中华新韵 groups of pypinyin's strict finals (v is ü; iou, uei, uen are iu, ui, un). Medials are
# stripped, so an/ian/uan/üan rhyme; 齐 also takes the -i of zhi/zi, ü and er (新韵's 支, 儿),
# as the classical 支/齐 rhymes mix them. 13 groups, named by their 新韵 names.
_GROUPS = {"麻": "a ia ua", "波": "o e uo", "皆": "ie ve ê", "开": "ai uai", "微": "ei uei",
           "豪": "ao iao", "尤": "ou iou", "寒": "an ian uan van", "文": "en in uen vn",
           "唐": "ang iang uang", "庚": "eng ing ueng ong iong", "齐": "i v er", "姑": "u"}
FINAL_GROUP = {final: group for group, finals in _GROUPS.items() for final in finals.split()}

TONES_FILE = "tones.json"  # character -> 平, 仄 or 平仄 (either); made by data/build_tones.py
# The four standard sentences of 五言 regulated verse; a 七言 one puts two characters of the
# other tone in front. The odd positions are free (一三五不论): 1 and 3, and 5 in a 七言 sentence.
_FIVE = ("仄仄平平仄", "平平仄仄平", "平平平仄仄", "仄仄仄平平")
_OTHER = {"平": "仄", "仄": "平"}
TONE_PATTERNS = {5: _FIVE, 7: tuple(_OTHER[p[0]] * 2 + p for p in _FIVE)}


def _body(text: str) -> list[str]:
    """The lines after the header line, up to the first blank line (or the end of the text)."""
    lines = text.split("\n")[1:]
    return lines[:lines.index("")] if "" in lines else lines


def is_well_formed(text: str, form: str) -> bool:
    """True if the poem `text` (header line, then verse lines) has the shape `form` demands.

    A 五言/七言 绝句/律诗 has 4/8 sentences of exactly 5/7 characters. As in the corpus, every
    verse line is one couplet: a sentence, "，", a sentence, "。" ("？" or "！" may end either).
    """
    if form not in FORM_SHAPES:
        raise UserError(f"is_well_formed checks {list(FORM_SHAPES)}, not {form!r} (词 and 其他 "
                        "have no fixed shape)")
    n_chars, n_sentences = FORM_SHAPES[form]
    couplet = re.compile(rf"[{CJK}]{{{n_chars}}}[，？！][{CJK}]{{{n_chars}}}[。？！]")
    body = _body(text)
    return len(body) == n_sentences // 2 and all(couplet.fullmatch(line) for line in body)


def sentences(text: str) -> list[str]:
    """The sentences of a poem's body: its lines after the header, up to the first blank line,
    split on ，。？！."""
    return [s for line in _body(text) for s in re.split("[，。？！]", line) if s]


@lru_cache(maxsize=8192)
def rhyme_groups(char: str) -> tuple[str, ...]:
    """The rhyme groups of every reading pypinyin knows for `char`, most common first (a 多音字
    may have several: 还 hái 开, huán 寒); () for a non-Chinese character or one it cannot read."""
    if len(char) != 1:
        raise UserError(f"rhyme_groups takes one character, got {char!r}")
    finals = pinyin(char, style=Style.FINALS, strict=True, heteronym=True,
                    errors=lambda _: [""])[0]
    groups = (FINAL_GROUP.get(final) for final in finals)
    return tuple(dict.fromkeys(g for g in groups if g is not None))


def rhyme_group(char: str) -> str | None:
    """The rhyme group of the most common reading of `char` that has one (流, 楼: 尤), or None."""
    groups = rhyme_groups(char)
    return groups[0] if groups else None


@dataclass(frozen=True)
class Rhyme:
    """The rhyme of one poem: the endings of its even sentences (2nd, 4th, ...) and whether they
    share a rhyme group (`rhymes`) or repeat a character (`repeated`, 重韵)."""

    well_formed: bool
    endings: str
    rhymes: bool
    repeated: bool


def _judge(endings: str) -> Rhyme:
    """Rhymes if some reading of every ending falls in one group: poets chose the reading that
    rhymes (还 huán with 山, 斜 xiá with 家), so a 多音字 rhymes by any of its readings."""
    shared = set.intersection(*(set(rhyme_groups(c)) for c in endings))
    return Rhyme(True, endings, bool(shared), len(set(endings)) < len(endings))


def rhyme_check(text: str, form: str) -> Rhyme:
    """The rhyme of poem `text` of a regular `form` (see `is_well_formed`); a poem of the wrong
    shape gets no credit. The first sentence is ignored: 首句入韵 is optional."""
    if not is_well_formed(text, form):
        return Rhyme(False, "", False, False)
    return _judge("".join(s[-1] for s in sentences(text)[1::2]))


def _rates(judged: list[Rhyme]) -> dict:
    n = len(judged)

    def rate(count: int) -> float:
        return count / n if n else math.nan

    return {"n_well_formed": n,
            "rhyme": rate(sum(r.rhymes for r in judged)),
            "rhyme_no_repeat": rate(sum(r.rhymes and not r.repeated for r in judged)),
            "repeated": rate(sum(r.repeated for r in judged))}


def _well_formed(texts_forms: Iterable[tuple[str, str]]) -> list[Rhyme]:
    return [r for r in (rhyme_check(t, f) for t, f in texts_forms) if r.well_formed]


def rhyme_rates(texts_forms: Iterable[tuple[str, str]]) -> dict:
    """Rhyme over the well-formed ones of (text, form) pairs: {n_well_formed, rhyme,
    rhyme_no_repeat (the headline: rhymes without 重韵), repeated}; rates are nan if none is."""
    return _rates(_well_formed(texts_forms))


def chance_rhyme(texts_forms: Iterable[tuple[str, str]], seed: int = 0) -> dict:
    """`rhyme_rates` after a seeded shuffle of all the well-formed poems' even-sentence endings
    among their slots: the rates the same characters give by chance."""
    judged = _well_formed(texts_forms)
    pool = list("".join(r.endings for r in judged))
    random.Random(seed).shuffle(pool)
    shuffled, start = [], 0
    for r in judged:
        shuffled.append(_judge("".join(pool[start:start + len(r.endings)])))
        start += len(r.endings)
    return _rates(shuffled)


@lru_cache(maxsize=1)
def _tone_table() -> dict[str, str]:
    path = DATA_DIR / TONES_FILE
    if not path.exists():
        raise UserError(f"{path} is missing: restore it with `git checkout -- data/{TONES_FILE}` "
                        "or rebuild it with `python data/build_tones.py`")
    return json.loads(path.read_text(encoding="utf-8"))


def tone(char: str) -> str:
    """The classical tone of `char` as the corpus's package marks it (入声 is 仄): 平, 仄, 平仄
    for a character read both ways (看, 思), or "" for one the table lacks; the tonal check
    counts the last two as either tone."""
    if not isinstance(char, str) or len(char) != 1:
        raise UserError(f"tone takes one character, got {char!r}")
    return _tone_table().get(char, "")


def sentence_patterns(sentence: str) -> tuple[str, ...]:
    """The standard tonal patterns (`TONE_PATTERNS`) a 5- or 7-character sentence keeps, the
    odd positions left free (一三五不论); () if it keeps none."""
    if not isinstance(sentence, str) or len(sentence) not in TONE_PATTERNS:
        raise UserError(f"tonal patterns are for sentences of 5 or 7 characters, not "
                        f"{sentence!r}")
    tones = [tone(c) or "平仄" for c in sentence]
    return tuple(p for p in TONE_PATTERNS[len(sentence)]
                 if all(p[i] in tones[i] for i in range(1, len(sentence), 2)) and
                 p[-1] in tones[-1])


@dataclass(frozen=True)
class Tones:
    """The tones of one poem: whether each sentence keeps a standard pattern (`matches`), and
    whether all do (`regulated`)."""

    well_formed: bool
    matches: tuple[bool, ...]
    regulated: bool


def tone_check(text: str, form: str) -> Tones:
    """The tonal patterns of poem `text` of a regular `form` (see `is_well_formed`); a poem of the
    wrong shape keeps none. Each sentence is judged alone (粘对, how they chain, is not checked)."""
    if not is_well_formed(text, form):
        return Tones(False, (), False)
    matches = tuple(bool(sentence_patterns(s)) for s in sentences(text))
    return Tones(True, matches, all(matches))


def tone_rates(texts_forms: Iterable[tuple[str, str]]) -> dict:
    """Tones over the well-formed ones of (text, form) pairs: {n_well_formed, tonal (the share of
    poems whose every sentence keeps a pattern), tonal_sentences (the share of their sentences
    that do)}; rates are nan if none is well formed."""
    judged = [t for t in (tone_check(text, form) for text, form in texts_forms) if t.well_formed]
    n_sentences = sum(len(t.matches) for t in judged)
    return {"n_well_formed": len(judged),
            "tonal": sum(t.regulated for t in judged) / len(judged) if judged else math.nan,
            "tonal_sentences": (sum(sum(t.matches) for t in judged) / n_sentences
                                if judged else math.nan)}


@lru_cache(maxsize=8)
def _train_sentences(forms: frozenset[str] | None) -> frozenset[str]:
    return frozenset(s for p in load_poems("train", forms) for s in sentences(format_poem(p)))


def train_sentences(forms: Iterable[str] | str | None = None) -> frozenset[str]:
    """Every sentence of the train split's poems of `forms` (None: all), computed once per forms."""
    if forms is not None:
        forms = frozenset([forms] if isinstance(forms, str) else forms)
    return _train_sentences(forms)


def copy_rate(texts: Iterable[str], known: frozenset[str]) -> float:
    """The fraction of the sentences of `texts` (see `sentences`) found verbatim in `known`.

    Raises ValueError if the texts have no sentences: there is nothing to measure.
    """
    found = [s in known for text in texts for s in sentences(text)]
    if not found:
        raise UserError("copy_rate needs texts with at least one sentence (a header line, then "
                        "verse lines); these have none")
    return sum(found) / len(found)
