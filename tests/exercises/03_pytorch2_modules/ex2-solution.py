# Wrong: removes the hooks after the forward pass but without try/finally, so a forward that raises
# leaves every hook attached (and still recording into a dict nobody reads). The visible test never
# raises, so the hidden test with a failing model must reject it.
def record_output_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes = {}
    handles = []
    for name, module in model.named_modules():
        if next(module.children(), None) is None:
            def hook(mod, inputs, output, name=name):
                shapes[name] = tuple(output.shape)
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes
