# Wrong: the mean over every position, padding included: right for the longest text of a batch,
# wrong for every shorter one (the hidden test puts large values in the padding).
def mean_pool(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return h.mean(1)
