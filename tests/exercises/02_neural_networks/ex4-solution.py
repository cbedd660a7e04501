# Wrong: zeroes elements with probability p but forgets to scale the survivors by 1 / (1 - p), so
# the expected output is (1 - p) * x and a model trained with it sees smaller activations than it
# gets in eval mode. The fraction of zeros is right, so only the survivors' values reveal it.
def dropout_forward(x: torch.Tensor, p: float, training: bool,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverted dropout: in training, zero with probability p and scale by 1/(1-p)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep
