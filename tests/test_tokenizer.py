"""Tokenizers: characters, byte-level BPE trained from scratch, and GPT-2's BPE offline."""

import socket
from collections import Counter
from itertools import pairwise

import pytest

from llmbook.data import corpus_text
from llmbook.tokenizer import SPLIT_PATTERN, BPETokenizer, CharTokenizer, gpt2_tokenizer

ENGLISH = ("Hello, world! It's a test_case with  two spaces,\ttabs,\r\nCRLF, numbers 3.14159 "
           "and emojis 🙂👍🏽🇨🇳, accents café naïve, Ελληνικά, русский, and 中文「引号」。\n\n")


@pytest.fixture(scope="module")
def bpe():
    """One BPE trained on about 200 KB of poetry, shared by the tests below."""
    return BPETokenizer.train(corpus_text("train")[:70_000], vocab_size=600)


# ----------------------------------------------------------------------------- characters

def test_char_tokenizer_round_trips_the_whole_corpus():
    text = corpus_text("train") + corpus_text("val") + corpus_text("test")
    assert len(text) > 8_000_000
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.vocab_size == len(set(text)) + 1
    assert tok.unk_id not in ids and tok.specials == ("<unk>",)  # poems end with a blank line


def test_char_order_is_specials_then_frequency_then_code_point():
    tok = CharTokenizer.from_text("abbcccdb")
    assert tok.itos == ["<unk>", "b", "c", "a", "d"]  # b:3, c:3 (tie: b < c), a:1, d:1
    assert tok.unk_id == 0
    assert tok.stoi == {s: i for i, s in enumerate(tok.itos)}


def test_unknown_characters_are_replaced_or_reported():
    tok = CharTokenizer.from_text("春眠不觉晓")
    assert tok.encode("春X晓") == [tok.stoi["春"], tok.unk_id, tok.stoi["晓"]]
    assert tok.decode(tok.encode("春X晓")) == "春<unk>晓"
    with pytest.raises(ValueError, match=r"'X' \(U\+0058\) at position 1"):
        tok.encode("春X晓", unknown="error")
    with pytest.raises(ValueError, match="unknown must be"):
        tok.encode("春", unknown="ignore")


def test_min_freq_drops_rare_characters():
    tok = CharTokenizer.from_text("aaab", min_freq=2)
    assert tok.itos == ["<unk>", "a"]
    assert tok.encode("ab") == [1, tok.unk_id]
    with pytest.raises(ValueError, match="min_freq"):
        CharTokenizer.from_text("a", min_freq=0)


def test_char_bad_input_is_a_clear_error():
    tok = CharTokenizer.from_text("ab")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([0, 99])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="<unk>"):
        CharTokenizer.from_text("ab", specials=("<eos>",))


def test_char_save_load(tmp_path):
    tok = CharTokenizer.from_text("床前明月光，疑是地上霜。", specials=("<unk>", "<eos>", "<pad>"))
    tok.save(tmp_path / "tok.json")
    again = CharTokenizer.load(tmp_path / "tok.json")
    assert again.itos == tok.itos and again.specials == tok.specials
    assert CharTokenizer.from_json(tok.to_json()).itos == tok.itos  # as model files carry it
    assert (tmp_path / "tok.json").read_text(encoding="utf-8") == tok.to_json()
    with pytest.raises(ValueError, match="BPETokenizer"):
        BPETokenizer.load(tmp_path / "tok.json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CharTokenizer.from_json("{not json")


# ----------------------------------------------------------------------------- BPE

def test_bpe_round_trips_held_out_poetry_and_other_scripts(bpe):
    assert bpe.vocab_size == 600 and len(bpe.merges) == 344
    val = corpus_text("val")[:100_000]
    ids = bpe.encode(val)
    assert bpe.decode(ids) == val
    assert len(ids) < 0.65 * len(val.encode("utf-8"))  # the merges compress unseen poems
    assert bpe.decode(bpe.encode(ENGLISH)) == ENGLISH
    assert bpe.decode(bpe.encode("")) == ""


def test_split_pattern_loses_nothing():
    text = ENGLISH + "__init__ a_b\u0301 ²³ ⅫⅣ \x00\x7f \u3000全角\u3000空格 \n\n\n"
    assert "".join(SPLIT_PATTERN.findall(text)) == text


def test_bpe_vocab_is_the_merged_bytes(bpe):
    for (a, b), new_id in bpe.merges.items():
        assert bpe.vocab[new_id] == bpe.vocab[a] + bpe.vocab[b]
        assert a < new_id and b < new_id
    assert sorted(bpe.vocab) == list(range(bpe.vocab_size))
    assert bpe.decode([0xE4]) == "\ufffd"  # a lone byte of a 3-byte character


def naive_bpe(text, vocab_size):
    """Reference: recount every pair before each merge (slow, obviously right)."""
    words = [list(w.encode("utf-8")) for w in SPLIT_PATTERN.findall(text)]
    merges = {}
    for new_id in range(256, vocab_size):
        counts = Counter(p for w in words for p in pairwise(w))
        if not counts:
            break
        pair = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        merges[pair] = new_id
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == pair:
                    w[i:i + 2] = [new_id]
                i += 1
    return merges


def test_bpe_training_matches_a_naive_reference():
    text = corpus_text("test")[:1500] + ENGLISH * 3
    assert BPETokenizer.train(text, 256 + 60).merges == naive_bpe(text, 256 + 60)


def test_bpe_is_deterministic_and_saves(tmp_path):
    text = corpus_text("train")[10_000:20_000]
    a = BPETokenizer.train(text, 400)
    b = BPETokenizer.train(text, 400)
    assert list(a.merges.items()) == list(b.merges.items())
    a.save(tmp_path / "bpe.json")
    c = BPETokenizer.load(tmp_path / "bpe.json")
    assert list(c.merges.items()) == list(a.merges.items()) and c.vocab == a.vocab
    assert c.encode(text[:500]) == a.encode(text[:500])


def test_bpe_bad_vocab_size():
    with pytest.raises(ValueError, match="at least 256"):
        BPETokenizer.train("abc", 255)
    with pytest.warns(UserWarning, match="ran out of pairs"):
        assert BPETokenizer.train("ab", 300).vocab_size == 257


# ----------------------------------------------------------------------------- GPT-2

def test_gpt2_tokenizer_works_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("the network is disabled in this test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    enc = gpt2_tokenizer()
    assert enc.encode("Hello, world!") == [15496, 11, 995, 0]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    poem = corpus_text("val", limit=20)
    assert enc.decode(enc.encode(poem)) == poem
    assert enc.decode(enc.encode(ENGLISH)) == ENGLISH
