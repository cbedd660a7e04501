"""The poetry corpus and the (input, target) windows a language model trains on.

The corpus is data/poetry.jsonl.xz (made by data/build_poetry.py; see data/README.md): about 99k
Tang and Song poems, each labelled with its form and a train/val/test split.
"""

from __future__ import annotations

import json
import lzma
import numbers
from collections.abc import Iterable, Sequence
from functools import lru_cache

import torch
from torch.utils.data import DataLoader, Dataset

from .env import DATA_DIR

CORPUS_FILE = "poetry.jsonl.xz"
FORMS = ("五言绝句", "七言绝句", "五言律诗", "七言律诗", "词", "其他")
SPLITS = ("train", "val", "test")


@lru_cache(maxsize=1)
def _corpus() -> tuple[dict, ...]:
    """Every poem, parsed once per process (about a second); callers get copies."""
    path = DATA_DIR / CORPUS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: restore it with `git checkout -- data/"
                                f"{CORPUS_FILE}` or rebuild it with `python data/build_poetry.py`")
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


def _check_forms(forms: Iterable[str] | str | None) -> set[str] | None:
    if forms is None:
        return None
    forms = {forms} if isinstance(forms, str) else set(forms)
    unknown = sorted(forms - set(FORMS))
    if unknown:
        raise ValueError(f"unknown form(s) {unknown}; choose from {list(FORMS)}")
    return forms


def _select(split: str | None, forms: Iterable[str] | str | None) -> list[dict]:
    """The cached poems of a split and forms (not copies: callers must not modify them)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)} or None for all")
    wanted = _check_forms(forms)
    return [p for p in _corpus()
            if (split is None or p["split"] == split) and (wanted is None or p["form"] in wanted)]


def load_poems(split: str | None = None, forms: Iterable[str] | str | None = None) -> list[dict]:
    """Poems of one split (None: all) and some forms (None: all), in corpus order.

    Each is a fresh dict {id, title, author, dynasty, form, paragraphs, split}, yours to modify.
    """
    return [{**p, "paragraphs": list(p["paragraphs"])} for p in _select(split, forms)]


def poem_header(form: str, title: str) -> str:
    """The start of a poem as the model sees it, e.g. 五言绝句《静夜思》: a generation prompt."""
    _check_forms(form)
    return f"{form}《{title}》"


def format_poem(poem: dict) -> str:
    """A poem as the language models see it: header and author, one line per verse, blank line."""
    return (poem_header(poem["form"], poem["title"]) + poem["author"] + "\n"
            + "\n".join(poem["paragraphs"]) + "\n\n")


def corpus_text(split: str = "train", forms: Iterable[str] | str | None = None,
                limit: int | None = None) -> str:
    """The formatted poems of a split, concatenated; `limit` keeps only the first that many."""
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative number of poems or None, got {limit!r}")
    return "".join(format_poem(p) for p in _select(split, forms)[:limit])


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class SlidingWindowDataset(Dataset):
    """Windows of `block_size` tokens over one long sequence; the target is the input shifted by 1.

    Window i starts at i * stride (stride defaults to block_size: windows touch, never overlap).
    """

    def __init__(self, ids: Sequence[int] | torch.Tensor, block_size: int,
                 stride: int | None = None):
        self.block_size = _positive_int("block_size", block_size)
        self.stride = _positive_int("stride", block_size if stride is None else stride)
        self.ids = torch.as_tensor(ids, dtype=torch.long)
        if self.ids.dim() != 1:
            raise ValueError(f"ids must be one flat sequence of token ids, got shape "
                             f"{tuple(self.ids.shape)}; flatten it or concatenate the pieces")
        if len(self.ids) < block_size + 1:
            raise ValueError(f"the sequence has {len(self.ids)} tokens but block_size={block_size} "
                             f"needs at least {block_size + 1} (inputs plus the shifted target); "
                             "use more text or a smaller block_size")

    def __len__(self) -> int:
        return (len(self.ids) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} is out of range for {len(self)} windows")
        start = (i % len(self)) * self.stride
        chunk = self.ids[start:start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def make_loader(ids: Sequence[int] | torch.Tensor, block_size: int, batch_size: int,
                stride: int | None = None, shuffle: bool = True, seed: int = 0,
                drop_last: bool = True) -> DataLoader:
    """Batches of (x, y) windows, each (batch_size, block_size); one seed, one order of batches."""
    dataset = SlidingWindowDataset(ids, block_size, stride)
    _positive_int("batch_size", batch_size)
    if drop_last and len(dataset) < batch_size:
        raise ValueError(f"the sequence gives {len(dataset)} windows, fewer than one batch of "
                         f"{batch_size}; use a smaller batch_size, a smaller stride or "
                         "drop_last=False")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed))
