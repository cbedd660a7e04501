"""A GPT-2 style language model in the spirit of nanoGPT, plus loading GPT-2 weights and saving.

Pre-LayerNorm blocks, GELU(tanh) MLP, learned positions, input and output embeddings tied.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .attention import CausalSelfAttention, KVCache
from .errors import UserError
from .files import atomic_write

DEBUG = os.environ.get("LLMBOOK_DEBUG", "") not in ("", "0")


def check_context(n_tokens: int, block_size: int) -> None:
    """The one check for a prompt longer than the model's context, used by the model and by
    every decoder (and so by the command line)."""
    if n_tokens > block_size:
        raise UserError(f"the prompt is {n_tokens} tokens long, longer than the model's context "
                        f"of {block_size} tokens; shorten it (or keep its last {block_size})")


@dataclass
class GPTConfig:
    """The sizes of a GPT; the defaults are GPT-2 small (124M)."""

    block_size: int = 1024  # context length in tokens
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    # the embedding has vocab_size rounded up to this many rows (64: GPU matmuls on whole tiles,
    # as nanoGPT's 50304); the extra rows are never a target and the logits leave them out
    vocab_multiple: int = 1

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd",
                     "vocab_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise UserError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head "
                            f"({self.n_head}) so that every head gets n_embd // n_head dimensions")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise UserError(f"GPTConfig.bias must be True or False, got {self.bias!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a dict (e.g. from TOML); unknown keys are an error, missing keys default."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise UserError(f"unknown GPTConfig key(s): {', '.join(unknown)}; "
                            f"valid keys are: {', '.join(valid)}")
        return cls(**d)

    @classmethod
    def gpt2(cls, name: str = "gpt2") -> GPTConfig:
        """The four published GPT-2 sizes: gpt2 (124M), gpt2-medium, gpt2-large, gpt2-xl (1.5B)."""
        sizes = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                 "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
        if name not in sizes:
            raise UserError(f"unknown GPT-2 size {name!r}; choose one of {', '.join(sizes)}")
        n_layer, n_head, n_embd = sizes[name]
        return cls(n_layer=n_layer, n_head=n_head, n_embd=n_embd)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding: vocab_size rounded up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


class MLP(nn.Module):
    """Position-wise feed-forward: expand 4x, GELU (tanh approximation, as GPT-2), project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """A transformer block with pre-LayerNorm residuals: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.block_size,
                                        config.dropout, config.bias)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, explicit: bool = False, cache: KVCache | None = None,
                layer: int = 0, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), explicit=explicit, cache=cache, layer=layer, mask=mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embeddings, n_layer blocks, a final LayerNorm, and a tied output layer."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig, got {type(config).__name__}; "
                            "use GPTConfig.from_dict(d) for a dict")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # padded below
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one matrix, two roles
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth (two additions per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.padded_vocab_size > config.vocab_size:
            # the padding rows (vocab_multiple) are added after every random draw, as zeros: a
            # padded model starts with the unpadded one's weights, and its extra rows stay zero
            rows = config.padded_vocab_size
            tied = nn.Parameter(F.pad(self.lm_head.weight.detach(),
                                      (0, 0, 0, rows - config.vocab_size)))  # rows at the end
            self.lm_head.weight = self.transformer.wte.weight = tied
            self.lm_head.out_features = self.transformer.wte.num_embeddings = rows
        # recompute each block's activations in the backward pass instead of keeping them
        # (training only): less memory for about one more forward's time (chapter 08)
        self.checkpointing = False

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _check_ids(self, idx: Tensor) -> None:
        """Clear errors for inputs that would otherwise fail deep inside torch (or on the GPU).
        Shapes are checked always; id values only on the CPU or with LLMBOOK_DEBUG=1, since
        reading them back from a GPU would stall it on every forward."""
        if not isinstance(idx, Tensor) or idx.dtype not in (torch.long, torch.int32):
            raise TypeError(f"idx must be a LongTensor of token ids, got "
                            f"{getattr(idx, 'dtype', type(idx).__name__)}")
        if idx.dim() != 2 or idx.size(1) == 0:
            raise UserError(f"idx must have shape (batch, time) with time >= 1, got "
                            f"{tuple(idx.shape)}; use idx.unsqueeze(0) for a single sequence")
        check_context(idx.size(1), self.config.block_size)
        if torch.compiler.is_compiling() or idx.is_meta or not (idx.device.type == "cpu"
                                                                 or DEBUG):
            return
        bad = (idx < 0) | (idx >= self.config.vocab_size)
        if bad.any():
            pos = tuple(bad.nonzero()[0].tolist())
            raise UserError(f"token id {idx[pos].item()} at position {pos} is outside the "
                            f"vocabulary [0, {self.config.vocab_size - 1}]; was the text encoded "
                            "with a tokenizer bigger than the model's vocab_size?")

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, explicit: bool = False,
                cache: KVCache | None = None, attention_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) -> logits (B, T, vocab) at every position, and the mean cross-entropy
        against `targets` (B, T) when given (target -100 is ignored), else None.
        `explicit=True` runs the teaching attention and keeps each block's `attn.last_attn`;
        `cache` and `attention_mask` are for generation (see `features`)."""
        logits = self.lm_head(self.features(idx, explicit=explicit, cache=cache,
                                            attention_mask=attention_mask))
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., :self.config.vocab_size]  # padding rows are not tokens
        if targets is None:
            return logits, None
        if targets.shape != idx.shape:
            raise UserError(f"targets must have the shape of idx {tuple(idx.shape)}, "
                            f"got {tuple(targets.shape)}")
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def features(self, idx: Tensor, *, explicit: bool = False, cache: KVCache | None = None,
                 attention_mask: Tensor | None = None) -> Tensor:
        """idx (B, T) -> the final hidden states (B, T, n_embd), after ln_f: what the output layer
        reads, and what a fine-tuning head (e.g. a classifier) reads instead.

        With a `cache` (`new_cache`), idx holds the tokens after the `cache.length` cached ones,
        whose keys and values are reused, and theirs are added. `attention_mask` (B, cached + T),
        True for real tokens and False for the left padding of a batch of prompts of different
        lengths, keeps padding out of attention and starts each row's positions at its first
        real token."""
        self._check_ids(idx)
        if cache is not None and cache.k.size(1) != idx.size(0):
            raise UserError(f"the cache was made for {cache.k.size(1)} sequences, idx has "
                            f"{idx.size(0)}; make one per batch with model.new_cache(batch)")
        past = 0 if cache is None else cache.length
        check_context(past + idx.size(1), self.config.block_size)
        mask, pos = self._mask_and_positions(idx, past, attention_mask)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if recompute:
                x = checkpoint(block, x, explicit, cache, i, mask, use_reentrant=False)
            else:
                x = block(x, explicit=explicit, cache=cache, layer=i, mask=mask)
        if cache is not None:
            cache.length += idx.size(1)
        return self.transformer.ln_f(x)

    @staticmethod
    def _mask_and_positions(idx: Tensor, past: int, attention_mask: Tensor | None
                            ) -> tuple[Tensor | None, Tensor]:
        """The attention mask (None: plain causal) and the positions of idx's tokens."""
        T = idx.size(1)
        keys = torch.arange(past + T, device=idx.device)  # positions of every key, cached first
        causal = keys <= keys[past:, None]  # (T, past + T): query i sees keys up to past + i
        if attention_mask is None:
            return (None if past == 0 else causal), keys[past:]
        if attention_mask.shape != (idx.size(0), past + T) or attention_mask.dtype != torch.bool:
            raise UserError(f"attention_mask must be a bool tensor of shape (batch, cached + new "
                            f"tokens) = {(idx.size(0), past + T)}, got {attention_mask.dtype} "
                            f"{tuple(attention_mask.shape)}")
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        # every query also sees its own key, so that a padding position's row is not empty (an
        # all-masked row is NaN, which would leak through the zero weights of later layers)
        itself = keys == keys[past:, None]
        return (causal & attention_mask[:, None, None, :]) | itself, pos

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty key-value cache for `batch` sequences of up to `max_len` (default: the
        context) positions, on the model's device and in its dtype."""
        c, w = self.config, self.lm_head.weight
        return KVCache(c.n_layer, batch, c.n_head, c.n_embd // c.n_head,
                       max_len or c.block_size, device=w.device, dtype=w.dtype)

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters, the tied matrix counted once. `non_embedding` leaves out the
        position embeddings (as nanoGPT); token embeddings stay, being the output layer too."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def estimate_flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token: 6N for the weights (N = non-embedding
        params) plus 12·n_layer·n_embd·T for attention scores over a context of T (default
        block_size) tokens, as in the PaLM paper's appendix B."""
        T = self.config.block_size if seq_len is None else seq_len
        return 6 * self.num_params() + 12 * self.config.n_layer * self.config.n_embd * T

    @classmethod
    def from_hf_gpt2(cls, state_dict_or_path: dict[str, Tensor] | str | Path,
                     config: GPTConfig | None = None, *, n_head: int | None = None) -> GPT:
        """A GPT holding the weights of a Hugging Face GPT2LMHeadModel (or GPT2Model).

        `state_dict_or_path` is a state dict, a .safetensors file, or a folder holding
        model.safetensors (as transformers' `model.save_pretrained(folder)` writes). Without
        `config`, the sizes come from the tensors (n_layer, n_embd, vocab_size, block_size); the
        number of heads cannot, so it is `n_head`, or read from a config.json beside the file.
        Conv1D weights are transposed into nn.Linear layout; causal-mask buffers are skipped.
        """
        sd, config_json = _read_hf_checkpoint(state_dict_or_path)
        # GPT2LMHeadModel prefixes the body with "transformer."; GPT2Model and hub files may not
        sd = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
              for k, v in sd.items()
              if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        if config is None:
            config = _infer_gpt2_config(sd, config_json, n_head)
        elif n_head is not None and n_head != config.n_head:
            raise UserError(f"n_head={n_head} disagrees with config.n_head={config.n_head}; "
                            "give one or the other")
        model = cls(config)
        target = model.state_dict()
        lm_head = sd.pop("lm_head.weight", None)
        conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight",
                  ".mlp.c_proj.weight")
        new = {}
        for name, ours in target.items():
            if name == "lm_head.weight":
                continue  # tied to transformer.wte.weight
            if name not in sd:
                raise UserError(f"tensor {name!r} is missing from the checkpoint; is it a GPT-2 "
                                f"model with {config.n_layer} layers?")
            theirs = sd.pop(name)
            transpose = name.endswith(conv1d)
            expected = ours.shape[::-1] if transpose else ours.shape
            if theirs.shape != expected:
                raise UserError(f"tensor {name!r} has shape {tuple(theirs.shape)} in the "
                                f"checkpoint but {tuple(expected)} is expected for {config}")
            new[name] = theirs.t() if transpose else theirs
        if sd:
            raise UserError(f"checkpoint has tensors a GPT-2 does not: {', '.join(sorted(sd))}")
        if lm_head is not None and not torch.equal(lm_head, new["transformer.wte.weight"]):
            raise UserError("checkpoint's lm_head.weight differs from transformer.wte.weight; "
                            "llmbook's GPT ties them, so it cannot hold this model")
        new["lm_head.weight"] = new["transformer.wte.weight"]
        model.load_state_dict(new)
        return model


