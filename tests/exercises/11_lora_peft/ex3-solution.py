# Wrong: singular values summed without squaring: a share of the nuclear norm, not of the
# squared Frobenius norm (the same only when one singular value holds everything).
def energy_captured(delta: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(delta.double())
    return (s[:r].sum() / s.sum()).item()


delta = (full["model"].gpt.transformer.h[0].attn.c_attn.weight.detach().cpu()
         - base.transformer.h[0].attn.c_attn.weight.detach().cpu())
captured = energy_captured(delta, RANK)
print(f"a rank-{RANK} approximation holds {captured:.0%} of the full update's squared norm")
