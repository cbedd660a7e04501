"""Measuring a language model: loss and perplexity, baselines, the poem checks (form, rhyme,
tones) on poems sampled from header prompts (`llmbook evaluate` prints them all for a model
file), and the same checks as rewards for fine-tuning a poem writer."""

from __future__ import annotations

import math
import numbers
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import UserError
from .verse import FORM_SHAPES, is_well_formed, rhyme_check, sentences, tone_check


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable, device: torch.device | str,
              max_batches: int | None = None) -> float:
    """Mean loss (nats) over batches, e.g. (x, y) for next-token cross-entropy, each given to
    the model as `model(*batch)`, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        _, loss = model(*(b.to(device) for b in batch))
        total += loss.item()
        n += 1
    model.train(was_training)
    if n == 0:
        raise UserError("no batches to evaluate: the loader is empty (is the text shorter than "
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
        raise UserError("baselines need at least one token")
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    return {"uniform": math.log(vocab_size), "unigram": entropy}


def sample_poems(model: nn.Module, tokenizer, form: str, titles: Sequence[str], n: int,
                 seed: int = 0, temperature: float = 0.8, top_k: int | None = 50,
                 batch_size: int = 64) -> list[str]:
    """`n` poems sampled from the prompts `poem_header(form, title)`, each cut at its blank line.

    Titles are used in order (cycling), skipping those with characters outside the vocabulary or
    too long to leave room for a poem. Prompts of the same length are decoded together in
    batches (no padding needed), so this is fast enough to measure hundreds of poems.
    """
    from .data import poem_header
    from .generate import generate

    if form not in FORM_SHAPES:
        raise UserError(f"poems can be checked for {list(FORM_SHAPES)}, not {form!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"n must be a positive number of poems, got {n!r}")
    n_chars, n_sentences = FORM_SHAPES[form]
    # the author's name and its newline, the verse lines, the blank line, and some slack
    budget = 12 + n_sentences // 2 * (2 * n_chars + 3) + 2
    prompts = [poem_header(form, t) for t in titles if all(c in tokenizer.stoi for c in t)]
    prompts = [(p, ids) for p in prompts
               if len(ids := tokenizer.encode(p)) + budget <= model.config.block_size]
    if not prompts:
        raise UserError("none of the titles fits: each must use only characters in the "
                        "vocabulary and leave room for a poem in the model's context")
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    by_length = defaultdict(list)  # prompt length -> the samples whose prompt has that length
    for i in range(n):
        by_length[len(prompts[i % len(prompts)][1])].append(i)
    texts = [""] * n
    for length in sorted(by_length):
        rows = by_length[length]
        for b in range(0, len(rows), batch_size):
            chunk = rows[b:b + batch_size]
            idx = torch.tensor([prompts[i % len(prompts)][1] for i in chunk], device=device)
            out = generate(model, idx, budget, temperature=temperature, top_k=top_k, generator=g)
            for i, row in zip(chunk, out.tolist(), strict=True):
                text = prompts[i % len(prompts)][0] + tokenizer.decode(row[length:])
                texts[i] = text[:text.index("\n\n") + 2] if "\n\n" in text else text
    return texts


def well_formed_rate(model: nn.Module, tokenizer, forms: Iterable[str], titles: Sequence[str],
                     n: int = 40, seed: int = 0, temperature: float = 0.8,
                     top_k: int | None = 50) -> dict:
    """Sample `n` poems per form (`sample_poems`) and check their shape.

    Returns {form: {"n", "well_formed", "rate", "samples"}}.
    """
    results = {}
    for form in forms:
        samples = sample_poems(model, tokenizer, form, titles, n, seed, temperature, top_k)
        good = sum(is_well_formed(text, form) for text in samples)
        results[form] = {"n": n, "well_formed": good, "rate": good / n, "samples": samples}
    return results


def poem_figures(model: nn.Module, tokenizer, forms: Iterable[str], titles: Sequence[str],
                 n: int = 100, seed: int = 0, temperature: float = 0.8,
                 top_k: int | None = 50) -> dict:
    """What a poetry model writes for header prompts, form by form and over all ("all"): the
    well-formed rate, the rhyme and tone rates of its well-formed poems (`verse.rhyme_rates`,
    `verse.tone_rates`), the share of their sentences copied verbatim from the train split, and
    the <unk> it wrote."""
    from .verse import train_sentences

    known = train_sentences(list(FORM_SHAPES))
    figures, every = {}, []
    for form in forms:
        samples = sample_poems(model, tokenizer, form, titles, n, seed, temperature, top_k)
        every += [(text, form) for text in samples]
        figures[form] = poem_rates([(text, form) for text in samples], known)
        figures[form]["samples"] = samples
    figures["all"] = poem_rates(every, known)
    return figures


def poem_rates(texts_forms: list[tuple[str, str]], known: frozenset[str] | None = None) -> dict:
    """What `llmbook evaluate` measures on (poem text, form) pairs: the well-formed share; over
    the well-formed poems rhyme and 重韵, tones, the share of sentences found in `known` (default:
    the train split's regular verse) and `distinct_endings`, distinct last characters per
    sentence (a drop means the poems narrow down); the <unk> written."""
    from .verse import copy_rate, rhyme_rates, tone_rates, train_sentences

    if not texts_forms:
        raise UserError("poem_rates needs at least one (text, form) pair")
    known = train_sentences(list(FORM_SHAPES)) if known is None else known
    good = [(t, f) for t, f in texts_forms if is_well_formed(t, f)]
    endings = [s[-1] for t, _ in good for s in sentences(t)]
    return {"n": len(texts_forms), "well_formed": len(good) / len(texts_forms),
            **rhyme_rates(good), **tone_rates(good),
            "copied": copy_rate([t for t, _ in good], known) if good else math.nan,
            "distinct_endings": len(set(endings)) / len(endings) if endings else math.nan,
            "unk": sum(t.count("<unk>") for t, _ in texts_forms)}


def corpus_figures(forms: Iterable[str], seed: int = 0) -> dict:
    """The same measures on the real poems of the test split (the ceiling a model aims at) and
    with their rhyme endings shuffled between poems (chance), form by form and over all."""
    from .data import format_poem, load_poems
    from .verse import chance_rhyme, train_sentences

    known = train_sentences(list(FORM_SHAPES))
    figures, every = {}, []
    for form in [*forms, "all"]:
        if form == "all":
            pairs = every
        else:
            pairs = [(format_poem(p), form) for p in load_poems("test", forms=[form])]
            every += pairs
        figures[form] = {**poem_rates(pairs, known),
                         "chance": chance_rhyme(pairs, seed)["rhyme_no_repeat"]}
    return figures


def evaluate_model(model: nn.Module, tokenizer, forms: Sequence[str], n: int = 100,
                   seed: int = 0, temperature: float = 0.8, top_k: int | None = 50,
                   eval_batches: int = 50) -> dict:
    """Everything `llmbook evaluate` reports for a poetry model: val losses against the
    baselines, and `poem_figures` for held-out titles beside `corpus_figures`."""
    from .data import SlidingWindowDataset, corpus_text, document_starts, fixed_batches, load_poems

    device = next(model.parameters()).device
    block = model.config.block_size
    train_ids = torch.tensor(tokenizer.encode(corpus_text("train", forms=forms)))
    val_ids = torch.tensor(tokenizer.encode(corpus_text("val", forms=forms)))
    val = {}
    for name, starts in (("anywhere", None), ("at_poem", document_starts(
            val_ids, tokenizer.stoi["\n"], block))):
        windows = SlidingWindowDataset(val_ids, block, stride=None if starts is not None else 1,
                                       starts=starts, ignore_id=tokenizer.unk_id)
        val[name] = mean_loss(model, fixed_batches(windows, 32, eval_batches, seed=0), device)
    titles = [p["title"] for p in load_poems("test", forms=forms)]
    return {"baselines": baselines(train_ids, tokenizer.vocab_size), "val_loss": val,
            "model": poem_figures(model, tokenizer, forms, titles, n, seed, temperature, top_k),
            "corpus": corpus_figures(forms, seed), "settings": {
                "n": n, "seed": seed, "temperature": temperature, "top_k": top_k}}


def form_reward(text: str, form: str) -> float:
    """1.0 if the poem `text` has the shape of `form` (`verse.is_well_formed`), else 0.0."""
    return float(is_well_formed(text, form))


def rhyme_reward(text: str, form: str) -> float:
    """1.0 if the poem is well formed and its even sentences rhyme with no 重韵, else 0.0."""
    r = rhyme_check(text, form)
    return float(r.rhymes and not r.repeated)


def tone_reward(text: str, form: str) -> float:
    """The share of the poem's sentences that keep a standard tonal pattern (`verse.tone_check`);
    0.0 for a poem that is not well formed."""
    t = tone_check(text, form)
    return sum(t.matches) / len(t.matches) if t.well_formed else 0.0


def unique_reward(text: str, form: str) -> float:
    """1.0 if the poem is well formed and no character ends two of its sentences, as in 98-100%
    of the test split's regular poems (rhyme alone lets a model reuse its rhyme characters)."""
    if not is_well_formed(text, form):
        return 0.0
    endings = [s[-1] for s in sentences(text)]
    return float(len(set(endings)) == len(endings))


# name -> reward(text, form) in [0, 1]: the checks `llmbook evaluate` reports, for fine-tuning
REWARDS: dict[str, Callable[[str, str], float]] = {
    "form": form_reward, "rhyme": rhyme_reward, "tone": tone_reward, "unique": unique_reward}


def total_reward(text: str, form: str, weights: Mapping[str, float]) -> float:
    """The weighted sum of the `REWARDS` named in `weights` for the poem `text` of `form` (0.0
    for no weights); a weight is a finite number >= 0."""
    for name, weight in weights.items():
        if name not in REWARDS:
            raise UserError(f"unknown reward {name!r}; the rewards are {list(REWARDS)}")
        if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
                or not math.isfinite(weight) or weight < 0):
            raise UserError(f"the weight of reward {name!r} must be a finite number >= 0, got "
                            f"{weight!r}")
    return sum(weight * REWARDS[name](text, form) for name, weight in weights.items())


