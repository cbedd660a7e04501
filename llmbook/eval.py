"""Measuring a language model: loss and perplexity, baselines, and the poem-form check.

`python -m llmbook.eval [CHECKPOINT_OR_NAME]` prints the targets of the shipped poetry model:
val loss next to the uniform and unigram baselines, and the well-formed rate of sampled poems.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import nn

CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
# form -> (characters per sentence, sentences); a couplet is two sentences
FORM_SHAPES = {"五言绝句": (5, 4), "七言绝句": (7, 4), "五言律诗": (5, 8), "七言律诗": (7, 8)}


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable, device: torch.device | str,
              max_batches: int | None = None) -> float:
    """Mean next-token cross-entropy (nats) over (x, y) batches, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        _, loss = model(x.to(device), y.to(device))
        total += loss.item()
        n += 1
    model.train(was_training)
    if n == 0:
        raise ValueError("no batches to evaluate: the loader is empty (is the text shorter than "
                         "block_size + 1 tokens?) or max_batches is 0")
    return total / n


def perplexity(model: nn.Module, batches: Iterable, device: torch.device | str,
               max_batches: int | None = None) -> float:
    """exp(mean loss): the number of equally likely tokens the model is as unsure as."""
    return exp_loss(mean_loss(model, batches, device, max_batches))


def exp_loss(loss: float) -> float:
    """Perplexity from a loss in nats; inf instead of an OverflowError for a diverged model."""
    return math.exp(loss) if loss < 700 else math.inf


def baselines(tokens: Sequence[int] | torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Losses a model should beat: uniform guessing, ln V, and the unigram entropy of `tokens`."""
    counts = Counter(tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)
    total = sum(counts.values())
    if total == 0:
        raise ValueError("baselines need at least one token")
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    return {"uniform": math.log(vocab_size), "unigram": entropy}


def _body(text: str) -> list[str]:
    """The lines after the header line, up to the first blank line (or the end of the text)."""
    lines = text.split("\n")[1:]
    return lines[:lines.index("")] if "" in lines else lines


def is_well_formed(text: str, form: str) -> bool:
    """True if the poem `text` (header line, then verse lines) has the shape `form` demands.

    A 五言/七言 绝句/律诗 has 4/8 sentences of exactly 5/7 characters. As in the corpus, every
    verse line is one couplet: a sentence, "，", a sentence, "。" ("？" or "！" may end either).
    """
    if form not in FORM_SHAPES:
        raise ValueError(f"is_well_formed checks {list(FORM_SHAPES)}, not {form!r} (词 and 其他 "
                         "have no fixed shape)")
    n_chars, n_sentences = FORM_SHAPES[form]
    couplet = re.compile(rf"[{CJK}]{{{n_chars}}}[，？！][{CJK}]{{{n_chars}}}[。？！]")
    body = _body(text)
    return len(body) == n_sentences // 2 and all(couplet.fullmatch(line) for line in body)


def well_formed_rate(model: nn.Module, tokenizer, forms: Iterable[str], titles: Sequence[str],
                     n: int = 40, seed: int = 0, temperature: float = 0.8,
                     top_k: int | None = 50) -> dict:
    """Sample `n` poems per form from header prompts `poem_header(form, title)` and check them.

    Titles are used in order (cycling), skipping those with characters outside the vocabulary.
    Returns {form: {"n", "well_formed", "rate", "samples"}}.
    """
    from .data import poem_header
    from .generate import generate

    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    results = {}
    for form in forms:
        n_chars, n_sentences = FORM_SHAPES.get(form, (None, None))
        if n_chars is None:
            raise ValueError(f"well_formed_rate checks {list(FORM_SHAPES)}, not {form!r}")
        # the author's name and its newline, the verse lines, the blank line, and some slack
        budget = 12 + n_sentences // 2 * (2 * n_chars + 3) + 2
        prompts = [poem_header(form, t) for t in titles
                   if all(c in tokenizer.stoi for c in t)
                   and len(poem_header(form, t)) + budget <= model.config.block_size]
        if not prompts:
            raise ValueError("none of the titles fits: each must use only characters in the "
                             "vocabulary and leave room for a poem in the model's context")
        samples, good = [], 0
        for i in range(n):
            prompt = prompts[i % len(prompts)]
            ids = tokenizer.encode(prompt)
            idx = torch.tensor([ids], dtype=torch.long, device=device)
            out = generate(model, idx, budget, temperature=temperature, top_k=top_k, generator=g)
            text = prompt + tokenizer.decode(out[0, len(ids):].tolist())
            text = text[:text.index("\n\n") + 2] if "\n\n" in text else text
            samples.append(text)
            good += is_well_formed(text, form)
        results[form] = {"n": n, "well_formed": good, "rate": good / n, "samples": samples}
    return results


def main(argv: list[str] | None = None) -> int:
    """Print the shipped model's targets (or another checkpoint's): losses and well-formed rates."""
    from .data import corpus_text, load_poems
    from .env import get_device
    from .pretrained import load_any
    from .train import document_starts, fixed_batches

    parser = argparse.ArgumentParser(prog="llmbook evaluate", description=main.__doc__)
    parser.add_argument("model", nargs="?", default="poetry-small",
                        help="a pretrained name, a .safetensors file or a training checkpoint")
    parser.add_argument("--n", type=int, default=100, help="poems sampled per form")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--forms", nargs="+", default=list(FORM_SHAPES))
    parser.add_argument("--eval-batches", type=int, default=50)
    parser.add_argument("--show", type=int, default=2, help="sample poems printed per form")
    args = parser.parse_args(argv)

    device = get_device()
    try:
        model, tokenizer, train_config = load_any(args.model, device)
    except (ValueError, FileNotFoundError) as exc:
        print(f"llmbook evaluate: {exc}", file=sys.stderr)
        return 2
    forms = train_config.get("data", {}).get("forms") if train_config else None
    if train_config and train_config.get("data", {}).get("text_file"):
        print("a model trained on a text file: no poetry splits to evaluate on", file=sys.stderr)
        return 2
    block_size = model.config.block_size
    train_ids = torch.tensor(tokenizer.encode(corpus_text("train", forms=forms)))
    val_ids = torch.tensor(tokenizer.encode(corpus_text("val", forms=forms)))
    base = baselines(train_ids, tokenizer.vocab_size)
    print(f"baselines: uniform ln V = {base['uniform']:.4f}, unigram entropy = "
          f"{base['unigram']:.4f} nats/char")
    poem_starts = document_starts(val_ids, tokenizer.stoi["\n"], block_size)
    for windows, starts in (("starting anywhere", None), ("starting at a poem", poem_starts)):
        batches = fixed_batches(val_ids, block_size, 32, args.eval_batches, seed=0, starts=starts)
        val = mean_loss(model, batches, device)
        print(f"val loss, windows {windows}: {val:.4f} nats/char (perplexity {exp_loss(val):.2f})")
    titles = [p["title"] for p in load_poems("test", forms=args.forms)]
    rates = well_formed_rate(model, tokenizer, args.forms, titles, n=args.n, seed=args.seed,
                             temperature=args.temperature, top_k=args.top_k)
    for form, r in rates.items():
        print(f"{form}: {r['well_formed']}/{r['n']} well-formed ({100 * r['rate']:.1f}%)")
        for text in r["samples"][:args.show]:
            print("  " + text.strip().replace("\n", "\n  "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
