"""The fine-tuning tasks, made from the poetry corpus and split by poem as it is (a poem of the
test split is never trained on, in pretraining or fine-tuning): Tang or Song (唐诗还是宋诗) for
classification, and four instruction tasks in Chinese for supervised fine-tuning (指令微调), each
with an automatic metric."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from .data import load_poems
from .verse import is_well_formed

REGULAR_FORMS = ("五言绝句", "七言绝句", "五言律诗", "七言律诗")
DYNASTIES = ("唐", "宋")  # class 0 and class 1


def poem_body(poem: dict) -> str:
    """The verses alone, one per line: no title or author, which would give the dynasty away."""
    return "\n".join(poem["paragraphs"])


def dynasty_examples(split: str, per_form: int | None = None,
                     seed: int = 0) -> list[tuple[str, int]]:
    """(poem body, 0 for Tang / 1 for Song), balanced per regular form: as many Tang as Song poems
    of each form (at most `per_form` of each), so that length and shape tell nothing."""
    rng = random.Random(seed)
    examples = []
    for form in REGULAR_FORMS:
        poems = load_poems(split, forms=form)
        by_class = [[p for p in poems if p["dynasty"] == d] for d in DYNASTIES]
        n = min(len(group) for group in by_class)
        n = n if per_form is None else min(n, per_form)
        for label, group in enumerate(by_class):
            examples += [(poem_body(p), label) for p in rng.sample(group, n)]
    rng.shuffle(examples)
    return examples


@dataclass(frozen=True)
class Instruction:
    task: str  # which of the four tasks, for per-task metrics
    prompt: str
    response: str
    form: str  # the poem's form (what a "write" reply must have)


def write_prompt(form: str, title: str) -> str:
    """The "write" task's instruction: 写一首<form>，题目是《<title>》。"""
    return f"写一首{form}，题目是《{title}》。"


def instruction_examples(split: str, per_task: int | None = None,
                         seed: int = 0) -> list[Instruction]:
    """The four instruction tasks, made from the regular poems of one split (one example per
    task and poem, at most `per_task` per task), prompts in Chinese."""
    rng = random.Random(seed)
    poems = load_poems(split, forms=REGULAR_FORMS)
    rng.shuffle(poems)
    tasks: dict[str, list[Instruction]] = {"write": [], "form": [], "next": [], "dynasty": []}
    for p in poems:
        body, lines = poem_body(p), p["paragraphs"]
        form = p["form"]
        tasks["write"].append(Instruction("write", write_prompt(form, p["title"]), body, form))
        tasks["form"].append(Instruction("form", f"这首诗是什么体裁？\n{body}", form, form))
        i = rng.randrange(len(lines) - 1) if len(lines) > 1 else None
        if i is not None:
            tasks["next"].append(Instruction(
                "next", f"《{p['title']}》中“{lines[i]}”的下一句是什么？", lines[i + 1], form))
        tasks["dynasty"].append(Instruction("dynasty", f"这首诗是唐诗还是宋诗？\n{body}",
                                            f"{p['dynasty']}诗", form))
    out = [ex for group in tasks.values() for ex in group[:per_task]]
    rng.shuffle(out)
    return out


def score(example: Instruction, reply: str) -> float:
    """How right a reply is, in [0, 1]: a "write" reply must be a well-formed poem of the form
    asked for; the form and the dynasty must match exactly; the next line scores its `char_f1`."""
    if example.task == "write":
        return float(is_well_formed(f"{example.form}\n{reply}", example.form))
    if example.task == "next":
        return char_f1(reply.strip(), example.response)
    return float(reply.strip() == example.response)


def char_f1(prediction: str, reference: str) -> float:
    """Character-overlap F1 (bag of characters), for answers that can be partly right."""
    if not prediction or not reference:
        return float(prediction == reference)
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)
