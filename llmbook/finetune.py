"""Fine-tuning a pretrained GPT: a classification head, which layers to train, new tokens for a
chat template, batches whose loss counts only the response, and runs of `llmbook finetune` on the
pretraining loop (the tasks themselves are in `llmbook.tasks`)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm  # text bars: they read "100%|███| n/n" in a notebook saved to the web too

from .checkpoint import load_checkpoint
from .config import FinetuneConfig
from .distributed import world_size
from .env import seed_everything
from .errors import UserError
from .generate import generate
from .lora import apply_adapters, apply_lora, count_parameters, merge_and_unload, save_adapter
from .model import GPT, save_pretrained, tensors_digest
from .pretrained import load_any
from .tasks import DYNASTIES, Instruction, dynasty_examples, instruction_examples, score
from .tokenizer import CharTokenizer
from .train import Task, TrainResult, fit

REPORT_NAME = "finetune.json"  # what a run measured, written beside its checkpoint


# ----------------------------------------------------------------------------- classification

def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids (B, T) and each row's length: a causal model's real tokens never see the
    padding after them, so the last real token's features are the same as without padding."""
    if not seqs or min(len(s) for s in seqs) == 0:
        raise UserError("every sequence in a batch needs at least one token")
    lengths = torch.tensor([len(s) for s in seqs])
    x = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    return x, lengths


