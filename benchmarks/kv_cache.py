"""The key-value cache's speed-up and the shipped model's decoding speed, measured in one run.

    python benchmarks/kv_cache.py [--repeats 3] [--prompt 20] [--new 200]

GPT-2 small's configuration (124M parameters, random weights) generates --new tokens greedily
after a --prompt-token prompt, with the cache and without it (`use_cache=False` recomputes the
whole prefix at every step), the two interleaved, best of --repeats each; then the shipped
poetry-small model does the same with the cache. Prints tokens per second, the speed-up, this
machine's matmul rate and memory bandwidth for scale, the speed-up that bandwidth allows (a cached
step reads every weight once), and the issue's targets (speed-up >= 12x, poetry-small >= 300
tokens/s) as met or not. About 4 minutes on two idle cores, most of it the uncached runs.
"""

from __future__ import annotations

import argparse
import time

import torch

import llmbook
from llmbook.env import matmul_flops
from llmbook.generate import generate
from llmbook.model import GPT, GPTConfig


def seconds(model: GPT, idx: torch.Tensor, new: int, use_cache: bool) -> float:
    start = time.perf_counter()
    out = generate(model, idx, new, greedy=True, use_cache=use_cache)
    elapsed = time.perf_counter() - start
    assert out.size(1) == idx.size(1) + new
    return elapsed


def bandwidth(n_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes per second a float32 matrix-vector product streams from memory (the fastest of
    `repeats`): what a decoding step with the cache does with every weight matrix."""
    w = torch.randn(n_bytes // 4 // 4096, 4096)
    x = torch.randn(4096)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        w @ x
        best = min(best, time.perf_counter() - start)
    return w.numel() * 4 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=20)
    parser.add_argument("--new", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    stream_rate = bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; matmul "
          f"{matmul_flops('cpu') / 1e9:.0f} GFLOP/s (n=1024, float32); a matrix-vector product "
          f"streams {stream_rate / 1e9:.1f} GB/s")

    gpt2 = GPT(GPTConfig.gpt2()).eval()
    idx = torch.randint(gpt2.config.vocab_size, (1, args.prompt))
    seconds(gpt2, idx, 2, True)  # warm up both paths once
    seconds(gpt2, idx, 2, False)
    cached, plain = [], []
    for _ in range(args.repeats):  # interleaved: a disturbance hits both alike
        cached.append(seconds(gpt2, idx, args.new, True))
        plain.append(seconds(gpt2, idx, args.new, False))
    speedup = min(plain) / min(cached)
    print(f"GPT-2 124M, {args.prompt}-token prompt + {args.new} new tokens, greedy:")
    print(f"  with the cache    {args.new / min(cached):7.1f} tokens/s  "
          f"(runs: {', '.join(f'{s:.1f}' for s in cached)} s)")
    print(f"  without the cache {args.new / min(plain):7.1f} tokens/s  "
          f"(runs: {', '.join(f'{s:.1f}' for s in plain)} s)")
    print(f"  speed-up {speedup:.1f}x (target >= 12x: {'met' if speedup >= 12 else 'not met'})")
    weight_bytes = 4 * sum(p.numel() for p in gpt2.parameters())
    floor = args.new * weight_bytes / stream_rate  # every cached step reads every weight once
    print(f"  a cached step reads all {weight_bytes / 1e6:.0f} MB of weights: at "
          f"{stream_rate / 1e9:.1f} GB/s the cache needs at least {floor:.1f} s, so it can be at "
          f"most {min(plain) / floor:.1f}x faster than the uncached run here")

    poetry, tok = llmbook.load_pretrained("poetry-small")
    poetry.eval()
    idx = torch.tensor([tok.encode("五言绝句\n秋夜\n")])
    new = min(args.new, poetry.config.block_size - idx.size(1))
    seconds(poetry, idx, 2, True)
    best = min(seconds(poetry, idx, new, True) for _ in range(args.repeats))
    rate = new / best
    print(f"poetry-small, {new} new tokens with the cache: {rate:.0f} tokens/s "
          f"(target >= 300: {'met' if rate >= 300 else 'not met'})")


if __name__ == "__main__":
    main()
