"""Pretraining a GPT on a text stream: config, data, AdamW + warm-up/cosine, checkpoints, resume.

Read it top to bottom: `TrainConfig` (what to train), `lr_at` (the schedule), `save_checkpoint` /
`load_checkpoint` (everything needed to resume bit-identically), then `train` (the loop).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import re
import tempfile
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .env import get_device, seed_everything
from .eval import exp_loss, mean_loss
from .tokenizer import CharTokenizer

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CHECKPOINT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"


class ConfigError(ValueError):
    """A training config that cannot be run (unknown key, wrong type, missing file)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated, corrupted, unsafe, other shape)."""


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite."""


# ----------------------------------------------------------------------------- config

@dataclass
class ModelSection:
    """The GPT's shape; vocab_size comes from the tokenizer."""
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    dropout: float = 0.0
    bias: bool = True


@dataclass
class DataSection:
    """The poetry corpus (`forms` filters it) or, if `text_file` is set, a UTF-8 text file."""
    text_file: str | None = None  # relative paths are relative to the config file's folder
    forms: list[str] | None = None  # poetry only; None = every form
    min_freq: int = 1  # characters seen fewer times in the train split become <unk>
    val_fraction: float = 0.1  # text_file only: the last fraction of the file is the val split
    # "random": training windows start anywhere; "document": only where a text starts (after a
    # blank line), so every window opens with a header, as generation prompts do
    window_start: str = "random"


@dataclass
class TrainSection:
    """Optimisation, evaluation, sampling and checkpointing knobs."""
    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 turns clipping off
    eval_every: int = 250
    eval_batches: int = 20
    sample_every: int = 0  # 0 turns samples off
    sample_prompt: str = "\n"
    sample_tokens: int = 64
    checkpoint_every: int = 250
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"  # "auto" = llmbook.get_device()
    dtype: str = "auto"  # "auto" = bfloat16 autocast on CUDA when supported, else float32


@dataclass
class TrainConfig:
    """A training run: three TOML tables, `[model]`, `[data]` and `[train]`."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        return cls.from_dict(raw, base_dir=path.parent, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, base_dir: str | Path = ".",
                  source: str = "config") -> TrainConfig:
        """Build and validate; relative `text_file` paths are resolved against `base_dir`."""
        sections = {f.name: f.type for f in fields(cls)}
        _reject_unknown(raw, sections, source)
        hints = typing.get_type_hints(cls)
        cfg = cls(**{name: _section(hints[name], raw.get(name, {}), f"{source} [{name}]")
                     for name in sections})
        if cfg.data.text_file is not None:
            text_file = Path(cfg.data.text_file)
            if not text_file.is_absolute():
                text_file = Path(base_dir) / text_file
            cfg.data.text_file = str(text_file.resolve())
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Range checks and file checks, so a bad config fails before any work starts."""
        from .data import FORMS
        from .model import GPTConfig

        try:
            GPTConfig(vocab_size=1, **asdict(self.model))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source} [model]: {exc}") from None
        d, t = self.data, self.train
        if d.text_file is not None:
            if not Path(d.text_file).is_file():
                raise ConfigError(f"{source} [data] text_file: {d.text_file} does not exist; "
                                  "write the file or fix the path (relative to the config file)")
            if d.forms is not None:
                raise ConfigError(f"{source} [data]: forms only applies to the poetry corpus; "
                                  "remove it or remove text_file")
        if d.forms is not None:
            unknown = [f for f in d.forms if f not in FORMS]
            if unknown or not d.forms:
                raise ConfigError(f"{source} [data] forms: {unknown or 'empty list'} not among "
                                  f"the corpus forms {list(FORMS)}")
        checks = [
            (d.min_freq >= 1, "[data] min_freq must be >= 1"),
            (0 < d.val_fraction < 1, "[data] val_fraction must be between 0 and 1"),
            (d.window_start in ("random", "document"),
             f"[data] window_start must be 'random' or 'document', not {d.window_start!r}"),
            (t.max_steps >= 1, "[train] max_steps must be >= 1"),
            (t.batch_size >= 1 and t.grad_accum >= 1,
             "[train] batch_size and grad_accum must be >= 1"),
            (t.lr > 0 and 0 <= t.min_lr <= t.lr, "[train] need lr > 0 and 0 <= min_lr <= lr"),
            (0 <= t.warmup_steps < t.max_steps, "[train] warmup_steps must be in [0, max_steps)"),
            (t.weight_decay >= 0 and t.grad_clip >= 0,
             "[train] weight_decay and grad_clip must be >= 0"),
            (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "[train] beta1 and beta2 must be in [0, 1)"),
            (min(t.eval_every, t.eval_batches, t.checkpoint_every, t.log_every) >= 1,
             "[train] eval_every, eval_batches, checkpoint_every and log_every must be >= 1"),
            (t.sample_every >= 0 and t.sample_tokens >= 1,
             "[train] need sample_every >= 0 (0 = off) and sample_tokens >= 1"),
            (t.sample_every == 0 or t.sample_prompt != "",
             "[train] sample_prompt must not be empty"),
            (t.dtype in ("auto", "float32", "bfloat16"),
             f"[train] dtype must be 'auto', 'float32' or 'bfloat16', not {t.dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{source} {message}")
        if t.device != "auto":
            try:
                torch.device(t.device)
            except RuntimeError:
                raise ConfigError(f"{source} [train] device {t.device!r} is not a torch device "
                                  "(use 'auto', 'cpu', 'cuda', 'cuda:1', 'mps')") from None

    def to_dict(self) -> dict:
        return asdict(self)


def _reject_unknown(raw: dict, valid: dict, where: str) -> None:
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(valid)}")


