# Wrong: counts the buffers from state_dict() (everything in it that is not a parameter), which
# misses the non-persistent buffers: state_dict leaves them out on purpose (section 2). The visible
# examples have only persistent buffers or none, so the hidden tests (TinyLM's `pos`, Demo's
# causal mask) must reject it.
def count_params_and_buffers(module: nn.Module) -> tuple[int, int]:
    n_params = sum(p.numel() for p in module.parameters())
    param_names = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    n_buffers = sum(t.numel() for name, t in module.state_dict().items()
                    if name not in param_names)
    return n_params, n_buffers
