# Wrong: counts the output layer as a V x C matrix of its own, as if it were not tied to the token
# embeddings, so every count is too large by vocab_size * n_embd; the visible assert against
# GPT-2 small built on the meta device must catch it.
# ruff: noqa: F821  (the names come from the notebook, where this cell runs)
def gpt_num_params(config: GPTConfig, non_embedding: bool = True) -> int:
    V, T, L, C = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    b = 1 if config.bias else 0
    attn = 3 * C * C + b * 3 * C + C * C + b * C  # c_attn and c_proj
    mlp = 4 * C * C + b * 4 * C + 4 * C * C + b * C  # c_fc and c_proj
    norms = 2 * (C + b * C)  # ln_1 and ln_2
    n = V * C + T * C + L * (attn + mlp + norms) + (C + b * C) + V * C  # + ln_f + lm_head
    return n - T * C if non_embedding else n
