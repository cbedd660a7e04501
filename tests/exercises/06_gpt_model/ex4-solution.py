# Wrong: divides every seen token's logit by the penalty whatever its sign, as the formula's first
# case alone suggests; a negative logit divided by theta > 1 moves towards 0 and the token becomes
# MORE likely, the opposite of a penalty, and the tests must catch it.
# ruff: noqa: F821  (the names come from the notebook, where this cell runs)
def repetition_penalty(logits: torch.Tensor, idx: torch.Tensor, penalty: float) -> torch.Tensor:
    seen = logits.gather(-1, idx)
    return logits.scatter(-1, idx, seen / penalty)
