# Wrong: the sines in the first half of the table and the cosines in the second (torch.cat), a
# common layout in other code bases, instead of interleaving them as the exercise's formula says.
# Shape, non-persistence and scale all pass the visible test, so the hidden test, which compares
# the table with the formula entry by entry, must reject it.
class SinusoidalPositions(nn.Module):
    def __init__(self, block_size: int, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        pos = torch.arange(block_size, dtype=torch.float32)[:, None]
        inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        table = torch.cat([torch.sin(pos * inv_freq), torch.cos(pos * inv_freq)], dim=-1)
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.table[: x.shape[1]]
