"""int8 weights for CPU inference: torchao's `Int8WeightOnlyConfig` on the blocks' Linear layers.

Each weight is stored as int8 with one float scale per output row, a quarter of its float32
bytes; activations stay float. Why this scheme, from measuring the shipped model on this CPU:
- `torch.ao.quantization.quantize_dynamic` is deprecated (torch points to torchao), and it
  quantizes activations with one scale per tensor, so a token's logits depend on the tokens fed
  with it: greedy decoding with the key-value cache wrote other tokens than without it;
- torchao's int8 dynamic-activation config decoded much more slowly than float on this CPU;
- weight-only int8 decoded about as fast as float (each matmul widens the int8 weight to float:
  a full forward pass is somewhat slower), lost little validation loss (tests/test_quantize.py
  states the bound), and gives the same tokens with and without the cache.
The output layer stays float and tied to the token embedding: quantizing it would untie them and
store that matrix twice (float to embed, int8 to project), a bigger file for no speed we measured.
"""

from __future__ import annotations

import copy
import io
import logging

import torch
import torch.nn as nn

from .errors import UserError
from .model import GPT

# on a CPU-only torch, torchao logs that its CUDA kernels do not load (true, and no concern here)
_loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
_levels = [log.level for log in _loggers]
for log in _loggers:
    log.setLevel(logging.ERROR)
try:
    from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, quantize_
finally:
    for log, level in zip(_loggers, _levels, strict=True):
        log.setLevel(level)


def _in_a_block(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and name.startswith("transformer.h.")


def quantize_int8(model: GPT) -> nn.Module:
    """A copy of `model` in eval mode whose blocks' Linear weights are int8; the original is
    untouched. It is still a GPT (only weights were swapped), so `generate` and its key-value
    cache work as before."""
    if not isinstance(model, GPT):
        raise UserError(f"quantize_int8 quantizes an llmbook GPT, got {type(model).__name__}")
    devices = sorted({str(p.device) for p in model.parameters()})
    if devices != ["cpu"]:
        raise UserError(f"quantize_int8 makes a model for the CPU, but this one is on "
                        f"{', '.join(devices)}; quantize model.cpu() (the original stays put)")
    if any(isinstance(p, Int8Tensor) for p in model.parameters()):
        raise UserError("this model is quantized already; quantize the float model it came from")
    quantized = copy.deepcopy(model).eval()
    # set_inductor_config=False: torchao would otherwise change torch.compile's global settings
    quantize_(quantized, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=_in_a_block)
    return quantized


def state_bytes(model: nn.Module) -> int:
    """The size in bytes of a file of the model's weights (`torch.save` of its state_dict); a
    tensor under two names, as the tied embedding and output layer, is stored once."""
    if not isinstance(model, nn.Module):
        raise UserError(f"state_bytes measures an nn.Module, got {type(model).__name__}")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