def _read_hf_checkpoint(src: dict[str, Tensor] | str | Path) -> tuple[dict[str, Tensor], dict]:
    """(state dict, contents of a config.json beside the file or {})."""
    if isinstance(src, dict):
        return dict(src), {}
    path = Path(src)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix != ".safetensors" or not path.is_file():
        raise UserError(f"{src} is not a .safetensors file or a folder holding model.safetensors;"
                        " for a model in memory pass model.state_dict()")
    config_file = path.with_name("config.json")
    config_json = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return load_file(path), config_json


def _infer_gpt2_config(sd: dict[str, Tensor], config_json: dict, n_head: int | None) -> GPTConfig:
    for key in ("transformer.wte.weight", "transformer.wpe.weight"):
        if key not in sd:
            raise UserError(f"tensor {key!r} is missing; is this a GPT-2 checkpoint?")
    if config_json.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"config.json has activation_function="
                        f"{config_json['activation_function']!r}; llmbook's GPT uses GELU(tanh)")
    if n_head is None:
        n_head = config_json.get("n_head")
    if n_head is None:
        raise UserError("the number of heads cannot be read from tensor shapes: pass n_head=... "
                        "or config=GPTConfig(...), or put GPT-2's config.json beside the file")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    vocab_size, n_embd = sd["transformer.wte.weight"].shape
    return GPTConfig(block_size=sd["transformer.wpe.weight"].shape[0], vocab_size=vocab_size,
                     n_layer=max(layers, default=-1) + 1, n_head=n_head, n_embd=n_embd,
                     bias="transformer.ln_f.bias" in sd)


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 of named tensors (names, dtypes, shapes and bytes, in name order): stored in a model
    file's metadata, it catches a flipped bit or a half-copied file when the file is loaded."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_pretrained(model: GPT, path: str | Path, tokenizer: Any = None,
                    metadata: dict[str, str] | None = None,
                    state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write the weights to one .safetensors file, atomically, with the config, a digest of the
    tensors (and the tokenizer's JSON, and any other `metadata` strings) in its header. The tied
    output matrix is stored once, and the header's keys are sorted, so the same weights always
    give the same bytes. `state_dict`: the model's weights gathered elsewhere (FSDP's shards)."""
    if not isinstance(model, GPT):
        raise TypeError(f"save_pretrained saves an llmbook GPT, got {type(model).__name__}")
    tensors = {k: v.detach().cpu().contiguous()
               for k, v in (model.state_dict() if state_dict is None else state_dict).items()
               if k != "lm_head.weight"}
    meta = {"format": "pt", "llmbook_config": json.dumps(model.config.to_dict()),
            "llmbook_tensors_sha256": tensors_digest(tensors),
            **({"llmbook_tokenizer": tokenizer.to_json()} if tokenizer is not None else {}),
            **(metadata or {})}
    data = save(tensors, metadata=meta)
    n = int.from_bytes(data[:8], "little")  # safetensors writes its JSON header in hash order
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":"),
                        ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)  # keep the tensor data 8-byte aligned, as safetensors does
    return atomic_write(path, lambda f: f.write(len(header).to_bytes(8, "little") + header
                                                + data[8 + n:]))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a .safetensors file (config, tokenizer, ...), without the tensors."""
    if not Path(path).is_file():
        raise UserError(f"no model file at {path}; check the path (a shipped name such as "
                        "poetry-small, a .safetensors file or a training checkpoint)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a file it cannot read
        raise UserError(f"{path} is not a safetensors model file, or it is truncated "
                        f"({str(exc).splitlines()[0][:80]}); use a file written by "
                        "`llmbook export`") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Read a file written by `save_pretrained` into a new GPT on `device`, checking that its
    tensors fit its config and match the digest stored with them."""
    meta = read_metadata(path)
    if "llmbook_config" not in meta:
        raise UserError(f"{path} has no llmbook config in its metadata, so it was not written by "
                        "save_pretrained; for a Hugging Face GPT-2 file use GPT.from_hf_gpt2")
    config = GPTConfig.from_dict(json.loads(meta["llmbook_config"]))
    try:
        sd = load_file(str(path), device="cpu")
    except Exception as exc:
        raise UserError(f"{path} is truncated or damaged: its tensors cannot be read "
                        f"({str(exc).splitlines()[0][:80]})") from None
    digest = meta.get("llmbook_tensors_sha256")
    if digest is not None and tensors_digest(sd) != digest:
        raise UserError(f"{path} is corrupted: its tensors do not match the digest stored in the "
                        "file (a flipped bit or a half-copied file?); copy or export it again")
    with torch.device(device):
        model = GPT(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for name in sorted(set(expected) | set(sd)):
        if name not in sd:
            raise UserError(f"{path} lacks tensor {name!r} that {config} needs")
        if name not in expected:
            raise UserError(f"{path} has tensor {name!r} that {config} does not have")
        if sd[name].shape != expected[name]:
            raise UserError(f"tensor {name!r} in {path} has shape {tuple(sd[name].shape)} but its "
                            f"config ({config}) needs {tuple(expected[name])}")
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    model.load_state_dict(sd)
    return model
