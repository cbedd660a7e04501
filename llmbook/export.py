"""The GPT's forward pass for other runtimes: a `torch.export` program and an ONNX file that
onnxruntime runs on the CPU, both idx (1, T) -> logits (1, T, vocab) for any T up to the context.

The programs hold no key-value cache and no checks of their own: `GPT._check_ids` reads token
ids back, which it skips while exporting (`torch.compiler.is_compiling()` is true then), so
the ids are checked here, at the boundary, before a program is made or a file is run.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from .errors import UserError
from .files import atomic_write
from .model import GPT

ONNX_PIP = "pip install onnx onnxscript onnxruntime"
ONNX_MAX_BYTES = 2**31  # protobuf's limit for one message: weights past it need a side file


class _Logits(nn.Module):
    """The GPT's forward as idx -> logits alone (no loss, no cache): what the programs compute."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)[0]


def _check_ids(idx: Tensor, block_size: int, vocab_size: int, shortest: int = 1,
               name: str = "idx") -> None:
    """One sequence of token ids (1, T) that the model can read: shortest <= T <= context, and
    every id in the vocabulary."""
    if not isinstance(idx, Tensor) or idx.dtype != torch.long or idx.dim() != 2 \
            or idx.size(0) != 1 or not shortest <= idx.size(1) <= block_size:
        got = (f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, Tensor)
               else type(idx).__name__)
        raise UserError(f"{name} must be one sequence of token ids, a LongTensor (1, T) with "
                        f"{shortest} <= T <= {block_size} (the context), got {got}; e.g. "
                        "torch.tensor([tokenizer.encode(text)])")
    bad = (idx < 0) | (idx >= vocab_size)
    if bad.any():
        pos = tuple(bad.nonzero()[0].tolist())
        raise UserError(f"token id {idx[pos].item()} at position {pos} is outside the "
                        f"vocabulary [0, {vocab_size - 1}]")


def export_program(model: GPT, example: Tensor) -> torch.export.ExportedProgram:
    """`torch.export` of the forward pass in eval mode, idx (1, T) -> logits, traced with
    `example` and valid for every T from 1 to the context; run it with `program.module()(idx)`
    (its guards reject other shapes). The example needs T >= 2: traced with one token,
    torch.export would take the length for a constant."""
    if not isinstance(model, GPT):
        raise UserError(f"export_program exports an llmbook GPT, got {type(model).__name__}")
    device = model.lm_head.weight.device
    if isinstance(example, Tensor) and example.device != device:
        raise UserError(f"example is on {example.device} but the model is on {device}; "
                        f"use example.to('{device}')")
    block_size = model.config.block_size
    _check_ids(example, block_size, model.config.vocab_size, min(2, block_size), "example")
    seq = {1: torch.export.Dim("seq", min=1, max=block_size)} if block_size > 1 else {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(_Logits(model), (example,),
                                       dynamic_shapes={"idx": seq})
    finally:
        model.train(was_training)


def export_onnx(model: GPT, path: str | Path, example: Tensor) -> Path:
    """Write the forward pass (`export_program`) as an ONNX file, atomically, with a dynamic
    sequence axis and the GPT's config in its metadata (so `onnx_logits` can check its input)."""
    try:
        import onnx  # noqa: F401  (torch.onnx needs both; a clear error beats its ImportError)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise UserError(f"exporting to ONNX needs {exc.name}: {ONNX_PIP}") from None
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"the folder {path.parent} does not exist; create it or choose another "
                        "path for the ONNX file")
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file path such as {path / 'model.onnx'}")
    if isinstance(model, GPT) \
            and sum(p.numel() * p.element_size() for p in model.parameters()) >= ONNX_MAX_BYTES:
        raise UserError(f"the model's weights take {ONNX_MAX_BYTES:,} bytes or more, past what "
                        "one ONNX file holds; export a smaller model")
    program = export_program(model, example)
    onnx_log = logging.getLogger("torch.onnx")  # it logs each torchvision op it cannot find
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # and torch's own FutureWarnings: not the learner's
            warnings.simplefilter("ignore", FutureWarning)
            onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    finally:
        onnx_log.setLevel(level)
    onnx_program.model.metadata_props["llmbook_config"] = json.dumps(model.config.to_dict())
    proto = onnx_program.model_proto
    return atomic_write(path, lambda f: f.write(proto.SerializeToString()))


def onnx_logits(path: str | Path, idx: Tensor) -> Tensor:
    """Logits (1, T, vocab) for idx (1, T) from an `export_onnx` file, run by onnxruntime on
    the CPU."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"running an ONNX file needs onnxruntime: {ONNX_PIP}") from None
    if not Path(path).is_file():
        raise UserError(f"no ONNX file at {path}; write one with llmbook.export.export_onnx")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own error types for a file it cannot load
        raise UserError(f"{path} is not an ONNX model onnxruntime can load "
                        f"({str(exc).splitlines()[0][:80]})") from None
    meta = session.get_modelmeta().custom_metadata_map
    if "llmbook_config" not in meta:
        raise UserError(f"{path} has no llmbook config in its metadata, so it was not written by "
                        "llmbook.export.export_onnx")
    config = json.loads(meta["llmbook_config"])
    _check_ids(idx, config["block_size"], config["vocab_size"])
    name = session.get_inputs()[0].name
    (logits,) = session.run(None, {name: idx.cpu().numpy()})
    return torch.from_numpy(logits)
