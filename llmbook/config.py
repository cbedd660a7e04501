"""A training run's config: three TOML tables, `[model]`, `[data]` and `[train]`, checked on load.

Every key has a type and a default (the dataclasses below); an unknown key, a wrong type or an
out-of-range value is a `ConfigError` naming it, before any work starts.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .data import FORMS
from .errors import UserError
from .lora import DEFAULT_TARGETS
from .model import GPTConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class ConfigError(UserError):
    """A training config that cannot be run (unknown key, wrong type, missing file)."""


@dataclass
class ModelSection:
    """The GPT's shape; vocab_size comes from the tokenizer."""
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    dropout: float = 0.0
    bias: bool = True
    vocab_multiple: int = 1  # 64 pads the embedding to whole GPU tiles (chapter 08)


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
    keep_every: int = 0  # also keep the model's weights every this many steps (0 = off)
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"  # "auto" = llmbook.get_device()
    # "auto" = bfloat16 autocast on a CUDA GPU that has it, float16 (with loss scaling) on one
    # that has not, float32 elsewhere (this CPU has no bf16 hardware: ~20x slower)
    dtype: str = "auto"
    tf32: bool = True  # CUDA only: float32 matmuls on TF32 tensor cores (10-bit mantissa)
    compile: bool = False  # torch.compile the model (falls back to eager, saying why, if it fails)
    fused_adamw: str = "auto"  # "auto" = fused on CUDA; "on" or "off"
    activation_checkpointing: bool = False  # recompute each block in backward: less memory
    tokens_per_step: int = 0  # > 0: grad_accum chosen to reach this global batch in tokens
    parallel: str = "ddp"  # under torchrun (`--nproc N`): "ddp" or "fsdp" (FSDP2, sharded)


class _FromToml:
    """`from_toml` for a config class: read and check the file, then its class's `from_dict`."""

    @classmethod
    def from_toml(cls, path: str | Path):
        return cls.from_dict(_read_toml(path), base_dir=Path(path).parent, source=str(path))


@dataclass
class TrainConfig(_FromToml):
    """A training run: three TOML tables, `[model]`, `[data]` and `[train]`."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    @classmethod
    def from_dict(cls, raw: dict, base_dir: str | Path = ".",
                  source: str = "config") -> TrainConfig:
        """Build and validate; relative `text_file` paths are resolved against `base_dir`."""
        cfg = _sections(cls, raw, source)
        if cfg.data.text_file is not None:
            cfg.data.text_file = _resolve(cfg.data.text_file, base_dir)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Range checks and file checks, so a bad config fails before any work starts."""
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
        ]
        _first_failure(checks, source)
        _check_train(t, source)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BaseSection:
    """The pretrained model to start from."""
    model: str = "poetry-small"  # a shipped name or a .safetensors file (`llmbook export`)


@dataclass
class TaskSection:
    """What to fine-tune for (tasks from the poetry corpus, held out by poem)."""
    kind: str = "classify"  # "classify": Tang or Song (唐/宋); "instruct": the four SFT tasks
    train_examples: int = 4000  # drawn from the train split (0 = all)
    val_examples: int = 400  # drawn from the val split (0 = all)
    pooling: str = "last"  # classify: features of the last token, or the "mean" of all


@dataclass
class MethodSection:
    """Which weights learn: all ("full"), some ("freeze"), or new ones ("lora", "adapter")."""
    kind: str = "full"
    freeze: str = "head"  # kind = "freeze" (classify only): "head" or "last:N" blocks and head
    rank: int = 8  # lora
    alpha: float = 16.0  # lora: the update is scaled by alpha / rank
    dropout: float = 0.0  # lora
    targets: str = DEFAULT_TARGETS  # lora: a regex searched in the linear layers' names
    bottleneck: int = 16  # adapter


