# Wrong: counts the real tokens up to and including each one, so positions start at 1, not 0.
def row_positions(mask: torch.Tensor) -> torch.Tensor:
    return mask.long().cumsum(-1)
