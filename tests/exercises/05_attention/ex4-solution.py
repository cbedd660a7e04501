# Wrong: frequencies theta_i = base^(-i/D) (indexing the pairs 0..D/2-1 but forgetting the factor 2
# of 2i/D). Lengths and the relative-position property survive, since it is still a rotation by
# m*theta_i, so only the comparison with apply_rope catches it, which the tests must do.
def rope_complex(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    T, D = x.shape[-2:]
    theta = base ** (-torch.arange(D // 2, dtype=x.dtype, device=x.device) / D)
    angle = torch.arange(T, dtype=x.dtype, device=x.device)[:, None] * theta     # (T, D/2)
    rotation = torch.polar(torch.ones_like(angle), angle)                         # e^{i angle}
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], D // 2, 2).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2)