def _section(cls: type, raw: Any, where: str) -> Any:
    """One TOML table -> its dataclass, checking every key's name and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    _reject_unknown(raw, hints, where)
    for key, value in raw.items():
        if not _has_type(value, hints[key]):
            raise ConfigError(f"{where} {key} = {value!r} has the wrong type: expected "
                              f"{_type_name(hints[key])}, got {type(value).__name__}")
    values = {k: float(v) if hints[k] is float else v for k, v in raw.items()}
    return cls(**values)


def _has_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if args:  # a union such as `str | None`
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


# ----------------------------------------------------------------------------- schedule

def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def schedule(cfg: TrainSection) -> dict:
    """`lr_at`'s keyword arguments from a config: `lr_at(step, **schedule(cfg.train))`."""
    return {"lr": cfg.lr, "min_lr": cfg.min_lr, "warmup_steps": cfg.warmup_steps,
            "max_steps": cfg.max_steps}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, LayerNorm weights or embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights (lm_head = wte) appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- data

def load_data(cfg: TrainConfig, tokenizer: CharTokenizer | None = None):
    """(tokenizer, train ids, val ids); the tokenizer is built from the train split if not given."""
    d = cfg.data
    if d.text_file is not None:
        text = Path(d.text_file).read_text(encoding="utf-8")
        cut = int(len(text) * (1 - d.val_fraction))
        train_text, val_text = text[:cut], text[cut:]
    else:
        from .data import corpus_text
        train_text = corpus_text("train", forms=d.forms)
        val_text = corpus_text("val", forms=d.forms)
    if tokenizer is None:
        tokenizer = CharTokenizer.from_text(train_text, min_freq=d.min_freq)
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    need = cfg.model.block_size + 1
    for name, ids in (("train", train_ids), ("val", val_ids)):
        if len(ids) < need:
            raise ConfigError(f"the {name} split has {len(ids)} tokens but block_size "
                              f"{cfg.model.block_size} needs at least {need}; use more text or a "
                              "smaller block_size (or a larger val_fraction)")
    return tokenizer, train_ids, val_ids


def document_starts(ids: torch.Tensor, newline_id: int, block_size: int) -> torch.Tensor:
    """Offsets where a text starts (0, and right after each blank line) with a full window left."""
    blank = (ids[:-1] == newline_id) & (ids[1:] == newline_id)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), blank.nonzero()[:, 0] + 2])
    return starts[starts <= len(ids) - block_size - 1]


def get_batch(ids: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator,
              starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of the token stream: inputs x and next-token targets y.

    Windows begin anywhere, or only at the offsets in `starts` (e.g. `document_starts`)."""
    if starts is None:
        offsets = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)
    else:
        offsets = starts[torch.randint(len(starts), (batch_size,), generator=generator)]
    x = torch.stack([ids[s:s + block_size] for s in offsets.tolist()])
    y = torch.stack([ids[s + 1:s + 1 + block_size] for s in offsets.tolist()])
    return x, y


def fixed_batches(ids: torch.Tensor, block_size: int, batch_size: int, n: int, seed: int,
                  starts: torch.Tensor | None = None):
    """The same `n` batches every time it is called: evaluations compare like with like."""
    g = torch.Generator().manual_seed(seed)
    return [get_batch(ids, block_size, batch_size, g, starts) for _ in range(n)]


# ----------------------------------------------------------------------------- tokenizer <-> text

def tokenizer_to_json(tokenizer: CharTokenizer) -> str:
    """The tokenizer's own JSON file as a string (to store inside checkpoints)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        tokenizer.save(path)
        return path.read_text(encoding="utf-8")


def tokenizer_from_json(text: str) -> CharTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(text, encoding="utf-8")
        return CharTokenizer.load(path)


# ----------------------------------------------------------------------------- checkpoints

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
    """Write atomically: temp file in the same folder, fsync, rename over `path`, fsync the folder.

    A crash at any moment leaves either the old checkpoint or the new one, never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**state, "sha256": _digest(state)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


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
    from .model import GPT, GPTConfig

    tokenizer = tokenizer_from_json(state["tokenizer"])
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **state["config"]["model"]))
    load_model_state(model, state["model"], "checkpoint")
    return model.to(device).eval(), tokenizer


# ----------------------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    model: nn.Module
    tokenizer: CharTokenizer
    step: int
    val_loss: float | None
    checkpoint: Path
    out_dir: Path


def _autocast(device: torch.device, dtype: str):
    """bfloat16 mixed precision when asked for, or by default on a CUDA GPU that supports it."""
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"
                                       and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _diverged(step: int, what: str, value: float, checkpoint: Path | None) -> TrainingDiverged:
    kept = (f"the last good checkpoint is {checkpoint}" if checkpoint is not None and
            checkpoint.exists() else "no checkpoint was written yet")
    return TrainingDiverged(
        f"training diverged at step {step}: the {what} is {value}. Likely causes: the learning "
        "rate is too high (lower [train] lr or lengthen warmup_steps), float16 overflow (use "
        "bfloat16 or float32), or bad data (check the text file). Training stopped without saving; "
        f"{kept}.")


def _write_metrics(path: Path, rows: list[dict], mode: str) -> None:
    with open(path, mode, encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _resumed_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint's step (written by a run that was killed later)."""
    if path.exists():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        _write_metrics(path, [r for r in rows if r["step"] <= step], "w")


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Train and val loss against step, from the metrics log."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines()
            if line]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], label="train", lw=1)
    val = [r for r in rows if r.get("val_loss") is not None]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val", ms=3)
    ax.set(xlabel="step", ylabel="cross-entropy loss (nats)", title="training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)


def sample_text(model: nn.Module, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int,
                seed: int, device: torch.device, temperature: float = 0.8,
                top_k: int | None = 50) -> str:
    """Decode a continuation of `prompt` (fixed seed, so samples across steps are comparable)."""
    from .generate import generate

    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=g)
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())


def train(cfg: TrainConfig, out_dir: str | Path, resume: str | Path | None = None,
          progress: bool = True) -> TrainResult:
    """Train (or resume) the model `cfg` describes; checkpoints, metrics and plots go to out_dir."""
    from .model import GPT, GPTConfig

    t = cfg.train
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out_dir / CHECKPOINT_NAME, out_dir / METRICS_NAME
    device = get_device(None if t.device == "auto" else t.device)

    state = load_checkpoint(resume) if resume is not None else None
    tokenizer = tokenizer_from_json(state["tokenizer"]) if state else None
    tokenizer, train_ids, val_ids = load_data(cfg, tokenizer)
    if t.sample_every:
        missing = sorted({c for c in t.sample_prompt if c not in tokenizer.stoi})
        if missing:
            raise ConfigError(f"[train] sample_prompt has characters the vocabulary lacks: "
                              f"{missing}; change the prompt")

    batches = seed_everything(t.seed)  # seeds the model's init; its generator draws the windows
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **asdict(cfg.model))).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr,
                                  betas=(t.beta1, t.beta2))
    step, tokens, elapsed = 0, 0, 0.0
    if state is not None:
        load_model_state(model, state["model"], str(resume))
        optimizer.load_state_dict(state["optimizer"])
        set_rng_states(state["rng"], batches)
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed"]
        _resumed_metrics(metrics_path, step)
    elif metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log

    starts = val_starts = None  # None: windows start anywhere
    if cfg.data.window_start == "document":  # val windows start like the training ones
        newline = tokenizer.stoi.get("\n", -1)
        starts = document_starts(train_ids, newline, cfg.model.block_size)
        val_starts = document_starts(val_ids, newline, cfg.model.block_size)
        if len(starts) == 0 or len(val_starts) == 0:
            raise ConfigError("[data] window_start = 'document' needs texts separated by blank "
                              "lines, and a split has none with a full window left")
    val_batches = fixed_batches(val_ids, cfg.model.block_size, t.batch_size, t.eval_batches,
                                seed=t.seed + 1, starts=val_starts)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.block_size
    last_ckpt = Path(resume) if state is not None else None
    val_loss, pending = (state or {}).get("val_loss"), []
    bar = tqdm(total=t.max_steps, initial=step, disable=not progress, desc="train",
               mininterval=1.0, dynamic_ncols=True)
    model.train()
    start = time.perf_counter() - elapsed
    while step < t.max_steps:
        lr = lr_at(step, **schedule(t))
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for _ in range(t.grad_accum):
            x, y = get_batch(train_ids, cfg.model.block_size, t.batch_size, batches, starts)
            x, y = x.to(device), y.to(device)
            with _autocast(device, t.dtype):
                _, loss = model(x, y)
            value = loss.item()
            if not math.isfinite(value):
                bar.close()
                raise _diverged(step + 1, "loss", value, last_ckpt)
            (loss / t.grad_accum).backward()
            step_loss += value / t.grad_accum
        norm = (nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip > 0
                else None)
        if norm is not None and not torch.isfinite(norm):
            bar.close()
            raise _diverged(step + 1, "gradient norm", norm.item(), last_ckpt)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        pending.append(step_loss)
        elapsed = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):,.0f}",
                        refresh=False)

        evaluate = step % t.eval_every == 0 or step == t.max_steps
        if step % t.log_every == 0 or evaluate:
            row = {"step": step, "lr": lr, "train_loss": sum(pending) / len(pending),
                   "val_loss": None, "tokens": tokens, "elapsed": round(elapsed, 3)}
            if evaluate:
                val_loss = mean_loss(model, val_batches, device)
                if not math.isfinite(val_loss):
                    bar.close()
                    raise _diverged(step, "validation loss", val_loss, last_ckpt)
                row["val_loss"] = val_loss
                bar.write(f"step {step}: train loss {row['train_loss']:.4f}, val loss "
                          f"{val_loss:.4f} (perplexity {exp_loss(val_loss):.2f})")
            _write_metrics(metrics_path, [row], "a")
            pending = []
            if evaluate:
                plot_losses(metrics_path, out_dir / "loss.png")
        if t.sample_every and (step % t.sample_every == 0 or step == t.max_steps):
            text = sample_text(model, tokenizer, t.sample_prompt, t.sample_tokens, t.seed, device)
            bar.write(f"--- sample at step {step} ---\n{text}\n---")
            with open(out_dir / "samples.txt", "a", encoding="utf-8") as f:
                f.write(f"--- step {step} ---\n{text}\n")
        if step % t.checkpoint_every == 0 or step == t.max_steps:
            save_checkpoint(ckpt_path, {
                "step": step, "tokens": tokens, "elapsed": elapsed, "val_loss": val_loss,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "config": cfg.to_dict(), "tokenizer": tokenizer_to_json(tokenizer),
                "rng": rng_states(batches)})
            last_ckpt = ckpt_path
    bar.close()
    return TrainResult(model.eval(), tokenizer, step, val_loss, ckpt_path, out_dir)
