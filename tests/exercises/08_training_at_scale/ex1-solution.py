# Wrong: counts the forward pass only (2 FLOPs per weight), a third of a training step's work.
def mfu(step_seconds: float, batch: int, config: GPTConfig, peak_flops: float) -> float:
    with torch.device("meta"):
        model = GPT(config)
    tokens = batch * config.block_size
    return tokens * 2 * model.num_params() / step_seconds / peak_flops


print(f"the small config on this CPU: {mfu(seconds, BATCH, SMALL, rate):.0%} of the matmul rate")
