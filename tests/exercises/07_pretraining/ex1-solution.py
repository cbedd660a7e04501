# Wrong: averages the per-token perplexities, exp(loss), instead of exponentiating the mean loss.
# By Jensen's inequality the mean of exp is larger than exp of the mean whenever the losses differ,
# so it overstates the perplexity; equal losses (the first visible check) cannot tell them apart.
def perplexity_from_losses(losses: list[float]) -> float:
    if len(losses) == 0:
        raise ValueError("perplexity needs at least one loss")
    return sum(math.exp(loss) for loss in losses) / len(losses)
