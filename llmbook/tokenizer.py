"""Text to token ids and back: characters, a byte-level BPE trained here, and GPT-2's BPE."""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tqdm import tqdm  # text bars: they read "100%|███| n/n" in a notebook saved to the web too

from .env import DATA_DIR
from .errors import UserError


def _ids_list(ids: Iterable[int], vocab_size: int) -> list[int]:
    """Token ids as a list of ints (a tensor works too), each checked to be in the vocabulary."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise UserError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1}); "
                        "were these ids made by another tokenizer?")
    return ids


def _parse_json(text: str, kind: str, source: str) -> dict:
    """A saved tokenizer's state, checked to be of the class `kind`."""
    try:
        state = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"{source} is not a tokenizer: it is not valid JSON") from None
    if not isinstance(state, dict) or state.get("type") != kind:
        found = state.get("type") if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{source} holds a {found!r}, not a {kind}; load it with the class "
                        "that saved it")
    return state


class CharTokenizer:
    """One token per character; specials come first, then characters by falling frequency.

    The only default special is <unk>, the id of characters outside the vocabulary: poems end with
    a blank line, so no end-of-text token is needed (pass more `specials` to add your own).
    `added` tokens (e.g. a chat template's, see `with_tokens`) come last, so that adding them to a
    trained model keeps every existing id."""

    def __init__(self, chars: Iterable[str], specials: tuple[str, ...] = ("<unk>",),
                 added: tuple[str, ...] = ()):
        if "<unk>" not in specials:
            raise UserError(f"specials {specials} must include '<unk>', the id unseen characters "
                            "map to")
        self.specials, self.added = tuple(specials), tuple(added)
        self.itos = (list(self.specials) + [c for c in chars if c not in self.specials]
                     + list(self.added))
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise UserError("the vocabulary lists a token twice")
        self.unk_id = self.stoi["<unk>"]

    @classmethod
    def from_text(cls, text: str, min_freq: int = 1,
                  specials: tuple[str, ...] = ("<unk>",)) -> CharTokenizer:
        """Characters seen at least `min_freq` times, most frequent first, ties by code point."""
        if isinstance(min_freq, bool) or not isinstance(min_freq, int) or min_freq < 1:
            raise UserError(f"min_freq must be a positive integer, got {min_freq!r}")
        counts = Counter(text)
        chars = sorted((c for c, n in counts.items() if n >= min_freq),
                       key=lambda c: (-counts[c], ord(c)))
        return cls(chars, specials)

    def with_tokens(self, tokens: Iterable[str]) -> CharTokenizer:
        """A copy with `tokens` appended (new ids at the end, every existing id unchanged)."""
        tokens = tuple(tokens)
        clash = [t for t in tokens if t in self.stoi]
        if clash or len(set(tokens)) != len(tokens):
            raise UserError(f"tokens {clash or list(tokens)} are already in the vocabulary or "
                            "listed twice")
        return CharTokenizer(self._chars(), self.specials, self.added + tokens)

    def _chars(self) -> list[str]:
        return self.itos[len(self.specials):len(self.itos) - len(self.added)]

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, unknown: str = "replace") -> list[int]:
        """Ids of the characters of `text`. Characters not in the vocabulary become <unk>
        (unknown="replace") or raise a ValueError naming the first one (unknown="error")."""
        if unknown not in ("replace", "error"):
            raise UserError(f"unknown must be 'replace' or 'error', got {unknown!r}")
        if unknown == "error":
            for pos, c in enumerate(text):
                if c not in self.stoi:
                    raise UserError(f"character {c!r} (U+{ord(c):04X}) at position {pos} is not "
                                    "in the vocabulary; use unknown='replace' to map it to <unk>")
        stoi, unk = self.stoi, self.unk_id
        return [stoi.get(c, unk) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of the ids; a special decodes to its name, e.g. '<unk>'."""
        itos = self.itos
        return "".join([itos[i] for i in _ids_list(ids, self.vocab_size)])

    def to_json(self) -> str:
        """The vocabulary as JSON (what `save` writes, and what model files carry in metadata)."""
        state = {"type": "CharTokenizer", "specials": list(self.specials), "chars": self._chars()}
        if self.added:
            state["added"] = list(self.added)
        return json.dumps(state, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, source: str = "tokenizer JSON") -> CharTokenizer:
        state = _parse_json(text, "CharTokenizer", source)
        return cls(state["chars"], tuple(state["specials"]), tuple(state.get("added", ())))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        return cls.from_json(Path(path).read_text(encoding="utf-8"), source=str(path))


# GPT-2's pre-tokenizer, written for Python's `re` ([^\W\d_] is a letter): text is cut into words,
# numbers, runs of other symbols and spaces, and merges never cross those cuts. Every character
# falls in one of the classes, so no text is lost.
SPLIT_PATTERN = re.compile(
    r"'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids` (left to right) by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class BPETokenizer:
    """Byte-level BPE: start from the 256 bytes and repeatedly merge the most frequent pair."""

    def __init__(self, merges: dict[tuple[int, int], int] | None = None):
        self.merges = dict(merges or {})
        self.vocab = {i: bytes([i]) for i in range(256)}
        for (a, b), new_id in self.merges.items():  # in the order they were learned
            self.vocab[new_id] = self.vocab[a] + self.vocab[b]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @classmethod
    def train(cls, text: str, vocab_size: int, verbose: bool = False) -> BPETokenizer:
        """Learn vocab_size - 256 merges from `text`; ties go to the smallest pair, so it is
        deterministic. Pair counts are updated only in the words a merge touches."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256:
            raise UserError(f"vocab_size must be an integer of at least 256 (the bytes), "
                            f"got {vocab_size!r}")
        word_counts = Counter(SPLIT_PATTERN.findall(text))
        words = [list(w.encode("utf-8")) for w in word_counts]
        freqs = list(word_counts.values())
        pair_counts: Counter[tuple[int, int]] = Counter()
        where = defaultdict(set)  # pair -> indices of the words that contain it
        for w, (ids, n) in enumerate(zip(words, freqs, strict=True)):
            for pair in pairwise(ids):
                pair_counts[pair] += n
                where[pair].add(w)
        merges = {}
        for new_id in tqdm(range(256, vocab_size), desc="BPE merges", disable=not verbose):
            if not pair_counts:
                warnings.warn(f"the text ran out of pairs to merge after {len(merges)} merges; "
                              f"vocab_size is {256 + len(merges)}, not {vocab_size}", stacklevel=2)
                break
            pair = max(pair_counts, key=lambda p: (pair_counts[p], -p[0], -p[1]))
            merges[pair] = new_id
            for w in where.pop(pair):
                ids, n = words[w], freqs[w]
                for old in pairwise(ids):  # take the word's pairs out, merge, put them back
                    pair_counts[old] -= n
                    if pair_counts[old] == 0:
                        del pair_counts[old]
                words[w] = ids = _merge(ids, pair, new_id)
                for new in pairwise(ids):
                    pair_counts[new] += n
                    where[new].add(w)
        tokenizer = cls(merges)
        if verbose:
            longest = max(tokenizer.vocab.values(), key=len)
            print(f"{len(merges)} merges on {len(text):,} characters; longest token "
                  f"{longest.decode('utf-8', errors='replace')!r} ({len(longest)} bytes)")
        return tokenizer

    def _encode_word(self, word: str) -> list[int]:
        """Apply the merges to one pre-tokenized word, earliest-learned merge first."""
        ids = list(word.encode("utf-8"))
        while len(ids) >= 2:
            pair = min(pairwise(ids), key=lambda p: self.merges.get(p, float("inf")))
            if pair not in self.merges:
                break
            ids = _merge(ids, pair, self.merges[pair])
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (any Unicode: every byte is in the vocabulary)."""
        cache: dict[str, list[int]] = {}
        out = []
        for word in SPLIT_PATTERN.findall(text):
            if word not in cache:
                cache[word] = self._encode_word(word)
            out.extend(cache[word])
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """The text of the ids; bytes that are not valid UTF-8 on their own become '\ufffd'."""
        data = b"".join(self.vocab[i] for i in _ids_list(ids, self.vocab_size))
        return data.decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        merges = [[a, b, new_id] for (a, b), new_id in self.merges.items()]
        Path(path).write_text(json.dumps({"type": "BPETokenizer", "merges": merges}),
                              encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        state = _parse_json(Path(path).read_text(encoding="utf-8"), "BPETokenizer", str(path))
        return cls({(a, b): new_id for a, b, new_id in state["merges"]})


GPT2_PATTERN = (  # tiktoken's r50k_base pattern: GPT-2's, written to run faster
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""")
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def gpt2_tokenizer() -> tiktoken.Encoding:
    """GPT-2's tokenizer (tiktoken's r50k_base) from data/gpt2.tiktoken, without the network."""
    path = DATA_DIR / "gpt2.tiktoken"
    if not path.exists():
        raise UserError(f"{path} is missing: restore it with "
                        "`git checkout -- data/gpt2.tiktoken`")
    try:
        ranks = load_tiktoken_bpe(str(path), expected_hash=GPT2_SHA256)
    except ValueError as e:
        raise UserError(f"{path} is not GPT-2's rank file (sha256 differs); restore it with "
                        "`git checkout -- data/gpt2.tiktoken`") from e
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
