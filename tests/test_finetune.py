"""llmbook.tasks and llmbook.finetune: held-out tasks and their scores, a classifier head that
ignores padding, freezing, new tokens that keep the old rows, and an SFT batch whose loss counts
only the response."""

import pytest
import torch
import torch.nn.functional as F

from llmbook.errors import UserError
from llmbook.finetune import (
    CHAT_TOKENS,
    GPTClassifier,
    add_tokens,
    answer,
    encode_chat,
    freeze,
    pad_batch,
    score_replies,
    sft_batch,
)
from llmbook.model import GPT, GPTConfig
from llmbook.tasks import (
    REGULAR_FORMS,
    Instruction,
    char_f1,
    dynasty_examples,
    instruction_examples,
    score,
)
from llmbook.tokenizer import CharTokenizer

TOK = CharTokenizer(dict.fromkeys("春眠不觉晓处处闻啼鸟，。\n写一首五言绝句题目是《》"))
CFG = GPTConfig(block_size=48, vocab_size=TOK.vocab_size, n_layer=2, n_head=2, n_embd=16)


def _gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def test_no_poem_in_two_splits_and_classes_balanced_per_form():
    from llmbook.data import load_poems

    bodies = {s: {t for t, _ in dynasty_examples(s)} for s in ("train", "val", "test")}
    assert not bodies["train"] & bodies["test"] and not bodies["train"] & bodies["val"]
    assert not bodies["val"] & bodies["test"]
    test = dynasty_examples("test")
    forms = {"\n".join(p["paragraphs"]): p["form"] for p in load_poems("test", REGULAR_FORMS)}
    for form in REGULAR_FORMS:
        labels = [y for t, y in test if forms[t] == form]
        assert labels and labels.count(0) == labels.count(1), form
    assert not any("《" in t for t, _ in test)  # no title (nor author) in the text


def test_instruction_examples_are_held_out_by_poem():
    train = instruction_examples("train", per_task=500)
    test = instruction_examples("test")
    assert {e.task for e in test} == {"write", "form", "next", "dynasty"}
    assert not {e.response for e in train if e.task == "write"} & {
        e.response for e in test if e.task == "write"}
    assert all(e.prompt and e.response for e in test)


def test_last_token_features_ignore_padding_and_labels_are_checked():
    clf = GPTClassifier(_gpt(), n_classes=2).eval()
    a, b = TOK.encode("春眠不觉晓，"), TOK.encode("处处闻啼鸟。春眠")
    x, lengths = pad_batch([a, b], pad_id=0)
    logits, _ = clf(x, lengths=lengths)
    alone, _ = clf(torch.tensor([a]))
    torch.testing.assert_close(logits[0], alone[0])
    mean = GPTClassifier(_gpt(), n_classes=2, pooling="mean").eval()
    mean.head.load_state_dict(clf.head.state_dict())
    torch.testing.assert_close(mean(x, lengths=lengths)[0][0], mean(torch.tensor([a]))[0][0])
    with pytest.raises(UserError, match="label 2 is outside the classes 0..1"):
        clf(x, torch.tensor([0, 2]), lengths)


def test_freeze_strategies():
    clf = GPTClassifier(_gpt(), n_classes=2)
    head = sum(p.numel() for p in clf.head.parameters())
    assert freeze(clf, "head") == head
    block = sum(p.numel() for p in clf.gpt.transformer.h[-1].parameters())
    ln_f = sum(p.numel() for p in clf.gpt.transformer.ln_f.parameters())
    assert freeze(clf, "last:1") == head + block + ln_f
    assert not any(p.requires_grad for p in clf.gpt.transformer.h[0].parameters())
    assert freeze(clf, "all") == sum(p.numel() for p in clf.parameters())
    for bad in ("last:0", "last:3", "last:x", "some"):
        with pytest.raises(UserError):
            freeze(clf, bad)


def test_added_tokens_keep_every_existing_row_and_id():
    gpt, ref = _gpt(), _gpt()
    gpt, tok = add_tokens(gpt, TOK, CHAT_TOKENS)
    assert tok.vocab_size == TOK.vocab_size + 3 and tok.itos[:TOK.vocab_size] == TOK.itos
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    torch.testing.assert_close(gpt.transformer.wte.weight[:TOK.vocab_size],
                               ref.transformer.wte.weight, rtol=0, atol=0)
    idx = torch.tensor([TOK.encode("春眠不觉晓")])
    torch.testing.assert_close(gpt(idx)[0][..., :TOK.vocab_size], ref(idx)[0], rtol=0, atol=0)
    assert CharTokenizer.from_json(tok.to_json()).itos == tok.itos
    with pytest.raises(UserError, match="already in the vocabulary"):
        add_tokens(gpt, tok, CHAT_TOKENS)


