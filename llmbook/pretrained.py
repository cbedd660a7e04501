"""The course's shipped models: one .safetensors file each in data/, with config and tokenizer.

The file holds only tensors and JSON metadata (safetensors, no pickle), so loading runs no code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, model_from_checkpoint
from .env import DATA_DIR
from .errors import UserError
from .model import GPT, load_model, read_metadata, save_pretrained
from .tokenizer import CharTokenizer

PRETRAINED = {
    "poetry-small": "poetry-small.safetensors",  # pretrained (chapter 07)
    "poetry-small-sft": "poetry-small-sft.safetensors",  # instruction-tuned with LoRA (10, 11)
    "poetry-small-aligned": "poetry-small-aligned.safetensors",  # then GRPO (chapter 13)
}


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write a training checkpoint's model as .safetensors: weights (the tied matrix once), and in
    the metadata the GPT config, the tokenizer and the training config. Byte-identical for the
    same checkpoint, so its sha256 in data/README.md can be checked by exporting again."""
    state = load_checkpoint(checkpoint)
    model, tokenizer = model_from_checkpoint(state)
    return save_pretrained(model, out, tokenizer=tokenizer, metadata={
        "llmbook_train_config": json.dumps(state["config"], ensure_ascii=False),
        "llmbook_step": str(state["step"])})


def load_safetensors(path: str | Path, device: torch.device | str = "cpu"):
    """(GPT, CharTokenizer, training config dict) from a file written by `save_pretrained` with
    a tokenizer (as `export_checkpoint` and training snapshots are)."""
    meta = read_metadata(path)
    if "llmbook_tokenizer" not in meta:
        raise UserError(f"{path} has no tokenizer in its metadata; it was not written by "
                        "llmbook export (or save_pretrained with a tokenizer)")
    model = load_model(path, device=device).eval()
    tokenizer = CharTokenizer.from_json(meta["llmbook_tokenizer"], source=str(path))
    return model, tokenizer, json.loads(meta.get("llmbook_train_config", "{}"))


def load_pretrained(name: str = "poetry-small",
                    device: torch.device | str = "cpu") -> tuple[GPT, CharTokenizer]:
    """A shipped model and its tokenizer, e.g. `model, tok = load_pretrained("poetry-small")`."""
    if name not in PRETRAINED:
        raise UserError(f"unknown pretrained model {name!r}; available: {sorted(PRETRAINED)}")
    path = DATA_DIR / PRETRAINED[name]
    if not path.is_file():
        raise UserError(f"{path} is missing; restore it with `git checkout -- data/"
                        f"{PRETRAINED[name]}`")
    model, tokenizer, _ = load_safetensors(path, device)
    return model, tokenizer


def load_any(spec: str | Path, device: torch.device | str = "cpu"):
    """(model, tokenizer, training config dict) from a pretrained name, a .safetensors file or a
    training checkpoint (`llmbook generate --checkpoint` accepts all three)."""
    if str(spec) in PRETRAINED:
        spec = DATA_DIR / PRETRAINED[str(spec)]
    path = Path(spec)
    if path.suffix == ".safetensors":
        return load_safetensors(path, device)
    state = load_checkpoint(path)
    model, tokenizer = model_from_checkpoint(state, device)
    return model, tokenizer, state["config"]