class GPTClassifier(nn.Module):
    """A pretrained GPT body with a new linear head on the features of each text's last token
    (which has attended to the whole text), or on their mean (`pooling="mean"`)."""

    def __init__(self, gpt: GPT, n_classes: int, pooling: str = "last"):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise UserError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise UserError(f"n_classes must be an int >= 2, got {n_classes!r}")
        self.gpt, self.pooling, self.n_classes = gpt, pooling, n_classes
        self.head = nn.Linear(gpt.config.n_embd, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) right-padded, `lengths` (B,) (None: no padding) -> class logits (B, C) and
        the cross-entropy against `targets` (B,) when given."""
        h = self.gpt.features(idx)
        if lengths is None:
            lengths = torch.full((idx.size(0),), idx.size(1), device=idx.device)
        lengths = lengths.to(idx.device)
        if self.pooling == "last":
            pooled = h[torch.arange(idx.size(0), device=idx.device), lengths - 1]
        else:
            mask = torch.arange(idx.size(1), device=idx.device)[None, :] < lengths[:, None]
            pooled = (h * mask[..., None]).sum(1) / lengths[:, None]
        logits = self.head(pooled)
        if targets is None:
            return logits, None
        if targets.dim() != 1 or targets.size(0) != idx.size(0):
            raise UserError(f"targets must be one class per text, shape ({idx.size(0)},), got "
                            f"{tuple(targets.shape)}")
        if ((targets < 0) | (targets >= self.n_classes)).any():
            bad = targets[(targets < 0) | (targets >= self.n_classes)][0].item()
            raise UserError(f"label {bad} is outside the classes 0..{self.n_classes - 1}")
        return logits, F.cross_entropy(logits, targets)


def freeze(model: GPTClassifier, strategy: str) -> int:
    """Choose what trains: "head" (the GPT frozen), "last:N" (the head, the final LayerNorm and
    the last N blocks) or "all" (full fine-tuning). Returns the number of trainable parameters."""
    gpt = model.gpt
    if strategy == "all":
        model.requires_grad_(True)
    elif strategy == "head" or strategy.startswith("last:"):
        n = 0
        if strategy != "head":
            try:
                n = int(strategy.removeprefix("last:"))
            except ValueError:
                n = -1
            if not 1 <= n <= gpt.config.n_layer:
                raise UserError(f"freeze strategy {strategy!r}: N must be in 1.."
                                f"{gpt.config.n_layer} (the model's blocks)")
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        if n:
            gpt.transformer.ln_f.requires_grad_(True)
            for block in gpt.transformer.h[-n:]:
                block.requires_grad_(True)
    else:
        raise UserError(f"unknown freeze strategy {strategy!r}; use 'head', 'last:N' or 'all'")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- new tokens

def add_tokens(model: GPT, tokenizer: CharTokenizer,
               tokens: tuple[str, ...]) -> tuple[GPT, CharTokenizer]:
    """Append `tokens` to the vocabulary and rows to the (tied) embedding, every existing row
    unchanged. A new row is drawn around the old rows' mean, with their spread per dimension: a
    typical embedding, and one distinct from the other new rows even if it is never trained."""
    new_tok = tokenizer.with_tokens(tokens)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model "
                        f"{model.config.vocab_size}: they do not belong together")
    old = model.transformer.wte.weight[:model.config.vocab_size]  # not any padding rows
    wte = nn.Embedding(new_tok.vocab_size, old.size(1), device=old.device, dtype=old.dtype)
    with torch.no_grad():
        wte.weight[:len(old)] = old
        wte.weight[len(old):] = old.mean(0) + old.std(0) * torch.randn(len(tokens), old.size(1),
                                                                       device=old.device)
    model.transformer.wte = wte
    model.lm_head = nn.Linear(old.size(1), new_tok.vocab_size, bias=False, device=old.device)
    model.lm_head.weight = wte.weight  # still tied
    model.config = replace(model.config, vocab_size=new_tok.vocab_size, vocab_multiple=1)
    return model, new_tok


# ----------------------------------------------------------------------------- instructions

USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (USER, ASSISTANT, END)


def encode_chat(tokenizer: CharTokenizer, prompt: str,
                response: str | None = None) -> tuple[list[int], int]:
    """<|user|> prompt <|assistant|> response <|end|> as ids, and the prompt's length (up to and
    including <|assistant|>). Without `response`: the prompt alone, ready for generation."""
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.stoi]
    if missing:
        raise UserError(f"the tokenizer lacks the chat template's tokens {missing}: add them "
                        "with llmbook.finetune.add_tokens(model, tokenizer, CHAT_TOKENS)")
    if not prompt:
        raise UserError("an instruction needs a prompt")
    s = tokenizer.stoi
    ids = [s[USER]] + tokenizer.encode(prompt) + [s[ASSISTANT]]
    n_prompt = len(ids)
    if response is not None:
        if not response:
            raise UserError(f"the instruction {prompt[:30]!r} has an empty response: there "
                            "would be nothing to learn from it")
        ids += tokenizer.encode(response) + [s[END]]
    return ids, n_prompt


def sft_batch(examples: list[tuple[list[int], int]], pad_id: int,
              block_size: int) -> tuple[Tensor, Tensor]:
    """(x, y) for next-token training on (ids, prompt length) pairs: y is x shifted by one, with
    -100 (ignored by the loss) on the prompt and on the padding, so only responses are learned."""
    longest = max(len(ids) for ids, _ in examples)
    if longest - 1 > block_size:
        raise UserError(f"an example is {longest} tokens long, more than the context of "
                        f"{block_size} + 1; drop it or shorten it")
    T = longest - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(ids[1:])
        y[i, :n_prompt - 1] = -100  # position t predicts token t+1: the first response token
    return x, y                     # is predicted at position n_prompt - 1, so keep that one


@torch.no_grad()
def answer(model: GPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int = 100,
           **sampling) -> str:
    """An instruction-tuned model's reply to `prompt`, up to <|end|> (greedy unless `sampling`
    gives e.g. temperature=0.8, top_k=50, generator=g), kept within the context."""
    ids, n_prompt = encode_chat(tokenizer, prompt)
    room = model.config.block_size - n_prompt
    if room < 1:
        raise UserError(f"the prompt in its chat template is {n_prompt} tokens long, leaving no "
                        f"room for a reply in the model's context of {model.config.block_size}; "
                        "shorten it")
    device = next(model.parameters()).device
    out = generate(model, torch.tensor([ids], device=device), min(max_new_tokens, room),
                   temperature=sampling.pop("temperature", 0.0),
                   stop_token=tokenizer.stoi[END], **sampling)[0, n_prompt:].tolist()
    end = tokenizer.stoi[END]
    return tokenizer.decode(out[:out.index(end)] if end in out else out)


def score_replies(model: GPT, tokenizer: CharTokenizer, examples: list[Instruction],
                  max_new_tokens: int = 100, progress: bool = False
                  ) -> tuple[dict[str, float], list[str]]:
    """Greedy replies to `examples` and their mean `tasks.score` per task (`generate` runs the
    model in eval mode): the before-and-after table of instruction tuning."""
    replies = [answer(model, tokenizer, e.prompt, max_new_tokens)
               for e in tqdm(examples, desc="replies", disable=not progress, mininterval=5)]
    scores: dict[str, list[float]] = {}
    for e, reply in zip(examples, replies, strict=True):
        scores.setdefault(e.task, []).append(score(e, reply))
    return {task: sum(v) / len(v) for task, v in scores.items()}, replies


# ----------------------------------------------------------------------------- runs

def _first(examples: list, n: int) -> list:
    return examples if n == 0 else examples[:n]


def _classify_batch(rows: list[tuple[list[int], int]], pad_id: int) -> tuple[Tensor, ...]:
    x, lengths = pad_batch([ids for ids, _ in rows], pad_id)
    return x, torch.tensor([label for _, label in rows]), lengths


def _data(cfg: FinetuneConfig, tokenizer: CharTokenizer, block_size: int):
    """(train rows, val rows, rows -> batch) for the config's task, encoded once."""
    k, seed, pad = cfg.task, cfg.train.seed, tokenizer.unk_id
    if k.kind == "classify":
        def rows(split: str, n: int) -> list:
            return [(tokenizer.encode(text)[:block_size], label)
                    for text, label in _first(dynasty_examples(split, seed=seed), n)]
        return (rows("train", k.train_examples), rows("val", k.val_examples),
                lambda batch: _classify_batch(batch, pad))

    def chats(split: str, n: int) -> list:  # examples longer than the context are left out
        encoded = []
        for e in instruction_examples(split, seed=seed):
            ids, n_prompt = encode_chat(tokenizer, e.prompt, e.response)
            if len(ids) <= block_size + 1:
                encoded.append((ids, n_prompt))
            if len(encoded) == n:
                break
        return encoded
    return (chats("train", k.train_examples), chats("val", k.val_examples),
            lambda batch: sft_batch(batch, pad, block_size))


