"""The poetry corpus (fields, forms, splits, clean text) and the sliding-window loader."""

import re
from collections import Counter

import pytest
import torch

from llmbook.data import (
    FORMS,
    SlidingWindowDataset,
    corpus_text,
    format_poem,
    load_poems,
    make_loader,
    poem_header,
)

CJK = r"\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U0003134f"


@pytest.fixture(scope="module")
def poems():
    return load_poems()


def find(poems, title, author):
    found = [p for p in poems if p["title"] == title and p["author"] == author]
    assert found, f"《{title}》 by {author} is not in the corpus"
    return found[0]


# ----------------------------------------------------------------------------- corpus

def test_fields_and_counts(poems):
    assert len(poems) > 90_000
    assert len({p["id"] for p in poems}) == len(poems)
    for p in poems:
        assert set(p) == {"id", "title", "author", "dynasty", "form", "paragraphs", "split"}
        assert p["dynasty"] in ("唐", "宋") and p["form"] in FORMS
        assert p["split"] in ("train", "val", "test")
        assert p["title"] and p["author"] and p["paragraphs"]
    by = Counter((p["dynasty"], p["form"] == "词") for p in poems)
    assert by[("唐", False)] > 50_000 and by[("宋", True)] > 19_000 and by[("宋", False)] > 20_000
    assert by[("唐", True)] == 0  # ci come from the Song collection only


def test_text_is_clean_simplified_verse(poems):
    line = re.compile(rf"[{CJK}，。？！、；：]+")
    for p in poems:
        assert all(line.fullmatch(s) for s in p["paragraphs"]), p
        assert p["paragraphs"][-1][-1] in "。？！", p
        assert "《" not in p["title"] + p["author"] and "》" not in p["title"] + p["author"]
    chars = Counter("".join(s for p in poems for s in p["paragraphs"]))
    traditional = "國學書風東來時無爲為詩說見長門開雲鳥聲"
    assert sum(chars[c] for c in traditional) == 0
    assert chars["国"] > 1000 and chars["风"] > 10_000


def test_splits_are_disjoint_and_96_2_2(poems):
    ids = {s: {p["id"] for p in load_poems(s)} for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert ids["train"] | ids["val"] | ids["test"] == {p["id"] for p in poems}
    for s in ("val", "test"):
        assert 0.015 < len(ids[s]) / len(poems) < 0.025


def sentence_lengths(poem):
    return [len(s) for s in re.split("[，。？！；]", "".join(poem["paragraphs"])) if s]


def test_form_labels_follow_the_rule(poems):
    want = {(4, 5): "五言绝句", (4, 7): "七言绝句", (8, 5): "五言律诗", (8, 7): "七言律诗"}
    for p in poems:
        n = sentence_lengths(p)
        regular = want.get((len(n), n[0])) if len(set(n)) == 1 else None
        if p["form"] != "词":
            assert p["form"] == (regular or "其他"), p
    assert {p["form"] for p in poems} == set(FORMS)


@pytest.mark.parametrize("title, author, form", [
    ("静夜思", "李白", "五言绝句"),
    ("春晓", "孟浩然", "五言绝句"),
    ("春望", "杜甫", "五言律诗"),
    ("登高", "杜甫", "七言律诗"),
    ("黄鹤楼", "崔颢", "七言律诗"),
    ("水调歌头", "苏轼", "词"),
])
def test_known_poems(poems, title, author, form):
    assert find(poems, title, author)["form"] == form


def test_jingyesi_text(poems):
    assert find(poems, "静夜思", "李白")["paragraphs"] == ["床前看月光，疑是地上霜。",
                                                       "举头望山月，低头思故乡。"]


def test_filters_and_errors():
    jueju = load_poems("val", forms=["五言绝句", "七言绝句"])
    assert jueju and {p["form"] for p in jueju} == {"五言绝句", "七言绝句"}
    assert load_poems("val", forms="词") == load_poems("val", forms=["词"])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_poems("dev")
    with pytest.raises(ValueError, match="五言绝诗"):
        load_poems(forms=["五言绝诗"])
    with pytest.raises(ValueError, match="unknown form"):
        poem_header("七绝", "春晓")
    with pytest.raises(ValueError, match="limit"):
        corpus_text("val", limit=-1)


def test_load_poems_returns_copies():
    first = load_poems("test")
    first[0]["paragraphs"].append("改。")
    first[0]["title"] = "改"
    again = load_poems("test")[0]
    assert again["title"] != "改" and again["paragraphs"][-1] != "改。"


def test_format_poem_and_corpus_text():
    poem = {"title": "静夜思", "author": "李白", "form": "五言绝句",
            "paragraphs": ["床前看月光，疑是地上霜。", "举头望山月，低头思故乡。"]}
    assert format_poem(poem) == ("五言绝句《静夜思》李白\n床前看月光，疑是地上霜。\n"
                                 "举头望山月，低头思故乡。\n\n")
    assert poem_header("词", "水调歌头") == "词《水调歌头》"
    val = load_poems("val")
    assert corpus_text("val", limit=3) == "".join(format_poem(p) for p in val[:3])
    assert corpus_text("val") == "".join(format_poem(p) for p in val)
    assert corpus_text("val", forms="词").count("\n\n") == len(load_poems("val", forms="词"))


# ----------------------------------------------------------------------------- windows

@pytest.mark.parametrize("n, block, stride", [(20, 4, None), (20, 4, 1), (20, 4, 3), (9, 8, 1),
                                              (9, 8, None), (50, 1, 7), (13, 5, 20)])
def test_sliding_windows_cover_every_start(n, block, stride):
    ids = list(range(100, 100 + n))
    ds = SlidingWindowDataset(ids, block, stride)
    starts = list(range(0, n - block, stride or block))
    assert len(ds) == len(starts)
    for i, s in enumerate(starts):
        x, y = ds[i]
        assert x.dtype == torch.long and x.shape == y.shape == (block,)
        assert x.tolist() == ids[s:s + block] and y.tolist() == ids[s + 1:s + block + 1]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_sliding_window_errors():
    with pytest.raises(ValueError, match=r"has 4 tokens .* at least 5"):
        SlidingWindowDataset([1, 2, 3, 4], block_size=4)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        SlidingWindowDataset(list(range(10)), block_size=0)
    with pytest.raises(ValueError, match="stride"):
        SlidingWindowDataset(list(range(10)), block_size=2, stride=0)
    with pytest.raises(ValueError, match="flat sequence"):
        SlidingWindowDataset(torch.zeros(2, 10, dtype=torch.long), block_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_loader(torch.arange(10), block_size=4, batch_size=8)


def test_make_loader_is_reproducible():
    ids = torch.arange(1000)

    def batches(seed):
        return [x for x, _ in make_loader(ids, block_size=8, batch_size=4, seed=seed)]

    a, b, c = batches(0), batches(0), batches(1)
    assert len(a) == ((1000 - 9) // 8 + 1) // 4 and a[0].shape == (4, 8)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))
    x, y = next(iter(make_loader(ids, block_size=8, batch_size=4, stride=3, seed=0)))
    assert torch.equal(y, x + 1) and bool(((x[:, 0]) % 3 == 0).all())
    ordered = [x for x, _ in make_loader(ids.tolist(), 8, 4, shuffle=False, drop_last=False)]
    assert torch.equal(torch.cat(ordered)[:, 0], torch.arange(0, 985, 8))
