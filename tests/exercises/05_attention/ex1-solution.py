# Wrong: the mask convention of nn.MultiheadAttention (True = blocked) instead of the one the
# exercise asks for (True = may attend, as F.scaled_dot_product_attention): the allowed keys are
# the ones filled with -inf. The chapter's table warns about exactly this mix-up; the tests compare
# with SDPA under the same boolean mask, so they must reject it.
def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
