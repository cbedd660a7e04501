"""The explicit attention equals PyTorch's fused kernel and nn.MultiheadAttention, and is causal."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from llmbook.attention import CausalSelfAttention, attention

DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_equals_sdpa(dtype, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, dtype=dtype) for _ in range(3))
    out, weights = attention(q, k, v, causal=causal)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    assert weights.shape == (2, 3, 7, 7)
    assert_close(weights.sum(-1), torch.ones(2, 3, 7, dtype=dtype))
    upper = torch.ones(7, 7, dtype=torch.bool).triu(1)
    assert (weights[..., upper] == 0).all() == causal


def test_attention_dropout_only_in_training():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g) for _ in range(3))
    assert_close(attention(q, k, v, dropout_p=0.5, training=False)[0], attention(q, k, v)[0])
    torch.manual_seed(0)
    out, weights = attention(q, k, v, dropout_p=0.5, training=True)
    assert not torch.allclose(out, attention(q, k, v)[0])
    assert_close(weights, attention(q, k, v)[1])  # weights are reported before dropout


def test_attention_bad_arguments():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, q, q, dropout_p=1.0)
    with pytest.raises(ValueError, match="head size"):
        attention(q, torch.randn(1, 1, 4, 6), q)


def _module(dtype, seed=0, **kw):
    torch.manual_seed(seed)
    m = CausalSelfAttention(n_embd=32, n_head=4, block_size=16, **kw).to(dtype).eval()
    for p in m.parameters():  # random biases too, so a wrong bias mapping would show
        nn.init.normal_(p, std=0.2)
    return m


@pytest.mark.parametrize("dtype", DTYPES)
def test_explicit_path_equals_sdpa_path(dtype):
    m = _module(dtype)
    x = torch.randn(3, 11, 32, dtype=dtype)
    assert m.last_attn is None
    out_sdpa = m(x)
    assert m.last_attn is None  # only the explicit path keeps weights
    assert_close(m(x, explicit=True), out_sdpa)
    assert m.last_attn.shape == (3, 4, 11, 11)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("explicit", [False, True])
def test_equals_nn_multihead_attention(dtype, explicit):
    m = _module(dtype)
    mha = nn.MultiheadAttention(32, 4, bias=True, batch_first=True, dtype=dtype).eval()
    with torch.no_grad():  # both stack Q, K, V row-wise in one (3C, C) matrix
        mha.in_proj_weight.copy_(m.c_attn.weight)
        mha.in_proj_bias.copy_(m.c_attn.bias)
        mha.out_proj.weight.copy_(m.c_proj.weight)
        mha.out_proj.bias.copy_(m.c_proj.bias)
    x = torch.randn(2, 9, 32, dtype=dtype)
    future = torch.ones(9, 9, dtype=torch.bool).triu(1)  # True = may not attend
    ref, ref_weights = mha(x, x, x, attn_mask=future, need_weights=True,
                           average_attn_weights=False)
    assert_close(m(x, explicit=explicit), ref)
    if explicit:
        assert_close(m.last_attn, ref_weights)


@pytest.mark.parametrize("explicit", [False, True])
def test_causality(explicit):
    """Changing the input at position t never changes the output before t, and does change it
    at t."""
    m = _module(torch.float32)
    x = torch.randn(1, 12, 32)
    base = m(x, explicit=explicit)
    for t in (0, 5, 11):
        x2 = x.clone()
        x2[:, t] += torch.randn(32)
        out = m(x2, explicit=explicit)
        assert_close(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t], base[:, t])


def test_module_errors():
    with pytest.raises(ValueError, match="divisible"):
        CausalSelfAttention(n_embd=30, n_head=4, block_size=8)
    m = CausalSelfAttention(n_embd=32, n_head=4, block_size=8)
    with pytest.raises(ValueError, match="longer than block_size 8"):
        m(torch.randn(1, 9, 32))


def test_dropout_active_in_training_mode():
    m = _module(torch.float32, dropout=0.5)
    x = torch.randn(2, 6, 32)
    assert_close(m(x), m(x))  # eval: deterministic
    m.train()
    for explicit in (False, True):
        assert not torch.allclose(m(x, explicit=explicit), m(x, explicit=explicit))
