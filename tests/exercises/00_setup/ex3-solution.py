# Wrong: the byte count is right in add_bytes_moved, but the bandwidth counts only the bytes of the
# result (numel * element size), one of the three arrays the addition moves: 3x too low, which a
# loose comparison with a noisy measurement cannot see.
def add_bytes_moved(numel: int, dtype: torch.dtype) -> int:
    return 3 * numel * torch.empty((), dtype=dtype).element_size()


def add_bandwidth_gbs(numel: int, dev: torch.device, dtype: torch.dtype = torch.float32) -> float:
    a = torch.randn(numel, device=dev).to(dtype)
    b = torch.randn(numel, device=dev).to(dtype)
    out = torch.empty_like(a)
    seconds = time_call(functools.partial(torch.add, a, b, out=out), dev)
    return numel * out.element_size() / seconds / 1e9


add_gbs = add_bandwidth_gbs(ADD_NUMEL, device)
add_gflops = add_gbs / add_bytes_moved(1, torch.float32)  # GB/s / bytes per element, 1 FLOP each
matmul_best = max(gflops[f"{device.type} float32"])
print(f"elementwise add on {device}: {add_gbs:.1f} GB/s = {add_gflops:.2f} GFLOP/s")
print(f"matmul on {device}: {matmul_best:.1f} GFLOP/s, "
      f"{matmul_best / add_gflops:.0f}x the add's FLOP rate")
