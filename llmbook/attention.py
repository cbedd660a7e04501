"""Causal self-attention: an explicit softmax(QKᵀ/√d)V for teaching, PyTorch's fused kernel, and
the key-value cache that makes generation cost one new row of attention per token."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .errors import UserError


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, dropout_p: float = 0.0,
              training: bool = False, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """softmax(QKᵀ/√d)V on (B, H, T, D) tensors, written out; returns (output, attention weights).

    The weights are the probabilities before dropout (what a heatmap should show). With
    `causal`, query i sees keys 0..i only, the same mask as `F.scaled_dot_product_attention`;
    a boolean `mask` (broadcast to (B, H, T_q, T_k), True = may attend) replaces it.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if q.size(-1) != k.size(-1) or k.size(-2) != v.size(-2):
        raise ValueError(f"q, k, v do not fit together: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}; q and k need the same head size D, k and v the "
                         "same length T")
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., T_q, T_k)
    if mask is None and causal:
        mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    out = F.dropout(weights, dropout_p, training) @ v
    return out, weights


class KVCache:
    """The keys and values of every layer for a batch of sequences, pre-allocated to `max_len`
    positions: each forward appends its tokens' keys and values instead of recomputing the
    prefix's. `length` positions are filled (the same in every layer once a forward is done)."""

    def __init__(self, n_layer: int, batch: int, n_head: int, head_dim: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store a layer's new keys and values (B, H, T, D) after the cached ones; return the
        layer's keys and values so far, (B, H, length + T, D)."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise UserError(f"the cache holds {self.max_len} positions; {end} do not fit: make "
                            "it with room for the whole text, model.new_cache(batch, max_len)")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, rows: Tensor) -> None:
        """Keep the sequences `rows` (a LongTensor, repeats allowed): beam search continues each
        new beam from an old one, and the new beam takes that one's cache."""
        self.k, self.v = self.k.index_select(1, rows), self.v.index_select(1, rows)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention as in GPT-2: one Linear makes Q, K, V for all heads."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head}) so that "
                             "every head gets n_embd // n_head dimensions")
        self.n_embd, self.n_head, self.block_size = n_embd, n_head, block_size
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # Q, K, V side by side
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.last_attn: Tensor | None = None  # (B, H, T, T), kept by the explicit path

    def forward(self, x: Tensor, explicit: bool = False, cache: KVCache | None = None,
                layer: int = 0, mask: Tensor | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C). `explicit=True` runs `attention` and keeps `last_attn`.
        With a `cache`, x holds the tokens after the cached ones and attends to them all (this is
        layer `layer` of the cache); `mask` (True = may attend, broadcast to (B, H, T, T_keys))
        then replaces the causal mask, as it must once cached keys precede the queries."""
        B, T, C = x.shape
        if T > self.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.block_size}")
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, H, T, D): each head attends in its own D = C / H dimensions
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        p = self.attn_dropout.p if self.training else 0.0
        if explicit:
            y, weights = attention(q, k, v, causal=True, dropout_p=p, training=self.training,
                                   mask=mask)
            self.last_attn = weights.detach()
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                               is_causal=mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))
