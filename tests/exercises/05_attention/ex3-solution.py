# Wrong: halves the count because "the causal mask blocks half of the scores". The dense `attention`
# still multiplies the full T x T matrices (the mask is applied after the product), so the tests,
# which count what PyTorch runs with FlopCounterMode, must reject it.
def attention_flops(B: int, H: int, T: int, D: int) -> int:
    scores = B * H * T * T * D          # half of the 2*B*H*T*T*D, for the masked half
    mix = B * H * T * T * D
    return scores + mix
