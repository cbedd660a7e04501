"""The key-value cache and batched generation: the same logits and the same tokens as the plain
path, for greedy, seeded sampling and beam search, past the context too; a left-padded batch
equals its prompts decoded one by one; the cache is really used; bad input is a clear error."""

import pytest
import torch
from torch.testing import assert_close

from llmbook.errors import UserError
from llmbook.generate import beam_search, generate, left_pad
from llmbook.model import GPT, GPTConfig

VOCAB, BLOCK = 29, 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # large weights: confident, varied predictions (few near-ties)
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    return m.eval()


def test_cached_forward_equals_the_full_forward(model):
    idx = torch.randint(VOCAB, (3, BLOCK))
    full, _ = model(idx)
    cache = model.new_cache(3)
    parts = [model(idx[:, :5], cache=cache)[0]]  # a prompt, then one token at a time
    parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, BLOCK)]
    assert cache.length == BLOCK
    assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="longer than the model's context"):
        model(idx[:, :1], cache=cache)


@pytest.mark.parametrize("new", [5, 3 * BLOCK])  # within the context, and far past it
def test_cache_gives_the_same_tokens_greedy_and_sampled(model, new):
    idx = torch.randint(VOCAB, (2, 4), generator=torch.Generator().manual_seed(1))
    for kwargs in ({"greedy": True}, {"temperature": 0.9, "top_k": 10},
                   {"temperature": 1.0, "top_p": 0.9}):
        runs = [generate(model, idx, new, use_cache=c, **kwargs,
                         generator=torch.Generator().manual_seed(7)) for c in (True, False)]
        assert torch.equal(*runs), kwargs


@pytest.mark.parametrize("length_penalty, stop", [(1.0, None), (0.5, 3), (0.0, 5)])
def test_beam_search_with_the_cache_equals_without(model, length_penalty, stop):
    idx = torch.tensor([[1, 2, 3]])
    for new in (6, 2 * BLOCK):
        runs = [beam_search(model, idx, new, num_beams=4, length_penalty=length_penalty,
                            stop_token=stop, use_cache=c) for c in (True, False)]
        assert torch.equal(*runs)


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_left_padded_batch_equals_one_by_one(model, use_cache):
    prompts = [[4, 5, 6, 7, 8, 9], [1], [2, 3, 4]]
    idx, mask = left_pad(prompts, pad_id=0)
    assert mask.tolist()[1] == [False] * 5 + [True]
    for new in (6, 2 * BLOCK):
        batch = generate(model, idx, new, greedy=True, attention_mask=mask, use_cache=use_cache)
        for row, p in zip(batch, prompts, strict=True):
            alone = generate(model, torch.tensor([p]), new, greedy=True, use_cache=use_cache)
            assert row[idx.size(1):].tolist() == alone[0, len(p):].tolist(), (p, new)


def test_the_cache_is_used(model, monkeypatch):
    seen = []
    forward = GPT.forward

    def spy(self, idx, *args, **kwargs):
        seen.append(idx.size(1))
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", spy)
    generate(model, torch.tensor([[1, 2, 3]]), 5, greedy=True)
    assert seen == [3, 1, 1, 1, 1]  # the prompt once, then one new token per step
    seen.clear()
    generate(model, torch.tensor([[1, 2, 3]]), 5, greedy=True, use_cache=False)
    assert seen == [3, 4, 5, 6, 7]


def test_bad_masks_and_caches_are_clear_errors(model):
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    right_padded = torch.tensor([[True, True, False], [True, True, True]])
    with pytest.raises(UserError, match="pad on the left"):
        generate(model, idx, 2, attention_mask=right_padded)
    with pytest.raises(UserError, match="bool tensor of idx's shape"):
        generate(model, idx, 2, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(UserError, match="attention_mask must be a bool tensor"):
        model(idx, attention_mask=torch.ones(2, 3))
    with pytest.raises(UserError, match="cache was made for 1"):
        model(idx, cache=model.new_cache(1))
    with pytest.raises(UserError, match="the cache holds 2 positions; 3 do not fit"):
        model(idx, cache=model.new_cache(2, max_len=2))
    with pytest.raises(UserError, match="no empty one"):
        left_pad([[1], []], pad_id=0)