def format_report(report: dict, show: int = 2) -> str:
    """`evaluate_model`'s figures as the table `llmbook evaluate` prints."""
    def pct(x: float) -> str:
        return "  -  " if math.isnan(x) else f"{100 * x:5.1f}"

    b, v, m, c = report["baselines"], report["val_loss"], report["model"], report["corpus"]
    s = report["settings"]
    lines = [f"baselines: uniform ln V = {b['uniform']:.4f}, unigram entropy = "
             f"{b['unigram']:.4f} nats/char",
             f"val loss: {v['anywhere']:.4f} nats/char (perplexity {exp_loss(v['anywhere']):.2f})"
             f" in windows starting anywhere, {v['at_poem']:.4f} in windows starting at a poem",
             "",
             f"{s['n']} poems per form for held-out titles (seed {s['seed']}, temperature "
             f"{s['temperature']}, top-k {s['top_k']}) beside the test split's real poems; "
             "percentages of well-formed poems",
             "rhyme: the even sentences end in one modern rhyme group (pypinyin finals, an "
             "approximation of the classical rhyme groups) with no character repeated;",
             "chance: the same for the corpus poems with their endings shuffled between poems;",
             "平仄: every sentence keeps one of the four standard tonal patterns (the odd "
             "positions free, 一三五不论);",
             "重韵: a character ends two even sentences; copied: sentences found in the train "
             "split",
             "",
             f"{'form':<6}  {'well-formed':>11}  {'rhyme':>5}  {'corpus':>6}  {'chance':>6}  "
             f"{'平仄':>4}  {'corpus':>6}  {'重韵':>4}  {'corpus':>6}  {'copied':>6}  "
             f"{'corpus':>6}  <unk>"]
    for form, r in m.items():
        k = c[form]
        lines.append(f"{form:<6}  {pct(r['well_formed']):>11}  {pct(r['rhyme_no_repeat']):>5}  "
                     f"{pct(k['rhyme_no_repeat']):>6}  {pct(k['chance']):>6}  "
                     f"{pct(r['tonal']):>6}  {pct(k['tonal']):>6}  "
                     f"{pct(r['repeated']):>6}  {pct(k['repeated']):>6}  {pct(r['copied']):>6}  "
                     f"{pct(k['copied']):>6}  {r['unk']}")
    ratio = m["all"]["rhyme_no_repeat"] / c["all"]["rhyme_no_repeat"]
    tonal = m["all"]["tonal"] / c["all"]["tonal"]
    lines.append(f"\nthe model rhymes at {100 * ratio:.0f}% of the corpus's own rate and keeps "
                 f"the tonal patterns at {100 * tonal:.0f}% of it; "
                 f"<unk> written: {m['all']['unk']} in {m['all']['n']} poems")
    for r in m.values():
        for text in r.get("samples", [])[:show]:
            lines.append("  " + text.strip().replace("\n", "\n  "))
    return "\n".join(lines)
