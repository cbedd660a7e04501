"""The rules of regular verse: rhyme groups, rhyme and 重韵, the chance rate, copying."""

import pytest

from llmbook.data import format_poem, load_poems
from llmbook.verse import (
    FORM_SHAPES,
    chance_rhyme,
    copy_rate,
    rhyme_check,
    rhyme_group,
    rhyme_groups,
    rhyme_rates,
    sentences,
    train_sentences,
)

STORK = "五言绝句《登鹳雀楼》王之涣\n白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。\n\n"
BAIDI = ("七言绝句《早发白帝城》李白\n朝辞白帝彩云间，千里江陵一日还。\n"
         "两岸猿声啼不住，轻舟已过万重山。\n\n")


def test_sentences_stop_at_the_blank_line():
    assert sentences(STORK + "五言绝句《下一首》某\n一二三四五，") == [
        "白日依山尽", "黄河入海流", "欲穷千里目", "更上一层楼"]
    assert sentences("五言绝句《无题》某\n") == []


@pytest.mark.parametrize("chars", ["流楼秋", "间山寒", "时期迟知子儿雨", "家花", "东风明城"])
def test_characters_that_rhyme(chars):
    assert len({rhyme_group(c) for c in chars}) == 1 and rhyme_group(chars[0]) is not None


@pytest.mark.parametrize("a, b", [("山", "楼"), ("书", "雨"), ("来", "飞"), ("人", "明"),
                                  ("歌", "家"), ("高", "楼"), ("山", "长")])
def test_characters_that_do_not(a, b):
    assert rhyme_group(a) != rhyme_group(b)


def test_readings():
    assert rhyme_group("还") == "开" and "寒" in rhyme_groups("还")  # hái, and huán
    assert "麻" in rhyme_groups("斜")  # xiá, as in 远上寒山石径斜
    for char in "a，𠀋":
        assert rhyme_group(char) is None and rhyme_groups(char) == ()
    with pytest.raises(ValueError, match="one character"):
        rhyme_group("山楼")


def test_a_poem_that_rhymes_and_one_that_does_not():
    assert rhyme_check(STORK, "五言绝句").endings == "流楼"
    assert rhyme_check(STORK, "五言绝句").rhymes
    assert not rhyme_check(STORK.replace("一层楼", "一层山"), "五言绝句").rhymes
    baidi = rhyme_check(BAIDI, "七言绝句")
    assert baidi.endings == "还山" and baidi.rhymes and not baidi.repeated
    assert not rhyme_check(BAIDI.replace("万重山", "万重峰"), "七言绝句").rhymes
    # the first sentence is free: 首句入韵 or not
    assert rhyme_check(BAIDI.replace("彩云间", "彩云飞"), "七言绝句").rhymes


def test_repeated_ending_is_flagged():
    r = rhyme_check(STORK.replace("黄河入海流", "黄河绕高楼"), "五言绝句")
    assert r.rhymes and r.repeated
    assert rhyme_rates([(STORK.replace("黄河入海流", "黄河绕高楼"), "五言绝句")])[
        "rhyme_no_repeat"] == 0.0


def test_malformed_poem_gets_no_credit():
    for text, form in [(STORK, "七言绝句"), (STORK.replace("白日", "白"), "五言绝句"),
                       ("五言绝句《登鹳雀楼》王之涣\n白日依山尽，黄河入海流。\n\n", "五言绝句")]:
        r = rhyme_check(text, form)
        assert not (r.well_formed or r.rhymes or r.repeated)
    rates = rhyme_rates([(STORK, "七言绝句"), (STORK, "五言绝句")])
    assert rates == {"n_well_formed": 1, "rhyme": 1.0, "rhyme_no_repeat": 1.0, "repeated": 0.0}


@pytest.fixture(scope="module")
def test_poems():
    return load_poems("test", forms=list(FORM_SHAPES))


def test_corpus_rhymes_far_above_chance(test_poems):
    overall = [(format_poem(p), p["form"]) for p in test_poems]
    for form in [*FORM_SHAPES, None]:
        pairs = [(t, f) for t, f in overall if form in (None, f)]
        real, chance = rhyme_rates(pairs), chance_rhyme(pairs)
        print(f"{form or 'overall'}: {real} chance {chance}")
        assert real["n_well_formed"] > 0.9 * len(pairs) and real["n_well_formed"] > 50
        assert real["rhyme_no_repeat"] > 0.6 and real["repeated"] < 0.05
        assert chance["rhyme"] < 0.2 and real["rhyme"] > 4 * chance["rhyme"]
    assert chance_rhyme(overall, seed=1) != chance_rhyme(overall, seed=0)


def test_copy_rates(test_poems):
    known = train_sentences(list(FORM_SHAPES))
    assert train_sentences(FORM_SHAPES) is known  # cached
    copied = copy_rate((format_poem(p) for p in test_poems), known)
    print(f"test-split sentences found in the train split: {copied:.3f}")
    assert copied < 0.1
    train_poem = load_poems("train", forms="七言律诗")[0]
    assert copy_rate([format_poem(train_poem)], known) == 1.0
    assert copy_rate([STORK], frozenset({"白日依山尽", "更上一层楼"})) == 0.5
    with pytest.raises(ValueError, match="no"):
        copy_rate(["五言绝句《无题》某\n\n"], known)
