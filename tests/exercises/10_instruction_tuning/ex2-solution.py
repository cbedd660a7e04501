# Wrong: off by one: the target at <|assistant|>'s position (the answer's first token) is masked
# too, so the model never learns how to begin an answer.
def mask_labels(ids: list[int], n_prompt: int) -> list[int]:
    return [-100 if t < n_prompt else ids[t + 1] for t in range(len(ids) - 1)]
