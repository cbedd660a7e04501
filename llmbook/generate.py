"""Decoding: turn next-token distributions into text (greedy, sampling with top-k / top-p, beams),
one prompt or a left-padded batch of them, with a key-value cache.

The model is anything called as `model(idx) -> (logits, loss)` with `model.config.block_size`,
such as `llmbook.model.GPT`; the cache and batches of padded prompts need a model with
`new_cache` and the `cache` and `attention_mask` arguments of `GPT.forward`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch import Tensor

from .errors import UserError
from .model import check_context


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits in the last dimension (and ties with the k-th); -inf the rest."""
    _check_top_k(k)
    kth = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the most likely tokens whose probabilities first add up to >= p."""
    _check_top_p(p)
    if p == 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))  # best one stays
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _check_top_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"top_k must be an int >= 1 (or None for no limit), got {k!r}")


def _check_top_p(p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise UserError(f"top_p must be a number in (0, 1] (or None for no limit), got {p!r}")


def _check_prompt(model: nn.Module, idx: Tensor, max_new_tokens: int) -> int | None:
    """Validate what every decoder needs; returns the model's context length (None: unlimited)."""
    if not isinstance(idx, Tensor) or idx.dtype not in (torch.long, torch.int32):
        raise TypeError("idx must be a LongTensor of token ids, e.g. "
                        "torch.tensor([tokenizer.encode(prompt)])")
    if idx.dim() != 2 or idx.size(1) == 0:
        raise UserError(f"idx must have shape (batch, time) with time >= 1, got "
                        f"{tuple(idx.shape)}; use idx.unsqueeze(0) for a single prompt")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    if block_size is not None:
        check_context(idx.size(1), block_size)
    return block_size


def _check_stop_token(model: nn.Module, stop_token) -> None:
    if stop_token is None:
        return
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(stop_token, bool) or not isinstance(stop_token, int) or stop_token < 0 \
            or (vocab_size is not None and stop_token >= vocab_size):
        raise UserError(f"stop_token must be a token id in the vocabulary, got {stop_token!r}")


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths as one batch for `generate`: (idx, attention_mask), both
    (B, longest), each row padded on the left with pad_id and masked False there, so that every
    row's next token comes at the same position."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("left_pad needs at least one prompt, and no empty one")
    width = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    return idx, mask


def _check_attention_mask(idx: Tensor, mask: Tensor | None) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != idx.shape:
        raise UserError(f"attention_mask must be a bool tensor of idx's shape {tuple(idx.shape)}, "
                        f"True for prompt tokens and False for padding (see left_pad)")
    if not mask[:, -1].all() or (mask[:, 1:].int() < mask[:, :-1].int()).any():
        raise UserError("attention_mask must pad on the left (False ... False, True ... True in "
                        "each row) so that every row's next token comes at the end; see left_pad")


class _Decoder:
    """Logits for the token after each row of a growing batch. With a key-value cache, each call
    feeds only the tokens the cache has not seen; once the sequences outgrow the context it
    drops the cache and recomputes the last block_size tokens at every step, as the plain path
    always does (learned positions cannot slide under cached keys)."""

    def __init__(self, model: nn.Module, idx: Tensor, max_new_tokens: int,
                 block_size: int | None, use_cache: bool):
        self.model, self.block_size = model, block_size
        self.cache = None
        if use_cache and block_size is not None and hasattr(model, "new_cache"):
            # room for every token this call can feed, up to the context
            self.cache = model.new_cache(idx.size(0), min(block_size, idx.size(1) + max_new_tokens))

    def __call__(self, idx: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.cache is not None and idx.size(1) > self.cache.max_len:  # past the context
            self.cache = None
        if self.cache is not None:
            idx, kwargs = idx[:, self.cache.length:], {"cache": self.cache}
        else:
            kwargs = {}
            if self.block_size is not None:
                idx = idx[:, -self.block_size:]
                mask = None if mask is None else mask[:, -self.block_size:]
        if mask is not None:
            kwargs["attention_mask"] = mask
        logits, _ = self.model(idx, **kwargs)
        return logits[:, -1, :].float()

    def reorder(self, rows: Tensor) -> None:
        """Row i continues old row rows[i] (beam search)."""
        if self.cache is not None:
            self.cache.reorder(rows)


def generate(model: nn.Module, idx: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
             stop_token: int | None = None, generator: torch.Generator | None = None,
             attention_mask: Tensor | None = None, use_cache: bool = True) -> Tensor:
    """Append up to max_new_tokens tokens to each row of idx (B, T) and return (B, T + new).

    Greedy (or temperature 0) takes the argmax; otherwise it samples from softmax(logits /
    temperature), first cut to the top_k tokens and then to the top_p nucleus. Pass a seeded
    `generator` for reproducible samples. A row that emits `stop_token` keeps it and is padded
    with it while other rows go on; generation ends when every row has stopped. Prompts of
    different lengths go in one batch padded on the left, with their `attention_mask`
    (`left_pad` makes both). `use_cache=False` recomputes every prefix (the plain path, for
    teaching and testing; the tokens are the same). The model runs in eval mode (dropout off)
    and gets its previous mode back afterwards. `stream` yields the same tokens one by one.
    """
    steps = stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, greedy=greedy, stop_token=stop_token, generator=generator,
                   attention_mask=attention_mask, use_cache=use_cache)
    return torch.cat([idx, *steps], dim=1)


