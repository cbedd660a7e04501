# Wrong: freezes only the weight matrices of the body's Linear layers and forgets that BatchNorm
# has trainable parameters too (its scale gamma and shift beta), so 4 * HIDDEN body parameters
# would still be trained. The count must come out as HIDDEN * 5 + 5 exactly.
def freeze_all_but_head(model: MLP) -> None:
    """Stop gradients everywhere except in model.head."""
    for layer in model.body:
        if isinstance(layer, nn.Linear):
            layer.weight.requires_grad_(False)


def count_trainable(model: nn.Module) -> int:
    """Number of scalars in parameters that require a gradient."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
