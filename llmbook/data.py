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
from .errors import UserError

CORPUS_FILE = "poetry.jsonl.xz"
FORMS = ("五言绝句", "七言绝句", "五言律诗", "七言律诗", "词", "其他")
SPLITS = ("train", "val", "test")


@lru_cache(maxsize=1)
def _corpus() -> tuple[dict, ...]:
    """Every poem, parsed once per process (about a second); callers get copies."""
    path = DATA_DIR / CORPUS_FILE
    if not path.exists():
        raise UserError(f"{path} is missing: restore it with `git checkout -- data/"
                        f"{CORPUS_FILE}` or rebuild it with `python data/build_poetry.py`")
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


def _check_forms(forms: Iterable[str] | str | None) -> set[str] | None:
    if forms is None:
        return None
    forms = {forms} if isinstance(forms, str) else set(forms)
    unknown = sorted(forms - set(FORMS))
    if unknown:
        raise UserError(f"unknown form(s) {unknown}; choose from {list(FORMS)}")
    return forms


def _select(split: str | None, forms: Iterable[str] | str | None) -> list[dict]:
    """The cached poems of a split and forms (not copies: callers must not modify them)."""
    if split is not None and split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose from {list(SPLITS)} or None for all")
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
        raise UserError(f"limit must be a non-negative number of poems or None, got {limit!r}")
    return "".join(format_poem(p) for p in _select(split, forms)[:limit])


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class SlidingWindowDataset(Dataset):
    """Windows of `block_size` tokens over one long sequence; the target is the input shifted by 1.

    Window i starts at i * stride (stride defaults to block_size: windows touch, never overlap),
    or at `starts[i]` when offsets are given (e.g. `document_starts`: every window opens a poem).
    Targets equal to `ignore_id` (e.g. the tokenizer's <unk>) become -100, which the loss skips:
    a model never learns to predict a character it cannot name.
    """

    def __init__(self, ids: Sequence[int] | torch.Tensor, block_size: int,
                 stride: int | None = None, *, starts: torch.Tensor | None = None,
                 ignore_id: int | None = None):
        self.block_size = _positive_int("block_size", block_size)
        self.ids = torch.as_tensor(ids, dtype=torch.long)
        self.ignore_id = ignore_id
        if self.ids.dim() != 1:
            raise UserError(f"ids must be one flat sequence of token ids, got shape "
                            f"{tuple(self.ids.shape)}; flatten it or concatenate the pieces")
        if len(self.ids) < block_size + 1:
            raise UserError(f"the sequence has {len(self.ids)} tokens but block_size={block_size} "
                            f"needs at least {block_size + 1} (inputs plus the shifted target); "
                            "use more text or a smaller block_size")
        last = len(self.ids) - block_size - 1  # the last offset with a full window and its target
        if starts is None:
            stride = _positive_int("stride", block_size if stride is None else stride)
            self.starts = torch.arange(0, last + 1, stride)
        else:
            if stride is not None:
                raise UserError("give stride or starts, not both")
            self.starts = torch.as_tensor(starts, dtype=torch.long)
            if self.starts.dim() != 1 or len(self.starts) == 0:
                raise UserError("starts must be a non-empty 1-D tensor of window offsets")
            if self.starts.min() < 0 or self.starts.max() > last:
                raise UserError(f"window offsets must lie in [0, {last}] so that each window and "
                                "its target fit in the sequence")

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} is out of range for {len(self)} windows")
        start = int(self.starts[i])
        chunk = self.ids[start:start + self.block_size + 1]
        x, y = chunk[:-1], chunk[1:]
        if self.ignore_id is not None:
            y = y.masked_fill(y == self.ignore_id, -100)
        return x, y

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """`batch_size` windows drawn at random (with replacement): what a training step sees."""
        picks = torch.randint(len(self), (batch_size,), generator=generator).tolist()
        xs, ys = zip(*(self[i] for i in picks), strict=True)
        return torch.stack(xs), torch.stack(ys)


def document_starts(ids: torch.Tensor, newline_id: int, block_size: int) -> torch.Tensor:
    """Offsets where a text starts (0, and right after each blank line) with a full window left."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    blank = (ids[:-1] == newline_id) & (ids[1:] == newline_id)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), blank.nonzero()[:, 0] + 2])
    return starts[starts <= len(ids) - block_size - 1]


def fixed_batches(windows: SlidingWindowDataset, batch_size: int, n: int,
                  seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same `n` random batches every time: evaluations compare like with like. They are the
    first `n` batches a training run seeded with `seed` draws (`windows.sample`)."""
    g = torch.Generator().manual_seed(seed)
    return [windows.sample(batch_size, g) for _ in range(_positive_int("n", n))]


def make_loader(ids: Sequence[int] | torch.Tensor, block_size: int, batch_size: int,
                stride: int | None = None, shuffle: bool = True, seed: int = 0,
                drop_last: bool = True, ignore_id: int | None = None) -> DataLoader:
    """Batches of (x, y) windows, each (batch_size, block_size), epoch by epoch; one seed, one
    order of batches. The windows are `SlidingWindowDataset`'s, as in training."""
    dataset = SlidingWindowDataset(ids, block_size, stride, ignore_id=ignore_id)
    _positive_int("batch_size", batch_size)
    if drop_last and len(dataset) < batch_size:
        raise UserError(f"the sequence gives {len(dataset)} windows, fewer than one batch of "
                        f"{batch_size}; use a smaller batch_size, a smaller stride or "
                        "drop_last=False")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed))