def test_sft_loss_counts_only_response_tokens():
    gpt, tok = add_tokens(_gpt(), TOK, CHAT_TOKENS)
    examples = [encode_chat(tok, "写一首五言绝句", "春眠不觉晓，处处闻啼鸟。"),
                encode_chat(tok, "题目是《春》", "处处。")]
    x, y = sft_batch(examples, pad_id=0, block_size=CFG.block_size)
    n_response = sum(len(ids) - n for ids, n in examples)  # response characters and <|end|>
    assert (y != -100).sum() == n_response
    first = examples[0][1] - 1  # the position that predicts the first response token
    assert y[0, first] == examples[0][0][first + 1] and (y[0, :first] == -100).all()
    logits, loss = gpt(x, y)
    per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                reduction="none")
    torch.testing.assert_close(loss, per_token.sum() / n_response)
    # a prompt token's label changes nothing: it is masked whatever it is
    x2, y2 = sft_batch([(examples[0][0][:2] + [5] + examples[0][0][3:], examples[0][1]),
                        examples[1]], pad_id=0, block_size=CFG.block_size)
    assert torch.equal(y2[:, :first], y[:, :first]) and torch.equal(y2[0, first:], y[0, first:])


def test_bad_instructions_are_clear_errors():
    with pytest.raises(UserError, match="lacks the chat template's tokens"):
        encode_chat(TOK, "写一首", "春")
    tok = TOK.with_tokens(CHAT_TOKENS)
    with pytest.raises(UserError, match="empty response"):
        encode_chat(tok, "写一首", "")
    with pytest.raises(UserError, match="more than the context"):
        sft_batch([encode_chat(tok, "写" * 60, "春")], pad_id=0, block_size=CFG.block_size)


def test_char_f1():
    assert char_f1("春眠", "春眠") == 1.0 and char_f1("春", "眠") == 0.0
    assert char_f1("春眠不", "春眠") == pytest.approx(0.8)


def test_answer_stops_at_the_end_token_and_stays_in_the_context():
    gpt, tok = add_tokens(_gpt(), TOK, CHAT_TOKENS)
    reply = answer(gpt, tok, "写一首五言绝句", max_new_tokens=500)  # untrained: no <|end|> soon
    room = CFG.block_size - len(encode_chat(tok, "写一首五言绝句")[0])
    assert reply and "<|end|>" not in reply  # greedy: a longer budget gives no more than room
    assert reply == answer(gpt, tok, "写一首五言绝句", max_new_tokens=room)
    with torch.no_grad():  # a model that always ends: the reply is empty
        gpt.transformer.ln_f.weight.zero_()  # every hidden state becomes all ones,
        gpt.transformer.ln_f.bias.fill_(1.0)  # which the <|end|> row scores highest
        gpt.lm_head.weight[tok.stoi["<|end|>"]] = 100.0
    assert answer(gpt, tok, "写一首五言绝句") == ""
    with pytest.raises(UserError, match="leaving no room for a reply"):
        answer(gpt, tok, "写" * CFG.block_size)
    examples = [Instruction("next", "春", "", "五言绝句"),
                Instruction("form", "春", "五言绝句", "五言绝句"),
                Instruction("next", "眠", "春", "五言绝句")]  # the empty reply is right once of two
    assert score_replies(gpt, tok, examples) == ({"next": 0.5, "form": 0.0}, ["", "", ""])


def test_each_task_has_its_score():
    poem = "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。"
    write = Instruction("write", "写一首五言绝句，题目是《春晓》。", poem, "五言绝句")
    assert score(write, poem) == 1.0 and score(write, poem[:-3]) == 0.0
    form = Instruction("form", "这首诗是什么体裁？", "五言绝句", "五言绝句")
    assert score(form, "五言绝句") == 1.0 and score(form, "七言绝句") == 0.0
    nxt = Instruction("next", "下一句？", "处处闻啼鸟。", "五言绝句")
    assert score(nxt, "处处闻啼鸟。") == 1.0 and 0 < score(nxt, "处处闻鸟") < 1
