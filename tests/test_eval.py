"""llmbook.eval (loss, perplexity, baselines, the poem-form check) and the shipped poetry-small."""

import math

import pytest
import torch

from llmbook.data import format_poem, load_poems
from llmbook.env import DATA_DIR, data_manifest, sha256
from llmbook.errors import UserError
from llmbook.eval import (
    REWARDS,
    baselines,
    format_report,
    mean_loss,
    perplexity,
    total_reward,
    well_formed_rate,
)
from llmbook.model import GPT, GPTConfig
from llmbook.pretrained import PRETRAINED, load_pretrained
from llmbook.verse import is_well_formed

REGULAR = ("五言绝句", "七言绝句", "五言律诗", "七言律诗")
JUEJU = "五言绝句《登鹳雀楼》王之涣\n白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。\n\n"
QIYAN = ("七言绝句《早发白帝城》李白\n朝辞白帝彩云间，千里江陵一日还。\n"
         "两岸猿声啼不住，轻舟已过万重山。\n\n")


# ----------------------------------------------------------------------------- poem forms

def test_classic_poems_are_well_formed():
    assert is_well_formed(JUEJU, "五言绝句")
    assert is_well_formed(QIYAN, "七言绝句")
    assert is_well_formed(JUEJU.rstrip("\n"), "五言绝句")  # the end of the text ends the body too
    assert is_well_formed(JUEJU + "七言绝句《下一首》\n", "五言绝句")  # only the first poem counts
    lushi = "五言律诗《题》某\n" + "白日依山尽，黄河入海流。\n" * 4
    assert is_well_formed(lushi, "五言律诗") and not is_well_formed(lushi, "五言绝句")


@pytest.mark.parametrize("form", REGULAR)
def test_corpus_poems_of_each_form_are_well_formed(form):
    poems = load_poems(forms=[form])
    assert len(poems) > 100
    good = [is_well_formed(format_poem(p), form) for p in poems]
    # the corpus labels forms by sentence lengths alone; a few poems break a verse line elsewhere
    # than after each couplet or end a couplet with "；", which the strict check rejects
    assert sum(good) / len(good) > 0.95, sum(good) / len(good)
    other = {"五言绝句": "七言绝句", "七言绝句": "五言绝句", "五言律诗": "五言绝句",
             "七言律诗": "七言绝句"}[form]
    assert not any(is_well_formed(format_poem(p), other) for p in poems[:200])


@pytest.mark.parametrize("broken", [
    JUEJU.replace("白日依山尽", "白日依山尽了"),  # six characters
    JUEJU.replace("黄河入海流。", "黄河入海流，"),  # a couplet must end with a full stop
    JUEJU.replace("，黄河", "黄河"),  # missing comma
    JUEJU.replace("欲穷千里目，更上一层楼。\n", ""),  # half a poem
    JUEJU.replace("\n\n", "\n欲穷千里目，更上一层楼。\n\n"),  # three couplets
    JUEJU.replace("白日", "ab"),  # not Chinese characters
    JUEJU.replace("\n欲穷", "\n\n欲穷"),  # a blank line ends the body early
    "五言绝句《登鹳雀楼》王之涣",  # only a header
    QIYAN,  # a seven-character poem is not a five-character one
])
def test_broken_poems_are_rejected(broken):
    assert not is_well_formed(broken, "五言绝句")


def test_forms_without_a_fixed_shape_are_an_error():
    with pytest.raises(ValueError, match="词"):
        is_well_formed(JUEJU, "词")


# ----------------------------------------------------------------------------- rewards

UNTONED = JUEJU.replace("白日依山尽", "白云依山尽")  # 云 (平) at the 2nd position: no pattern


def test_each_reward_scores_the_poem_in_0_to_1():
    assert list(REWARDS) == ["form", "rhyme", "tone", "unique"]
    assert {name: r(JUEJU, "五言绝句") for name, r in REWARDS.items()} == {
        "form": 1.0, "rhyme": 1.0, "tone": 1.0, "unique": 1.0}
    assert REWARDS["tone"](UNTONED, "五言绝句") == 0.75  # 3 of its 4 sentences keep a pattern
    assert REWARDS["tone"](QIYAN, "七言绝句") == 1.0
    for text, form in [(JUEJU, "七言绝句"), (UNTONED, "五言绝句"), (QIYAN, "五言绝句")]:
        assert all(0.0 <= r(text, form) <= 1.0 for r in REWARDS.values())


