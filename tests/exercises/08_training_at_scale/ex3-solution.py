# Wrong: takes every world-th row (an interleaved split), so the concatenated outputs come out of order.
def column_shard(linear: nn.Linear, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    return linear.weight[rank::world], linear.bias[rank::world]


w0, b0 = column_shard(full, 0, 2)
print(f"rank 0 of 2 keeps a weight of shape {tuple(w0.shape)} and a bias of {tuple(b0.shape)}")
