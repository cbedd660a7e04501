# Wrong: the update without its alpha / rank scale, right only when alpha equals the rank.
def merged_weight(layer: LoRALinear) -> torch.Tensor:
    return layer.base.weight + layer.lora_B @ layer.lora_A
