# Wrong: forgets that a window needs block_size + 1 ids (the inputs plus the shifted target), so
# it counts one window too many and says a sequence of exactly block_size ids has one.
def num_windows(n_tokens: int, block_size: int, stride: int) -> int:
    if n_tokens < block_size:
        return 0
    return (n_tokens - block_size) // stride + 1
