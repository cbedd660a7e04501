# Wrong: the keys only; a cache holds the values too, as many numbers again.
def kv_cache_bytes(config: GPTConfig, batch: int, length: int, bytes_per_number: int = 4) -> int:
    return config.n_layer * batch * length * config.n_embd * bytes_per_number


print(f"GPT-2 small, one sequence of 1024 tokens: {kv_cache_bytes(GPTConfig.gpt2(), 1, 1024) / 1e6:.0f} MB")
