"""Decoding: greedy, seeded sampling, top-k / top-p, stop tokens, beam search, argument checks."""

import itertools

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from llmbook.generate import beam_search, generate, top_k_filter, top_p_filter
from llmbook.model import GPT, GPTConfig

VOCAB, BLOCK = 23, 12


@pytest.fixture(scope="module")
def model():
    """A small random GPT with confident (peaked) next-token distributions."""
    torch.manual_seed(0)
    return peaked(GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2,
                                n_embd=32)))


def peaked(m):
    """Large random weight matrices (LayerNorms left at 1 and 0): varied, confident predictions."""
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    return m.eval()


def prompt(*ids):
    return torch.tensor([list(ids)])


def argmax_rollout(model, idx, n):
    for _ in range(n):
        logits, _ = model(idx[:, -BLOCK:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return idx


def continuation_logprob(model, seq, prompt_len):
    """Sum of log p(token | everything before it) over the generated part of seq (1, T)."""
    with torch.no_grad():
        logp = model(seq[:, :-1])[0].log_softmax(-1)[0]
    new = seq[0, prompt_len:]
    return logp[torch.arange(prompt_len - 1, seq.size(1) - 1), new].sum().item()


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_greedy_equals_argmax_rollout_with_context_cropping(model):
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = generate(model, idx, 20, greedy=True)  # 23 tokens > block_size 12: context is cropped
    assert out.shape == (2, 23)
    assert torch.equal(out, argmax_rollout(model, idx, 20))
    assert torch.equal(generate(model, idx, 0), idx)


def test_same_seed_same_sample_different_seed_different(model):
    a = generate(model, prompt(1, 2), 30, generator=seeded(0))
    b = generate(model, prompt(1, 2), 30, generator=seeded(0))
    c = generate(model, prompt(1, 2), 30, generator=seeded(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, generate(model, prompt(1, 2), 30, greedy=True))


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    greedy = generate(model, prompt(5, 6, 7), 15, greedy=True)
    for seed in range(3):
        assert torch.equal(generate(model, prompt(5, 6, 7), 15, top_k=1,
                                    generator=seeded(seed)), greedy)
        assert torch.equal(generate(model, prompt(5, 6, 7), 15, top_p=1e-6, temperature=2.0,
                                    generator=seeded(seed)), greedy)


def test_low_temperature_approaches_greedy_and_high_spreads(model):
    greedy = generate(model, prompt(3), 10, greedy=True)
    cold = generate(model, prompt(3), 10, temperature=1e-4, generator=seeded(0))
    assert torch.equal(cold, greedy)
    hot = generate(model, prompt(3).repeat(8, 1), 10, temperature=100.0, generator=seeded(0))
    assert hot[:, 1:].unique().numel() > VOCAB // 2  # near-uniform over the vocabulary


def test_stop_token_halts(model):
    greedy = generate(model, prompt(1, 2), 10, greedy=True)
    stop = greedy[0, 4].item()  # the third generated token
    first = (greedy[0, 2:] == stop).nonzero()[0].item() + 3  # where it first appears, + 1
    out = generate(model, prompt(1, 2), 10, greedy=True, stop_token=stop)
    assert torch.equal(out, greedy[:, :first])
    assert out[0, -1] == stop


def test_stopped_rows_are_padded_with_stop_token(model):
    idx = torch.tensor([[1, 2], [7, 8]])
    greedy = generate(model, idx, 8, greedy=True)
    # a token the first row emits and the second row never does
    t, stop = next((t, s) for t, s in enumerate(greedy[0, 2:].tolist(), start=2)
                   if s not in greedy[1, 2:].tolist())
    out = generate(model, idx, 8, greedy=True, stop_token=stop)
    assert torch.equal(out[1], greedy[1])
    assert torch.equal(out[0, :t], greedy[0, :t])
    assert (out[0, t:] == stop).all()


def test_generate_uses_eval_mode_and_restores_it():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=16, dropout=0.5))
    m.train()
    a = generate(m, prompt(1), 7, greedy=True)
    assert torch.equal(a, generate(m, prompt(1), 7, greedy=True))  # no dropout noise
    assert m.training


def test_top_k_filter():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert torch.equal(torch.isfinite(out), torch.tensor([[False, True, False, True, False]]))
    assert_close(out[torch.isfinite(out)], torch.tensor([5.0, 4.0]))
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_p_filter_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False, False, False]
    assert kept(0.5) == [False, True, False, True, False]  # 0.4 alone is not enough
    assert kept(0.85) == [False, True, False, True, True]
    assert kept(0.9) == [True, True, False, True, True]
    assert kept(1.0) == [True] * 5
    batch = top_p_filter(torch.stack([logits[0], logits[0].flip(0)]), 0.5)
    assert torch.equal(torch.isfinite(batch[1]), torch.isfinite(batch[0]).flip(0))


def test_beam_search_with_one_beam_is_greedy(model):
    for ids in [(1, 2), (9,), (4, 4, 4, 4)]:
        greedy = generate(model, prompt(*ids), 15, greedy=True)  # also crosses block_size
        assert torch.equal(beam_search(model, prompt(*ids), 15, num_beams=1), greedy)


def test_beam_search_beats_greedy(model):
    better = 0
    for start in range(6):
        greedy = generate(model, prompt(start), 8, greedy=True)
        beams = beam_search(model, prompt(start), 8, num_beams=4)
        lp_greedy, lp_beam = (continuation_logprob(model, s, 1) for s in (greedy, beams))
        assert lp_beam >= lp_greedy - 1e-5
        better += lp_beam > lp_greedy + 1e-5
    assert better > 0  # on this model, beams find something greedy misses


