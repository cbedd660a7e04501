"""Parameter-efficient fine-tuning: LoRA (Hu et al., 2021) and bottleneck Adapters (Houlsby et al.,
2019) on a frozen model, and adapter files that hold only what was trained.

LoRA adds a low-rank update to a frozen weight, W x + (alpha / r) B A x, with A (r x in) random and
B (out x r) zero, so the model is unchanged at the start and only r (in + out) numbers per layer
learn. An Adapter adds a small residual MLP, x + up(gelu(down(x))), with `up` zero at the start.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

from .errors import UserError
from .files import atomic_write
from .model import tensors_digest


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (alpha / rank) B A, B zero at first."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise UserError(f"LoRA wraps an nn.Linear, got {type(base).__name__}")
        largest = min(base.in_features, base.out_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= largest:
            raise UserError(f"LoRA rank must be an int in [1, {largest}] for a {base.in_features}"
                            f" -> {base.out_features} layer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.base, self.rank = base, rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) init
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        self.enabled = True  # False: the base layer alone (see `adapters_disabled`)

    def delta_weight(self) -> Tensor:
        """The update the adapter adds to the base weight: (alpha / rank) B A, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.merged or not self.enabled:
            return out
        return out + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: one matmul per layer again, no extra latency."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the base weight again (to train on, or to swap adapters)."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


class Adapter(nn.Module):
    """A bottleneck residual MLP, x + up(gelu(down(x))); `up` starts at zero (the identity)."""

    def __init__(self, n_embd: int, bottleneck: int):
        super().__init__()
        if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
            raise UserError(f"Adapter bottleneck must be a positive int, got {bottleneck!r}")
        self.down = nn.Linear(n_embd, bottleneck)
        self.up = nn.Linear(bottleneck, n_embd)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(F.gelu(self.down(x)))


class WithAdapter(nn.Module):
    """`module` followed by an Adapter on its output (keyword arguments pass through)."""

    def __init__(self, module: nn.Module, adapter: Adapter):
        super().__init__()
        self.module, self.adapter = module, adapter

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.adapter(self.module(x, **kwargs))


DEFAULT_TARGETS = r"attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj"


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
               targets: str = DEFAULT_TARGETS) -> list[str]:
    """Freeze `model` and wrap every nn.Linear whose name matches the regex `targets` (searched,
    so "c_attn" matches every block's) in a LoRALinear; returns the wrapped names."""
    try:
        pattern = re.compile(targets)
    except re.error as exc:
        raise UserError(f"LoRA targets {targets!r} is not a regular expression: {exc}") from None
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and pattern.search(n)]
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise UserError(f"LoRA targets {targets!r} match no linear layer; the model's are e.g. "
                        f"{', '.join(linear[:4])}")
    model.requires_grad_(False)
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return names


def apply_adapters(model: nn.Module, bottleneck: int = 16) -> list[str]:
    """Freeze a GPT and put an Adapter after the attention and the MLP of every block."""
    model.requires_grad_(False)
    names = []
    for i, block in enumerate(model.transformer.h):
        n_embd = block.ln_1.normalized_shape[0]
        for part in ("attn", "mlp"):
            adapter = Adapter(n_embd, bottleneck).to(next(block.parameters()).device)
            setattr(block, part, WithAdapter(getattr(block, part), adapter))
            names.append(f"transformer.h.{i}.{part}")
    return names


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, a tied matrix counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (the layers stay LoRALinear: unmerge works)."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged LoRA update out of its base weight again."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every LoRA layer is its base layer alone: the model before fine-tuning,
    e.g. the reference of preference tuning, without a second copy of the model in memory."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if any(m.merged for m in layers):
        raise UserError("LoRA updates are merged into the base weights: unmerge_lora(model) "
                        "first, or there is no base model left to switch to")
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA update into its base weight and put the plain nn.Linear back: the model
    is again the architecture it started as (e.g. a GPT that `save_pretrained` can write)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
            _replace(model, name, m.base)
    return model


def _peft_config(model: nn.Module) -> dict:
    """How the model was adapted, enough to do it again on a fresh base model."""
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    adapters = [m for m in model.modules() if isinstance(m, Adapter)]
    if lora and adapters or not (lora or adapters):
        raise UserError("the model must carry either LoRA layers or Adapters (apply_lora or "
                        "apply_adapters), and not both, to save its adapter")
    if lora:
        first = next(iter(lora.values()))
        return {"method": "lora", "rank": first.rank, "alpha": first.alpha,
                "targets": "|".join(re.escape(n) + "$" for n in lora)}
    return {"method": "adapter", "bottleneck": adapters[0].down.out_features}


def _trained(model: nn.Module) -> dict[str, Tensor]:
    """The parameters being trained: LoRA or Adapter weights, and any new head."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _base_digest(model: nn.Module) -> str:
    """Digest of the frozen tensors under their original names (LoRA and Adapters unwrapped)."""
    trained = _trained(model)
    return tensors_digest({n.replace(".base.", ".").replace(".module.", "."): t
                           for n, t in model.state_dict().items() if n not in trained})


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write only the trained weights (LoRA or Adapter, and a new head if any) as safetensors,
    with how they were applied and a digest of the frozen base they belong to."""
    if any(isinstance(m, LoRALinear) and m.merged for m in model.modules()):
        raise UserError("unmerge the LoRA layers (unmerge_lora) before saving the adapter")
    config = _peft_config(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in _trained(model).items()}
    meta = {"format": "pt", "llmbook_peft": json.dumps(config, sort_keys=True),
            "llmbook_base_sha256": _base_digest(model)}
    return atomic_write(path, lambda f: f.write(save(tensors, metadata=meta)))


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply a saved adapter to a fresh base model (the one it was trained on) and load it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise UserError(f"{path} is not a safetensors adapter file ({str(exc)[:80]})") from None
    if "llmbook_peft" not in meta:
        raise UserError(f"{path} is not an adapter written by llmbook's save_adapter")
    config = json.loads(meta["llmbook_peft"])
    if config["method"] == "lora":
        apply_lora(model, config["rank"], config["alpha"], targets=config["targets"])
    else:
        apply_adapters(model, config["bottleneck"])
    params = dict(model.named_parameters())
    for name in set(tensors) - set(_trained(model)):  # a new head saved beside the adapter
        if name not in params:
            raise UserError(f"{path} holds {name!r}, which this model does not have: was it "
                            "saved from another kind of model (e.g. with a classification head)?")
        params[name].requires_grad_(True)
    if _base_digest(model) != meta["llmbook_base_sha256"]:
        raise UserError(f"{path} was trained on another base model than this one (the frozen "
                        "weights' digest differs); load it onto the model it was made for")
    trained = _trained(model)
    if set(trained) != set(tensors) or any(trained[k].shape != v.shape
                                           for k, v in tensors.items()):
        raise UserError(f"{path} does not fit this model: it holds {len(tensors)} tensors for "
                        f"the {len(trained)} trainable ones here")
    with torch.no_grad():
        for name, value in tensors.items():
            trained[name].copy_(value)
    return model
