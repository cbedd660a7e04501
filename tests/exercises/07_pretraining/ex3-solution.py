# Wrong: zeroes the <unk> positions' losses but still divides by the number of all positions, so
# the loss is pulled towards 0 by every <unk> target (and the gradient scaled down with it). The
# mean must be over the scored positions only, as F.cross_entropy does with ignore_index.
def masked_loss(logits: torch.Tensor, targets: torch.Tensor, unk_id: int) -> torch.Tensor:
    scored = targets != unk_id
    if not scored.any():
        raise ValueError("every target is <unk>: there is nothing to score")
    nll = -logits.log_softmax(dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (nll * scored).sum() / scored.numel()