def test_beam_search_with_enough_beams_is_exhaustive():
    """With num_beams >= vocab ** (steps - 1) no prefix is ever pruned: the exact best wins."""
    torch.manual_seed(1)
    m = peaked(GPT(GPTConfig(block_size=8, vocab_size=5, n_layer=1, n_head=2, n_embd=16)))
    best = max(itertools.product(range(5), repeat=3),
               key=lambda c: continuation_logprob(m, prompt(2, *c), 1))
    assert beam_search(m, prompt(2), 3, num_beams=25)[0, 1:].tolist() == list(best)


def test_beam_search_stop_token(model):
    free = beam_search(model, prompt(3, 1), 10, num_beams=3)
    stop = free[0, 4].item()
    out = beam_search(model, prompt(3, 1), 10, num_beams=3, stop_token=stop)
    assert out[0, -1] == stop and stop not in out[0, 2:-1].tolist()
    assert out.size(1) <= free.size(1)


def test_beam_search_length_penalty_favours_longer_text(model):
    """Scores are sum log p / length ** length_penalty: a larger penalty never picks shorter."""
    differs = False
    for start, stop in itertools.product(range(4), (13, 9)):
        lengths = [beam_search(model, prompt(start), 10, stop_token=stop, length_penalty=lp)
                   .size(1) for lp in (-2.0, 0.0, 1.0, 3.0)]
        assert lengths == sorted(lengths)
        default = beam_search(model, prompt(start), 10, stop_token=stop).size(1)
        assert default == lengths[2]  # the default length_penalty is 1.0
        differs |= lengths[1] != lengths[2]
    assert differs


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=0), "top_k must be an int >= 1"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=1.5), "top_p"),
    (dict(stop_token=VOCAB), "stop_token"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_generate_rejects_bad_arguments(model, kwargs, match):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(model, prompt(1, 2), **kwargs)


def test_generate_rejects_bad_inputs(model):
    with pytest.raises(ValueError, match="unsqueeze"):
        generate(model, torch.tensor([1, 2]), 3)
    with pytest.raises(TypeError, match="LongTensor"):
        generate(model, torch.tensor([[1.0, 2.0]]), 3)
    with pytest.raises(ValueError, match="prompt is 13 tokens long, longer than the model"):
        generate(model, torch.zeros(1, BLOCK + 1, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="torch.Generator"):
        generate(model, prompt(1), 3, generator=0)
    assert torch.equal(generate(model, prompt(1), 3, temperature=0.0, greedy=True),
                       generate(model, prompt(1), 3, greedy=True))  # greedy ignores temperature
    assert torch.equal(generate(model, prompt(1), 6, temperature=0),  # 0 means greedy, as in
                       generate(model, prompt(1), 6, greedy=True))  # the completion APIs
    for tiny in (1e-30, 1e-300):  # logits / T overflow to inf; 1e-300 is 0 in float32
        out = generate(model, prompt(1), 6, temperature=tiny, generator=seeded(0))
        assert torch.equal(out, generate(model, prompt(1), 6, greedy=True))  # greedy, not NaN


def test_beam_search_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="one prompt at a time"):
        beam_search(model, torch.tensor([[1, 2], [3, 4]]), 3)
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(model, prompt(1), 3, num_beams=0)
    with pytest.raises(ValueError, match="stop_token"):
        beam_search(model, prompt(1), 3, stop_token=-1)
    with pytest.raises(ValueError, match="longer than the model's context"):
        beam_search(model, torch.zeros(1, BLOCK + 1, dtype=torch.long), 3)


def test_works_with_any_model_returning_logits_and_loss():
    """A bigram table (no config, no context limit) decodes too."""
    class Bigram(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.eye(4).roll(1, dims=1) * 10)  # i -> i + 1

        def forward(self, idx):
            return self.table[idx], None

    assert generate(Bigram(), prompt(0), 6, greedy=True).tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert beam_search(Bigram(), prompt(2), 3, num_beams=2).tolist() == [[2, 3, 0, 1]]


def test_beam_search_stops_early_only_when_no_alive_beam_can_win():
    """With length_penalty > 0 a beam's score sum / len ** lp can still rise as it grows, so
    stopping when the best alive beam's *current* score is below the finished ones would return
    a hypothesis that a full search ranks lower: here the short [0, stop] beats [0, A] after
    one step, but A, A, A, ... (each almost certain) ends with a far better score."""
    stop, a = 1, 2

    class Chain(nn.Module):
        def forward(self, idx):
            probs = torch.tensor([[0.0, 0.6, 0.4, 0.0],  # after 0: stop 0.6, A 0.4
                                  [0.25, 0.25, 0.25, 0.25],
                                  [0.0, 5e-4, 0.999, 5e-4],  # after A: almost surely A
                                  [0.25, 0.25, 0.25, 0.25]])
            return probs.clamp_min(1e-9).log()[idx], None

    out = beam_search(Chain(), prompt(0), 10, num_beams=1, stop_token=stop)
    assert out.tolist() == [[0] + [a] * 10]  # score about -0.93 / 10, not -0.51 / 1
    # with length_penalty 0 (plain sums) the short one is the right answer, found early
    assert beam_search(Chain(), prompt(0), 10, num_beams=1, stop_token=stop,
                       length_penalty=0.0).tolist() == [[0, stop]]