def stream(model: nn.Module, idx: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
           stop_token: int | None = None, generator: torch.Generator | None = None,
           attention_mask: Tensor | None = None, use_cache: bool = True) -> Iterator[Tensor]:
    """`generate`'s new tokens as they come, one (B, 1) tensor per step (to show text as it is
    written, or serve it); the arguments are checked at once, before the first token."""
    block_size = _check_prompt(model, idx, max_new_tokens)
    _check_attention_mask(idx, attention_mask)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature must be a finite number >= 0 (0 means greedy), got "
                        f"{temperature!r}")
    # 0 means greedy; so does a temperature too small for float32 (it would divide by zero)
    greedy = greedy or temperature < torch.finfo(torch.float32).tiny
    if top_k is not None:
        _check_top_k(top_k)
    if top_p is not None:
        _check_top_p(top_p)
    _check_stop_token(model, stop_token)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}; "
                        "e.g. torch.Generator().manual_seed(0)")
    pick = functools.partial(_pick, greedy=greedy, temperature=temperature, top_k=top_k,
                             top_p=top_p, generator=generator)
    return _stream(model, idx, max_new_tokens, pick, stop_token, attention_mask,
                   _Decoder(model, idx, max_new_tokens, block_size, use_cache))


def _pick(logits: Tensor, greedy: bool, temperature: float, top_k: int | None,
          top_p: float | None, generator: torch.Generator | None) -> Tensor:
    """The next token (B, 1) from next-token logits (B, vocab)."""
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    scaled = logits / temperature
    # a temperature so small that logits overflow to inf acts as greedy, not as NaN
    logits = torch.where(torch.isfinite(scaled).all(dim=-1, keepdim=True), scaled,
                         (logits - logits.amax(dim=-1, keepdim=True)) / temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)  # sample where the generator lives
    return torch.multinomial(probs, 1, generator=generator).to(logits.device)


@torch.no_grad()
def _stream(model: nn.Module, idx: Tensor, max_new_tokens: int, pick, stop_token: int | None,
            mask: Tensor | None, decoder: _Decoder) -> Iterator[Tensor]:
    was_training = model.training
    model.eval()
    stopped = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    try:
        for _ in range(max_new_tokens):
            next_id = pick(decoder(idx, mask)).to(idx.dtype)
            if stop_token is not None:
                next_id = next_id.masked_fill(stopped[:, None], stop_token)
                stopped |= next_id[:, 0] == stop_token
            yield next_id
            idx = torch.cat([idx, next_id], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
            if stopped.all():
                break
    finally:
        model.train(was_training)


@torch.no_grad()
def beam_search(model: nn.Module, idx: Tensor, max_new_tokens: int, num_beams: int = 4,
                length_penalty: float = 1.0, stop_token: int | None = None,
                use_cache: bool = True) -> Tensor:
    """The most likely continuation of one prompt (1, T) found by beam search, as (1, T + new).

    Keeps the num_beams best partial continuations by summed log-probability. A hypothesis
    ends at stop_token (kept) or after max_new_tokens; finished ones are ranked by
    sum log p / (new tokens) ** length_penalty, so length_penalty > 0 favours longer text.
    The search stops early only once no alive beam can still outscore the finished ones.
    With the cache (default), each new beam takes over the cache of the beam it extends.
    """
    block_size = _check_prompt(model, idx, max_new_tokens)
    if idx.size(0) != 1:
        raise UserError(f"beam_search decodes one prompt at a time: idx must be (1, T), "
                        f"got {tuple(idx.shape)}")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise UserError(f"num_beams must be an int >= 1, got {num_beams!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise UserError(f"length_penalty must be a number, got {length_penalty!r}")
    _check_stop_token(model, stop_token)

    def normalised(score: float, n_new: int) -> float:
        return score / max(n_new, 1) ** length_penalty

    was_training = model.training
    model.eval()
    decoder = _Decoder(model, idx, max_new_tokens, block_size, use_cache)
    beams = idx  # (num alive, T + step)
    scores = torch.zeros(1, device=idx.device)  # summed log-probabilities of the new tokens
    finished: list[tuple[float, Tensor]] = []  # (normalised score, sequence)
    for step in range(1, max_new_tokens + 1):
        logprobs = decoder(beams).log_softmax(dim=-1)
        candidates = (scores[:, None] + logprobs).flatten()  # every beam x every next token
        top = candidates.topk(min(2 * num_beams, candidates.numel()))  # room for stops
        vocab_size = logprobs.size(-1)
        alive, alive_scores, sources = [], [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            beam, token = divmod(flat, vocab_size)
            seq = torch.cat([beams[beam], beams.new_tensor([token])])
            if token == stop_token:
                finished.append((normalised(score, step), seq))
            else:
                alive.append(seq)
                alive_scores.append(score)
                sources.append(beam)
            if len(alive) == num_beams:
                break
        if not alive:  # every continuation was the stop token
            break
        beams, scores = torch.stack(alive), torch.tensor(alive_scores, device=idx.device)
        decoder.reorder(torch.tensor(sources, device=idx.device))
        finished = sorted(finished, key=lambda f: f[0], reverse=True)[:num_beams]
        # stop once num_beams hypotheses are done and the best alive one can no longer beat
        # them: its sum only falls, but with length_penalty > 0 dividing by a longer length
        # can raise its score, at best to sum / max_new_tokens ** length_penalty
        best_len = max_new_tokens if length_penalty > 0 else step
        if len(finished) == num_beams and normalised(alive_scores[0], best_len) < finished[-1][0]:
            break
    else:  # ran to max_new_tokens: the alive beams are finished hypotheses too
        n_new = beams.size(1) - idx.size(1)
        finished += [(normalised(s, n_new), b) for s, b in zip(scores.tolist(), beams, strict=True)]
    model.train(was_training)
    return max(finished, key=lambda f: f[0])[1][None]