@dataclass
class FinetuneConfig(_FromToml):
    """A fine-tuning run: `[base]`, `[task]`, `[method]` and the `[train]` table of pretraining."""
    base: BaseSection = field(default_factory=BaseSection)
    task: TaskSection = field(default_factory=TaskSection)
    method: MethodSection = field(default_factory=MethodSection)
    train: TrainSection = field(default_factory=TrainSection)

    @classmethod
    def from_dict(cls, raw: dict, base_dir: str | Path = ".",
                  source: str = "config") -> FinetuneConfig:
        cfg = _sections(cls, raw, source)
        if cfg.base.model.endswith(".safetensors"):
            cfg.base.model = _resolve(cfg.base.model, base_dir)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        k, m, t = self.task, self.method, self.train
        kinds = ("full", "freeze", "lora", "adapter")
        checks = [
            (k.kind in ("classify", "instruct"),
             f"[task] kind must be 'classify' or 'instruct', not {k.kind!r}"),
            (k.train_examples >= 0 and k.val_examples >= 0,
             "[task] train_examples and val_examples must be >= 0 (0 = all)"),
            (k.pooling in ("last", "mean"), "[task] pooling must be 'last' or 'mean'"),
            (m.kind in kinds, f"[method] kind must be one of {list(kinds)}, not {m.kind!r}"),
            (m.kind != "freeze" or k.kind == "classify",
             "[method] kind = 'freeze' chooses layers under a classification head: it needs "
             "[task] kind = 'classify'"),
            (m.freeze == "head" or m.freeze.startswith("last:"),
             f"[method] freeze must be 'head' or 'last:N', not {m.freeze!r}"),
            (m.rank >= 1 and m.alpha > 0 and 0 <= m.dropout < 1 and m.bottleneck >= 1,
             "[method] need rank >= 1, alpha > 0, 0 <= dropout < 1 and bottleneck >= 1"),
            (t.keep_every == 0, "[train] keep_every snapshots are for pretraining; set it to 0"),
            (t.sample_every == 0 or k.kind == "instruct",
             "[train] sample_every needs [task] kind = 'instruct' (a classifier writes no text)"),
        ]
        _first_failure(checks, source)
        _check_train(t, source)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AlignBaseSection(BaseSection):
    """The instruction-tuned model to align (it must know the chat template's tokens)."""
    model: str = "poetry-small-sft"


@dataclass
class AlignSection:
    """Preference tuning after SFT: DPO on scored pairs or GRPO on rewards (`llmbook.align`)."""
    method: str = "grpo"  # "dpo" or "grpo"
    rewards: dict[str, float] = field(  # llmbook.eval.REWARDS names -> weights of their sum
        default_factory=lambda: {"form": 1.0, "rhyme": 1.0, "tone": 0.5, "unique": 1.0})
    prompts: int = 2000  # "write" prompts from the train split's titles (0 = all)
    val_prompts: int = 64  # from the val split, sampled at every evaluation
    temperature: float = 1.0  # sampling, for pairs, groups and validation
    top_k: int = 0  # 0 = no cut
    max_new_tokens: int = 80
    reference: str | None = None  # the frozen reference model; None = the base model itself
    beta: float = 0.1  # dpo: how strongly the policy is tied to the reference
    samples_per_prompt: int = 4  # dpo: candidates scored per prompt (best and worst kept)
    pairs_file: str | None = None  # dpo: JSON lines {"prompt", "form", "chosen", "rejected"}
    group_size: int = 8  # grpo: samples per prompt, their rewards normalised within the group
    clip_eps: float = 0.2  # grpo: the probability ratio is clipped to [1 - eps, 1 + eps]
    kl_beta: float = 0.04  # grpo: weight of the KL penalty to the reference


