"""Where a training step's memory goes, by part: parameters, gradients, AdamW's states and the
activations autograd keeps for backward, per GPU under DDP, ZeRO-1/2 and FSDP (chapter 08).

The activation count is derived from llmbook's GPT op by op and checked against
`measure_saved_bytes`, which counts what autograd really saves in a forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import UserError
from .model import GPT, GPTConfig

# how many of (optimizer states, gradients, parameters) each strategy shards over the GPUs
STRATEGIES = {"single": 0, "ddp": 0, "zero1": 1, "zero2": 2, "fsdp": 3}
GPU_MEMORY = 80 * 2**30  # an 80 GB A100 / H100 (80 GiB; a little of it is not free for tensors)

# GPT-2's four sizes, and GPT-2-shaped stand-ins for 7B and 70B models: a 4x GELU MLP, learned
# positions and a tied 50304-row embedding, not Llama's SwiGLU, RoPE and grouped-query attention;
# "7B" has 6.66e9 parameters, "70B" 64.9e9 (a Llama-2-70B's width and depth, fewer parameters).
SIZES: dict[str, GPTConfig] = {
    **{name: GPTConfig.gpt2(name) for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")},
    "7B": GPTConfig(block_size=4096, vocab_size=50257, vocab_multiple=64, n_layer=32, n_head=32,
                    n_embd=4096),
    "70B": GPTConfig(block_size=4096, vocab_size=50257, vocab_multiple=64, n_layer=80, n_head=64,
                     n_embd=8192),
}


def param_count(cfg: GPTConfig) -> int:
    """Parameters of llmbook's GPT for `cfg`: the tied wte/lm_head once, wpe, n_layer blocks of
    12 C² weights (Q, K, V, projection; 4x MLP), LayerNorm weights, and biases if cfg.bias."""
    C = cfg.n_embd
    per_block = 12 * C * C + 2 * C + (11 * C if cfg.bias else 0)  # biases: 3C+C, 4C+C, 2 LNs
    final_ln = C + (C if cfg.bias else 0)
    return (cfg.padded_vocab_size + cfg.block_size) * C + cfg.n_layer * per_block + final_ln


def _check_sizes(**sizes: int) -> None:
    """One clear error for a size that is not a positive int."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive int, got {value!r}")


def block_activation_bytes(cfg: GPTConfig, batch: int, seq_len: int, dtype_bytes: int = 4) -> int:
    """Bytes one block saves for backward, for N = batch * seq_len tokens of width C:
    ln_1 input and output (2 NC) + mean, rstd (2 N); SDPA's q, k, v (one 3 NC qkv storage), its
    output (NC, also c_proj's input) and logsumexp (N * n_head); ln_2 input and output (2 NC)
    + mean, rstd (2 N); the MLP's pre-GELU and post-GELU (4 NC each): 16 NC + (4 + n_head) N.
    Statistics (mean, rstd, logsumexp) are fp32 whatever the activations' dtype. The SDPA set is
    that of PyTorch's fused CPU kernel, as measured; CUDA's flash kernel saves the same tensors."""
    _check_sizes(batch=batch, seq_len=seq_len, dtype_bytes=dtype_bytes)
    N, C = batch * seq_len, cfg.n_embd
    return 16 * N * C * dtype_bytes + (4 + cfg.n_head) * N * 4


def activation_bytes(cfg: GPTConfig, batch: int, seq_len: int, dtype_bytes: int = 4,
                     checkpointing: bool = False) -> int:
    """Bytes autograd keeps for backward after one training forward of llmbook's GPT with loss:
    the int64 ids, positions and targets; each block's `block_activation_bytes`; ln_f's input,
    output and statistics; cross-entropy's log-softmax (N x vocab_size) and a scalar. Dropout
    must be 0 (with dropout, masks and on the CPU an unfused attention would be kept as well).

    With `checkpointing` a block keeps only its input (NC) during the forward; this returns that.
    In backward each block is recomputed in turn, so the peak is this plus one
    `block_activation_bytes` (what `training_memory` counts). The logits tensor the forward
    returns (N x padded vocab) and the gradients being formed in backward are not counted."""
    _check_sizes(batch=batch, seq_len=seq_len, dtype_bytes=dtype_bytes)
    if cfg.dropout != 0:
        raise UserError(f"activation_bytes models dropout 0 (as large models are pretrained), "
                        f"got GPTConfig.dropout={cfg.dropout}")
    if seq_len > cfg.block_size:
        raise UserError(f"seq_len {seq_len} is longer than the model's context {cfg.block_size}")
    N, C = batch * seq_len, cfg.n_embd
    ids = 8 * (2 * N + seq_len)  # idx and targets (B, T), positions (T,)
    if checkpointing:
        blocks = cfg.n_layer * N * C * dtype_bytes
    else:
        blocks = cfg.n_layer * block_activation_bytes(cfg, batch, seq_len, dtype_bytes)
    final = 2 * N * C * dtype_bytes + 2 * N * 4  # ln_f input and output (lm_head's input), stats
    loss = (N * cfg.vocab_size + 1) * dtype_bytes  # log-softmax (N, vocab), its total weight
    return ids + blocks + final + loss


