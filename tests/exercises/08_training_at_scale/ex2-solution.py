# Wrong: forgets the float32 master copy of the weights (Adam's m and v only: 8 bytes, not 12).
def state_bytes_per_gpu(n_params: int, n_gpus: int, stage: int) -> int:
    P, S = n_params, n_params // n_gpus
    weights = S * 2 if stage >= 3 else P * 2
    grads = S * 2 if stage >= 2 else P * 2
    optimizer = S * 8 if stage >= 1 else P * 8
    return weights + grads + optimizer


for stage in range(4):
    print(f"GPT-2 XL on 8 GPUs, ZeRO stage {stage}: {state_bytes_per_gpu(param_count(SIZES['gpt2-xl']) // 8 * 8, 8, stage) / 2**30:.1f} GiB")
