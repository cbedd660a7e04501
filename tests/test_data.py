"""The poetry corpus (fields, forms, splits, clean text) and the sliding-window loader."""

import re
from collections import Counter

import pytest
import torch

from llmbook.data import (
    FORMS,
    SlidingWindowDataset,
    corpus_text,
    document_starts,
    fixed_batches,
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


def test_windows_at_given_starts_and_unk_targets():
    ids = torch.tensor([5, 1, 6, 0, 0, 7, 1, 9, 0, 0, 4, 4, 4])  # 0 is "\n", 1 is <unk>
    ds = SlidingWindowDataset(ids, 3, starts=document_starts(ids, 0, 3), ignore_id=1)
    assert ds.starts.tolist() == [0, 5] and len(ds) == 2
    x, y = ds[1]
    assert x.tolist() == [7, 1, 9] and y.tolist() == [-100, 9, 0]  # <unk> is never a target
    assert SlidingWindowDataset(ids, 3)[0][1].tolist() == [1, 6, 0]  # no ignore_id: kept
    with pytest.raises(ValueError, match="stride or starts"):
        SlidingWindowDataset(ids, 3, stride=1, starts=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, 9\]"):
        SlidingWindowDataset(ids, 3, starts=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="non-empty"):
        SlidingWindowDataset(ids, 3, starts=torch.tensor([], dtype=torch.long))


def test_one_seed_gives_the_same_windows_everywhere(tmp_path, monkeypatch):
    """Chapters, `llmbook.train` and `llmbook.eval` draw through `SlidingWindowDataset.sample`,
    so `fixed_batches(windows, B, n, seed)` is exactly what a run seeded `seed` trains on."""
    from llmbook import train as train_module
    from llmbook.config import TrainConfig

    text = "".join(f"{i}白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。\n\n" for i in range(40))
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    cfg = TrainConfig.from_dict({
        "model": {"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16},
        "data": {"text_file": "c.txt", "window_start": "document"},
        "train": {"max_steps": 3, "batch_size": 4, "warmup_steps": 1, "eval_batches": 1,
                  "device": "cpu", "seed": 7}}, base_dir=tmp_path)
    drawn, sample = [], SlidingWindowDataset.sample

    def recording(self, batch_size, generator):
        batch = sample(self, batch_size, generator)
        drawn.append(batch)
        return batch

    monkeypatch.setattr(SlidingWindowDataset, "sample", recording)
    result = train_module.train(cfg, tmp_path / "run", progress=False)
    monkeypatch.undo()
    tok, train_ids, _ = train_module.load_data(cfg, result.tokenizer)
    expected = fixed_batches(train_module.make_windows(cfg, train_ids, tok), 4, 3, seed=7)
    training = drawn[-3:]  # the evaluation's fixed batches are drawn first
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(training, expected, strict=True))
    assert all(tok.itos[i].isdigit() for x, _ in training for i in x[:, 0].tolist())  # at a poem
    other = fixed_batches(train_module.make_windows(cfg, train_ids, tok), 4, 3, seed=8)
    assert not torch.equal(other[0][0], expected[0][0])