def measure_saved_bytes(model: GPT, idx: Tensor, targets: Tensor) -> int:
    """Bytes of the distinct storages autograd saves in one training forward with loss, found by
    a saved_tensors_hooks: views (q, k, v of one qkv) count once, parameters not at all."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, targets)
    del loss  # frees the graph and what it saved
    return sum(saved.values())


def training_memory(cfg: GPTConfig, batch: int, seq_len: int, *, n_gpus: int = 1,
                    strategy: str = "single", mixed: bool = False,
                    checkpointing: bool = False) -> dict[str, int]:
    """Bytes per GPU by part for AdamW training with `batch` sequences per GPU.

    fp32: 4-byte parameters and gradients, Adam's m and v (8 bytes). `mixed`: bf16 parameters and
    gradients, an fp32 master copy and m, v: the ZeRO paper's 16 bytes per parameter, and 2-byte
    activations (autocast keeps LayerNorm and log-softmax in fp32, so a little more in practice).
    DDP replicates everything; ZeRO-1 shards the optimizer states over the n_gpus, ZeRO-2 also the
    gradients, FSDP (ZeRO-3) also the parameters, ceil(P / n_gpus) per GPU as in a padded flat
    buffer; FSDP's transient all-gathered unit, buffers and the allocator's slack are ignored."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    _check_sizes(n_gpus=n_gpus)
    if strategy == "single" and n_gpus != 1:
        raise UserError(f"strategy 'single' is one GPU, got n_gpus={n_gpus}; use ddp, zero1, "
                        "zero2 or fsdp for more")
    P = param_count(cfg)
    shard = -(-P // n_gpus)
    level = STRATEGIES[strategy]
    weight_bytes, optimizer_bytes = (2, 12) if mixed else (4, 8)
    dtype_bytes = 2 if mixed else 4
    acts = activation_bytes(cfg, batch, seq_len, dtype_bytes, checkpointing)
    if checkpointing:
        acts += block_activation_bytes(cfg, batch, seq_len, dtype_bytes)  # the recomputed one
    parts = {
        "parameters": (shard if level >= 3 else P) * weight_bytes,
        "gradients": (shard if level >= 2 else P) * weight_bytes,
        "optimizer": (shard if level >= 1 else P) * optimizer_bytes,
        "activations": acts,
    }
    return {**parts, "total": sum(parts.values())}


def memory_table(n_gpus: int = 8, batch: int = 1, seq_lens: tuple[int, ...] = (1024, 4096),
                 mixed: bool = True, gpu_memory: int = GPU_MEMORY) -> list[dict]:
    """Rows for chapter 08: every size in SIZES under every strategy ("single" on one GPU, the
    others on n_gpus), for each seq_len the model's context allows, with and without
    checkpointing; bytes per GPU by part and whether the total fits in `gpu_memory`."""
    rows = []
    for name, cfg in SIZES.items():
        for seq_len in (s for s in seq_lens if s <= cfg.block_size):
            for checkpointing in (False, True):
                for strategy in STRATEGIES:
                    gpus = 1 if strategy == "single" else n_gpus
                    parts = training_memory(cfg, batch, seq_len, n_gpus=gpus, strategy=strategy,
                                            mixed=mixed, checkpointing=checkpointing)
                    rows.append({"model": name, "params": param_count(cfg), "strategy": strategy,
                                 "n_gpus": gpus, "seq_len": seq_len,
                                 "checkpointing": checkpointing, **parts,
                                 "fits": parts["total"] <= gpu_memory})
    return rows
