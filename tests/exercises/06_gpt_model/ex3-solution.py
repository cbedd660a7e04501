# Wrong: uses p_min as an absolute probability threshold (keep p >= p_min) instead of a fraction
# of the most likely token's probability; it keeps too few tokens when the model is unsure, and
# the tests must catch it.
# ruff: noqa: F821  (the names come from the notebook, where this cell runs)
def min_p_filter(logits: torch.Tensor, p_min: float) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < p_min, float("-inf"))
