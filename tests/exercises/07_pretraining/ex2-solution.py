# Wrong: the warm-up is off by one, lr * step / warmup_steps, so step 0 gets a learning rate of 0
# (a wasted step) and the warm-up reaches the peak one step late. lr_at gives step s the rate
# lr * (s + 1) / warmup_steps, so the first step already moves the weights.
def my_lr(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    if step < warmup_steps:
        return lr * step / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)