@dataclass
class AlignConfig(_FromToml):
    """An alignment run: `[base]` (an instruction-tuned model), `[align]`, `[method]` ("full" or
    "lora") and the `[train]` table of pretraining (batch_size: pairs or prompts per step)."""
    base: AlignBaseSection = field(default_factory=AlignBaseSection)
    align: AlignSection = field(default_factory=AlignSection)
    method: MethodSection = field(default_factory=MethodSection)
    train: TrainSection = field(default_factory=TrainSection)

    @classmethod
    def from_dict(cls, raw: dict, base_dir: str | Path = ".",
                  source: str = "config") -> AlignConfig:
        cfg = _sections(cls, raw, source)
        for section, key in ((cfg.base, "model"), (cfg.align, "reference"),
                             (cfg.align, "pairs_file")):
            value = getattr(section, key)
            if value is not None and (key == "pairs_file" or value.endswith(".safetensors")):
                setattr(section, key, _resolve(value, base_dir))
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        from .eval import REWARDS

        a, m, t = self.align, self.method, self.train
        unknown = sorted(set(a.rewards) - set(REWARDS))
        checks = [
            (a.method in ("dpo", "grpo"), f"[align] method must be 'dpo' or 'grpo', not "
             f"{a.method!r}"),
            (not unknown, f"[align] rewards: no reward called {unknown}; the rewards are "
             f"{sorted(REWARDS)}"),
            (bool(a.rewards) and all(w >= 0 and w == w and w != float("inf")
                                     for w in a.rewards.values()) and any(a.rewards.values()),
             "[align] rewards needs at least one positive weight, and none negative"),
            (a.prompts >= 0 and a.val_prompts >= 1,
             "[align] need prompts >= 0 (0 = all) and val_prompts >= 1"),
            (a.temperature > 0 and a.top_k >= 0 and a.max_new_tokens >= 1,
             "[align] need temperature > 0, top_k >= 0 (0 = off) and max_new_tokens >= 1"),
            (a.beta > 0, f"[align] beta must be > 0 (DPO's tie to the reference), got {a.beta}"),
            (a.samples_per_prompt >= 2, "[align] samples_per_prompt must be >= 2 (a pair needs "
             "a best and a worst)"),
            (a.group_size >= 2, f"[align] group_size must be >= 2: GRPO's advantages compare "
             f"the samples of a group, got {a.group_size}"),
            (0 < a.clip_eps < 1 and a.kl_beta >= 0,
             "[align] need 0 < clip_eps < 1 and kl_beta >= 0"),
            (a.pairs_file is None or a.method == "dpo", "[align] pairs_file is for method = "
             "'dpo'"),
            (a.pairs_file is None or Path(a.pairs_file).is_file(),
             f"[align] pairs_file {a.pairs_file} does not exist"),
            (m.kind in ("full", "lora"), f"[method] kind must be 'full' or 'lora' for "
             f"alignment, not {m.kind!r}"),
            (m.rank >= 1 and m.alpha > 0 and 0 <= m.dropout < 1,
             "[method] need rank >= 1, alpha > 0 and 0 <= dropout < 1"),
            (t.keep_every == 0 and t.sample_every == 0, "[train] keep_every and sample_every "
             "are for pretraining; set them to 0 (alignment samples at every evaluation)"),
        ]
        _first_failure(checks, source)
        _check_train(t, source)

    def to_dict(self) -> dict:
        return asdict(self)


def _first_failure(checks: list[tuple[bool, str]], source: str) -> None:
    """Raise the ConfigError of the first (ok, message) check that failed."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source} {message}")


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
    if origin is dict:
        return isinstance(value, dict) and all(_has_type(k, args[0]) and _has_type(v, args[1])
                                               for k, v in value.items())
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


def _check_train(t: TrainSection, source: str) -> None:
    """The [train] table's range checks, shared by pretraining and fine-tuning configs."""
    checks = [
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
        (t.keep_every >= 0, "[train] keep_every must be >= 0 (0 = keep no snapshots)"),
        (t.sample_every >= 0 and t.sample_tokens >= 1,
         "[train] need sample_every >= 0 (0 = off) and sample_tokens >= 1"),
        (t.sample_every == 0 or t.sample_prompt != "",
         "[train] sample_prompt must not be empty"),
        (t.dtype in ("auto", "float32", "bfloat16", "float16"),
         f"[train] dtype must be 'auto', 'float32', 'bfloat16' or 'float16', not {t.dtype!r}"),
        (t.fused_adamw in ("auto", "on", "off"),
         f"[train] fused_adamw must be 'auto', 'on' or 'off', not {t.fused_adamw!r}"),
        (t.parallel in ("ddp", "fsdp"),
         f"[train] parallel must be 'ddp' or 'fsdp', not {t.parallel!r}"),
        (t.tokens_per_step >= 0, "[train] tokens_per_step must be >= 0 (0 = use grad_accum)"),
        (t.tokens_per_step == 0 or t.grad_accum == 1,
         "[train] give tokens_per_step or grad_accum, not both"),
    ]
    _first_failure(checks, source)
    if t.device != "auto":
        try:
            torch.device(t.device)
        except RuntimeError:
            raise ConfigError(f"{source} [train] device {t.device!r} is not a torch device "
                              "(use 'auto', 'cpu', 'cuda', 'cuda:1', 'mps')") from None


def _read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def _sections(cls: type, raw: dict, source: str) -> Any:
    """A config dataclass from its TOML tables, every table and key checked."""
    sections = {f.name: f.type for f in fields(cls)}
    _reject_unknown(raw, sections, source)
    hints = typing.get_type_hints(cls)
    return cls(**{name: _section(hints[name], raw.get(name, {}), f"{source} [{name}]")
                  for name in sections})


def _resolve(path: str, base_dir: str | Path) -> str:
    """A path from a config, relative to the config file's folder."""
    p = Path(path)
    return str((p if p.is_absolute() else Path(base_dir) / p).resolve())
