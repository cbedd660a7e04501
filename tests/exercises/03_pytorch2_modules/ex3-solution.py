# Wrong: a greedy cut that fills each stage up to an even share (total / k) of the parameters and
# moves on, keeping enough modules for the stages left. It gives k non-empty stages that reproduce
# the model, so the visible test passes, but greedy is not optimal: the hidden test compares the
# largest stage with the brute-force optimum for every k and must reject it.
def balanced_split(seq: nn.Sequential, k: int) -> list[nn.Sequential]:
    n = len(seq)
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} modules into {k} non-empty stages; choose 1 <= k <= {n}")
    sizes = [sum(p.numel() for p in module.parameters()) for module in seq]
    target = sum(sizes) / k
    stages, start, load = [], 0, 0
    for i, size in enumerate(sizes):
        stages_left = k - len(stages) - 1             # stages still to open after this one
        must_cut = n - i == stages_left               # every remaining module needs its own stage
        if i > start and stages_left > 0 and (load + size > target or must_cut):
            stages.append(seq[start:i])
            start, load = i, 0
        load += size
    stages.append(seq[start:])
    return stages
