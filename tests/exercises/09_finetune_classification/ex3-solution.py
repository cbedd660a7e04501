# Wrong: the head and the last n blocks, but not the final LayerNorm that "last:N" also trains.
def trainable_last_n(config, n: int, n_classes: int) -> int:
    d, b = config.n_embd, int(config.bias)
    layer_norm = d + b * d
    block = (2 * layer_norm + (3 * d * d + b * 3 * d) + (d * d + b * d)
             + (4 * d * d + b * 4 * d) + (4 * d * d + b * d))
    return n * block + d * n_classes + n_classes
