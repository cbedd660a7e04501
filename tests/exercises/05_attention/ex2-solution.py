# Wrong: an off-by-one window, j >= i - w instead of j > i - w, so every token sees w + 1 tokens
# (itself and the w before it), and w < 1 is not rejected. "The last w tokens, itself included" is
# easy to misread this way; the tests compare against the definition and must reject it.
def sliding_window_mask(T: int, w: int) -> torch.Tensor:
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    return (j <= i) & (j >= i - w)