def test_a_rhyming_poem_scores_above_one_ending_changed():
    weights = {"form": 1.0, "rhyme": 1.0, "tone": 2.0}
    changed = JUEJU.replace("一层楼", "一层山")  # 山 does not rhyme with 流; still 平, in pattern
    assert REWARDS["rhyme"](changed, "五言绝句") == 0.0 < REWARDS["rhyme"](JUEJU, "五言绝句")
    assert total_reward(JUEJU, "五言绝句", weights) == 4.0
    assert total_reward(changed, "五言绝句", weights) == 3.0
    repeated = JUEJU.replace("黄河入海流", "黄河绕高楼")  # 重韵: 楼 ends both even sentences
    assert REWARDS["rhyme"](repeated, "五言绝句") == 0.0


def test_a_character_ending_two_sentences_loses_the_unique_reward():
    odd_repeat = JUEJU.replace("欲穷千里目", "欲穷千里尽")  # 尽 ends the 1st and 3rd sentences
    assert REWARDS["rhyme"](odd_repeat, "五言绝句") == 1.0  # the even endings still rhyme
    assert REWARDS["unique"](odd_repeat, "五言绝句") == 0.0 < REWARDS["unique"](JUEJU, "五言绝句")
    assert REWARDS["unique"](JUEJU.replace("黄河入海流", "黄河绕高楼"), "五言绝句") == 0.0


def test_the_unique_reward_holds_for_nearly_every_real_poem():
    for form in REGULAR:
        poems = [format_poem(p) for p in load_poems("test", forms=[form])]
        assert sum(REWARDS["unique"](t, form) for t in poems) / len(poems) > 0.97, form


def test_a_malformed_poem_gets_no_reward():
    for text, form in [(JUEJU, "七言绝句"), (JUEJU.replace("白日", "白"), "五言绝句"),
                       ("五言绝句《登鹳雀楼》王之涣\n白日依山尽，黄河入海流。\n\n", "五言绝句")]:
        assert {r(text, form) for r in REWARDS.values()} == {0.0}
        assert total_reward(text, form, {"form": 1, "rhyme": 2, "tone": 3}) == 0.0


@pytest.mark.parametrize("weights, message", [
    ({"beauty": 1.0},
     r"unknown reward 'beauty'; the rewards are \['form', 'rhyme', 'tone', 'unique'\]"),
    ({"form": -1.0}, "'form' must be a finite number >= 0, got -1.0"),
    ({"rhyme": math.nan}, "got nan"),
    ({"tone": math.inf}, "got inf"),
    ({"tone": "1"}, "got '1'"),
    ({"form": True}, "got True"),
])
def test_total_reward_rejects_bad_weights(weights, message):
    with pytest.raises(UserError, match=message):
        total_reward(JUEJU, "五言绝句", weights)


def test_the_report_shows_the_tonal_rate_beside_the_corpus():
    from llmbook.eval import poem_rates

    model = poem_rates([(JUEJU, "五言绝句"), (UNTONED, "五言绝句")], frozenset())
    corpus = {**poem_rates([(JUEJU, "五言绝句")], frozenset()), "chance": 0.1}
    assert (model["tonal"], model["tonal_sentences"], corpus["tonal"]) == (0.5, 0.875, 1.0)
    assert model["rhyme_no_repeat"] == 1.0 and model["n_well_formed"] == 2  # the old keys stay
    report = format_report({
        "baselines": {"uniform": 8.6, "unigram": 6.9}, "val_loss": {"anywhere": 3.5,
                                                                    "at_poem": 3.6},
        "model": {"五言绝句": model, "all": model}, "corpus": {"五言绝句": corpus, "all": corpus},
        "settings": {"n": 2, "seed": 0, "temperature": 0.8, "top_k": 50}})
    header = next(line for line in report.splitlines() if line.startswith("form"))
    row = next(line for line in report.splitlines() if line.startswith("五言绝句"))
    assert header.split()[5:7] == ["平仄", "corpus"] and row.split()[5:7] == ["50.0", "100.0"]
    assert "keeps the tonal patterns at 50% of it" in report


# ----------------------------------------------------------------------------- losses

def test_perplexity_is_exp_of_the_mean_batch_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16))
    batches = [(torch.randint(20, (4, 8)), torch.randint(20, (4, 8))) for _ in range(3)]
    losses = [model(x, y)[1].item() for x, y in batches]
    assert mean_loss(model, batches, "cpu") == pytest.approx(sum(losses) / 3)
    assert perplexity(model, batches, "cpu", max_batches=2) == pytest.approx(
        math.exp(sum(losses[:2]) / 2))
    assert 15 < perplexity(model, batches, "cpu") < 25  # an untrained model: about uniform
    with pytest.raises(ValueError, match="no batches"):
        mean_loss(model, [], "cpu")


