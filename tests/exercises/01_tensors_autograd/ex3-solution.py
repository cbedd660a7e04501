# Wrong: saves the input x and recomputes tanh in backward. The gradient is right, so gradcheck
# passes, but it keeps x alive and repeats the forward work: the exercise asks for the saved output.
class Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad_out * (1 - torch.tanh(x) ** 2)