def _apply_method(model: nn.Module, cfg: FinetuneConfig) -> None:
    """Freeze, or add LoRA or Adapters; a classification head always trains."""
    m = cfg.method
    if m.kind == "freeze":
        freeze(model, m.freeze)
    elif m.kind == "lora":
        apply_lora(model, m.rank, m.alpha, m.dropout, m.targets)
    elif m.kind == "adapter":
        apply_adapters(getattr(model, "gpt", model), m.bottleneck)
    if isinstance(model, GPTClassifier):
        model.head.requires_grad_(True)


def finetuning_task(cfg: FinetuneConfig, state: dict | None = None, source: str = "") -> Task:
    """The model `cfg` describes (the base, a head or the chat tokens, the method) and batches
    of its task, for `llmbook.train.fit`."""
    base, tokenizer, _ = load_any(cfg.base.model)
    base_sha256 = tensors_digest(base.state_dict())
    if state is not None and state.get("base_sha256") != base_sha256:
        raise UserError(f"{source} was fine-tuned from another base model than "
                        f"{cfg.base.model!r} (its weights differ): resume with the [base] model "
                        "the run started from")
    generator = seed_everything(cfg.train.seed)  # seeds the new weights; it draws the batches
    if cfg.task.kind == "classify":
        model: nn.Module = GPTClassifier(base, len(DYNASTIES), cfg.task.pooling)
    else:
        model, tokenizer = add_tokens(base, tokenizer, CHAT_TOKENS)
    _apply_method(model, cfg)
    train_rows, val_rows, collate = _data(cfg, tokenizer, base.config.block_size)
    bs = cfg.train.batch_size
    if len(train_rows) < bs or not val_rows:
        raise UserError(f"[task] gives {len(train_rows)} training and {len(val_rows)} validation "
                        f"examples; need at least batch_size = {bs} and 1")

    def draw(batch_size: int, g: torch.Generator) -> tuple[Tensor, ...]:
        picks = torch.randint(len(train_rows), (batch_size,), generator=g).tolist()
        return collate([train_rows[i] for i in picks])

    val_bs = bs * world_size()  # batches of the global batch: any world size validates alike
    val_batches = [collate(val_rows[i:i + val_bs]) for i in range(0, len(val_rows), val_bs)]
    return Task(model, tokenizer, draw, val_batches[:cfg.train.eval_batches], generator,
                {"config": cfg.to_dict(), "base_sha256": base_sha256})


@torch.no_grad()
def predict(model: GPTClassifier, texts: list[str], tokenizer: CharTokenizer,
            batch_size: int = 64) -> list[int]:
    """The most likely class of each text (cut to the model's context), in eval mode."""
    model.eval()
    device, block = next(model.parameters()).device, model.gpt.config.block_size
    classes = []
    for i in range(0, len(texts), batch_size):
        x, lengths = pad_batch([tokenizer.encode(t)[:block] for t in texts[i:i + batch_size]],
                               tokenizer.unk_id)
        classes += model(x.to(device), lengths=lengths.to(device))[0].argmax(-1).tolist()
    return classes


def finetune(cfg: FinetuneConfig, out_dir: str | Path, resume: str | Path | None = None,
             progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Fine-tune (or resume) as `cfg` says, with the loop of pretraining (`llmbook.train.fit`),
    then write what was learned to out_dir: adapter.safetensors for LoRA or Adapters (only the
    new weights and a head), and for an instruction-tuned GPT also model.safetensors, a whole
    model (LoRA merged) that `llmbook generate --checkpoint` loads; and finetune.json, the
    validation loss (and accuracy) and the trainable parameters."""
    state = load_checkpoint(resume) if resume is not None else None
    task = finetuning_task(cfg, state, str(resume))
    result = fit(task, cfg.train, out_dir, resume, state, progress, overwrite)
    model = result.model
    trainable, total = count_parameters(model)
    report = {"val_loss": result.val_loss, "trainable_parameters": trainable,
              "parameters": total, "step": result.step}
    if isinstance(model, GPTClassifier):
        val = _first(dynasty_examples("val", seed=cfg.train.seed), cfg.task.val_examples)
        guesses = predict(model, [text for text, _ in val], task.tokenizer)
        report["val_accuracy"] = sum(g == y for g, (_, y) in zip(guesses, val, strict=True))
        report["val_accuracy"] /= len(val)
    (result.out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    model = model.cpu()
    if cfg.method.kind in ("lora", "adapter"):
        save_adapter(model, result.out_dir / "adapter.safetensors")
    if isinstance(model, GPT) and cfg.method.kind != "adapter":
        save_pretrained(merge_and_unload(copy.deepcopy(model)), result.out_dir /
                        "model.safetensors", tokenizer=task.tokenizer)
    return result