def test_baselines():
    b = baselines([0, 0, 1, 1], vocab_size=4)
    assert b["uniform"] == pytest.approx(math.log(4)) and b["unigram"] == pytest.approx(math.log(2))
    assert baselines(torch.tensor([3, 3, 3]), 10)["unigram"] == 0


# ----------------------------------------------------------------------------- the shipped model

def test_unknown_pretrained_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="poetry-small"):
        load_pretrained("poetry-huge")


@pytest.fixture(scope="module")
def poetry_small():
    return load_pretrained("poetry-small")


def test_shipped_model_matches_its_checksum(poetry_small):
    name = PRETRAINED["poetry-small"]
    assert sha256(DATA_DIR / name) == data_manifest()[name]
    model, tok = poetry_small
    assert (DATA_DIR / name).stat().st_size < 25e6
    assert tok.decode(tok.encode("白日依山尽")) == "白日依山尽"


@pytest.fixture(scope="module")
def written(poetry_small):
    """100 poems per regular form for held-out titles, as `llmbook evaluate` samples them."""
    from llmbook.eval import poem_figures

    model, tok = poetry_small
    titles = [p["title"] for p in load_poems("test", forms=REGULAR)]
    return poem_figures(model, tok, REGULAR, titles, n=100, seed=0)


@pytest.mark.slow  # about a minute: 400 poems, decoded in batches
def test_shipped_model_keeps_the_form_and_never_writes_unk(written):
    for form in REGULAR:
        r = written[form]
        assert r["n"] == 100 and all(s.startswith(form + "《") for s in r["samples"])
        assert r["well_formed"] >= 0.95, (form, r["well_formed"], r["samples"][:3])
    assert written["all"]["unk"] == 0  # <unk> was never a training target


@pytest.mark.slow
def test_shipped_model_rhymes_near_the_corpus_and_does_not_copy(written):
    from llmbook.eval import corpus_figures

    corpus = corpus_figures(REGULAR)["all"]
    model = written["all"]
    # measured 55.9% against the corpus's 79.0% (71%) and 5.9% by chance; the target of
    # 80% of the corpus's rate is not reached yet, so this guards what the shipped model does
    assert model["rhyme_no_repeat"] >= 0.65 * corpus["rhyme_no_repeat"] > 4 * corpus["chance"]
    assert model["copied"] < 0.05


def test_batched_sampling_matches_the_form_check(poetry_small):
    model, tok = poetry_small
    titles = [p["title"] for p in load_poems("test", forms=["五言绝句"])]
    rates = well_formed_rate(model, tok, ["五言绝句"], titles, n=6, seed=1)
    r = rates["五言绝句"]
    assert r["well_formed"] == sum(is_well_formed(t, "五言绝句") for t in r["samples"])
    again = well_formed_rate(model, tok, ["五言绝句"], titles, n=6, seed=1)["五言绝句"]
    assert again["samples"] == r["samples"]  # one seed, the same poems


def test_shipped_model_beats_the_baselines(poetry_small):
    from llmbook.data import SlidingWindowDataset, corpus_text, fixed_batches

    model, tok = poetry_small
    val = torch.tensor(tok.encode(corpus_text("val", forms=REGULAR)))
    windows = SlidingWindowDataset(val, model.config.block_size, stride=1, ignore_id=tok.unk_id)
    loss = mean_loss(model, fixed_batches(windows, 16, 4, seed=0), "cpu")
    base = baselines(val, tok.vocab_size)
    assert loss < base["unigram"] - 1.0 < base["uniform"]


def test_poem_rates_measure_the_diversity_of_sentence_endings():
    from llmbook.eval import poem_rates

    varied = poem_rates([(JUEJU, "五言绝句")], frozenset())
    narrow = poem_rates([(JUEJU, "五言绝句"), (JUEJU, "五言绝句")], frozenset())
    ends = "尽流目楼"  # 白日依山尽，黄河入海流。欲穷千里目，更上一层楼。
    assert varied["distinct_endings"] == len(set(ends)) / len(ends) == 1.0
    assert narrow["distinct_endings"] == varied["distinct_endings"] / 2
    with pytest.raises(UserError, match="at least one"):
        poem_rates([])
