"""Training checkpoints and run folders: everything needed to resume a run bit-identically.

A checkpoint is one `torch.save` file of tensors and plain data (model, optimizer, every random
generator's state, config, tokenizer, step) with a sha256 of its content; it loads with
`weights_only=True`, so a file that asks to run code is refused.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import UserError
from .files import atomic_write, remove_stale_temps
from .metrics import METRICS_NAME
from .model import GPT, GPTConfig
from .tokenizer import CharTokenizer

CHECKPOINT_NAME = "ckpt.pt"


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, truncated, corrupted, unsafe, other shape)."""


def rng_states(batch_generator: torch.Generator) -> dict:
    """Every random number generator the loop uses, as tensors and lists (loads weights_only)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": [version, list(mt), gauss],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "batches": batch_generator.get_state(),
    }


def set_rng_states(states: dict, batch_generator: torch.Generator) -> None:
    version, mt, gauss = states["python"]
    random.setstate((version, tuple(mt), gauss))
    n = states["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    batch_generator.set_state(states["batches"])


def _digest(obj: Any, h: Any = None) -> str:
    """sha256 of a checkpoint's content (torch.load does not notice flipped bytes in tensors)."""
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"D")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _digest(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _digest(item, h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write `state` with a sha256 of its content, atomically (`files.atomic_write`): a crash at
    any moment leaves either the old checkpoint or the new one, never half a file."""
    payload = {**state, "sha256": _digest(state)}
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict:
    """Load with `weights_only=True` (tensors and plain data only: no code runs) and verify it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; check the path (training writes "
                              f"OUT_DIR/{CHECKPOINT_NAME})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if found := re.search(r"GLOBAL (\S+)", str(exc)):  # weights_only blocked a callable
            raise CheckpointError(
                f"refused to load {path}: besides tensors and plain data it asks to call "
                f"{found.group(1)}, which could run any code; only load checkpoints written by "
                "`llmbook train` or from a source you trust") from None
        raise CheckpointError(
            f"refused to load {path}: it is corrupted, or it holds more than tensors and plain "
            "data (which could run code). Delete it and resume from an earlier checkpoint, or "
            "train again; only load checkpoints written by `llmbook train`") from None
    except Exception as exc:  # zip/pickle readers raise many types for a damaged file
        raise CheckpointError(
            f"{path} is truncated or corrupted ({type(exc).__name__}); it cannot be loaded. "
            "Delete it and resume from an earlier checkpoint, or train again") from None
    if not isinstance(state, dict) or "sha256" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not an llmbook training checkpoint (no model/sha256 "
                              "entries); use a file written by `llmbook train`")
    expected = state.pop("sha256")
    if _digest(state) != expected:
        raise CheckpointError(f"{path} is corrupted: its content does not match the checksum "
                              "stored in it. Delete it and resume from an earlier checkpoint, "
                              "or train again")
    return state


def load_model_state(model: nn.Module, state_dict: dict, source: str) -> None:
    """`model.load_state_dict`, but a missing key or another shape is a sentence naming it."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit this model: missing tensors {missing[:5]}, "
                              f"unexpected tensors {unexpected[:5]}; it was saved from another "
                              "architecture")
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {tuple(tensor.shape)} but the model built "
                f"from the config wants {tuple(own[name].shape)}; the [model] section (or the "
                "vocabulary) differs from the one the checkpoint was trained with")
    model.load_state_dict(state_dict)


def model_from_checkpoint(state: dict, device: torch.device | str = "cpu"):
    """(GPT, CharTokenizer) from a loaded training checkpoint, in eval mode."""
    tokenizer = CharTokenizer.from_json(state["tokenizer"], source="the checkpoint's tokenizer")
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **state["config"]["model"]))
    load_model_state(model, state["model"], "checkpoint")
    return model.to(device).eval(), tokenizer


def prepare_run_folder(out_dir: Path, resume: str | Path | None, overwrite: bool) -> Path:
    """Create (or check) a run folder; never start over another run, or resume into one, by
    accident. `overwrite` clears the old run's files first."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"the run folder {out_dir} is a file; give --out a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the run folder {out_dir}: {exc.strerror}") from None
    remove_stale_temps(out_dir)  # left by a write that was killed
    ckpt = out_dir / CHECKPOINT_NAME
    run_files = [ckpt, *(out_dir / name for name in (
        METRICS_NAME, "loss.png", "samples.txt",  # and what a fine-tuning run writes at its end
        "finetune.json", "adapter.safetensors", "model.safetensors"))]
    ours = resume is not None and ckpt.exists() and Path(resume).resolve() == ckpt.resolve()
    if any(f.exists() for f in run_files) and not ours:
        if not overwrite:
            held = "a run" if resume is None else f"another run than {resume}'s"
            raise UserError(f"{out_dir} already holds {held}; resume it with --resume {ckpt}, "
                            "replace it with --overwrite, or give another --out")
        for f in [*run_files, *(out_dir / "snapshots").glob("step-*.safetensors")]:
            f.unlink(missing_ok=True)
    return out_dir
