# Wrong: applies the hint's derivative with the sign inside the sigmoid dropped, sigma(t) instead of
# sigma(-t): the gradient points the right way only where the margins are near zero.
def logistic_grad(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    margins = y * (X @ w)
    return -(X * (y * torch.sigmoid(margins)).unsqueeze(1)).mean(dim=0)
