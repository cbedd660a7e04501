"""Causal self-attention: an explicit softmax(QKᵀ/√d)V for teaching, and PyTorch's fused kernel."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, dropout_p: float = 0.0,
              training: bool = False) -> tuple[Tensor, Tensor]:
    """softmax(QKᵀ/√d)V on (B, H, T, D) tensors, written out; returns (output, attention weights).

    The weights are the probabilities before dropout (what a heatmap should show). With
    `causal`, query i sees keys 0..i only, the same mask as `F.scaled_dot_product_attention`.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if q.size(-1) != k.size(-1) or k.size(-2) != v.size(-2):
        raise ValueError(f"q, k, v do not fit together: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}; q and k need the same head size D, k and v the "
                         "same length T")
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., T_q, T_k)
    if causal:
        mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    out = F.dropout(weights, dropout_p, training) @ v
    return out, weights


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

    def forward(self, x: Tensor, explicit: bool = False) -> Tensor:
        """x (B, T, C) -> (B, T, C). `explicit=True` runs `attention` and keeps `last_attn`."""
        B, T, C = x.shape
        if T > self.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.block_size}")
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, H, T, D): each head attends in its own D = C / H dimensions
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.attn_dropout.p if self.training else 0.0
        if explicit:
            y, weights = attention(q, k, v, causal=True, dropout_p=p, training=self.training)
            self.last_attn = weights.detach()
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))
