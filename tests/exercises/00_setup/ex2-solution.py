# Wrong: names the CPU with platform.processor(), which on Linux is the architecture ("x86_64") or
# empty, not the model; and it hands any object to torch.device, which accepts an int (3 -> a device
# index) instead of raising TypeError.
def device_name(dev: torch.device | str) -> str:
    dev = torch.device(dev)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "mps":
        return "Apple GPU (MPS)"
    return platform.processor() or platform.machine()


for d in devices:
    print(f"{str(d):8s} {device_name(d)}")
