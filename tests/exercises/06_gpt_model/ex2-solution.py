# Wrong: keeps LayerNorm's habit of subtracting the mean before dividing by the root mean square,
# which is LayerNorm without its bias, not RMSNorm; for inputs whose mean is not zero the result
# differs from F.rms_norm, and the tests must catch it.
# ruff: noqa: F821  (the names come from the notebook, where this cell runs)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    centred = x - x.mean(dim=-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(dim=-1, keepdim=True) + eps) * weight
