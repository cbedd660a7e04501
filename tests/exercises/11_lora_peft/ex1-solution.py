# Wrong: the share of the non-embedding parameters (num_params() leaves the position embeddings
# out by default), not of all of them as the exercise asks.
def lora_params(d_in: int, d_out: int, r: int) -> int:
    return r * (d_in + d_out)


def lora_share(model, r: int) -> float:
    d = model.config.n_embd
    per_block = (lora_params(d, 3 * d, r) + lora_params(d, d, r) + lora_params(d, 4 * d, r)
                 + lora_params(4 * d, d, r))
    return model.config.n_layer * per_block / model.num_params()
