"""Train-step speed: llmbook's GPT against transformers' GPT-2 on the CPU; PyTorch 2's GPU ladder.

    python benchmarks/train_speed.py --cpu [--compile] [--repeats 5] [--out FILE]
    python benchmarks/train_speed.py --gpu [--quick] [--out FILE]

A train step is forward, loss, backward, AdamW step and zero_grad on a batch of random tokens; its
time is the fastest block of torch.utils.benchmark's blocked_autorange after a warm-up (the timer
synchronizes the GPU). tokens/s = batch * context / step time; the FLOPs of a step are
model.estimate_flops_per_token(context) per token (6N + 12·L·d·T).

--cpu: the small config (4 layers, 4 heads, width 128, context 64, batch 12, float32, the shipped
poetry-small model's vocabulary) as llmbook.GPT and as transformers' GPT2LMHeadModel (same sizes,
gelu_new, no dropout, SDPA attention, tied embeddings), the same AdamW and batch, measured
alternately (A, B, A, B, ...: a disturbance hits both alike); prints the best of each, the ratio
of every pair and each model's FLOP/s as a fraction of this machine's float32 matmul rate.
--compile adds both models under torch.compile (its cold start is the first step's time).

--gpu: GPT-2 124M, context 1024, one switch at a time, each rung keeping the ones before:
fp32, TF32 matmuls, bf16 autocast, flash attention, torch.compile, vocabulary padded to 64,
fused AdamW, then the largest batch of 32/16 that fits. The rungs before "flash" force SDPA's
math backend (attention written out in PyTorch ops, as chapter 05 teaches it), so that rung shows
what the fused kernel gains. MFU is against the device's dense peak for the rung's precision
(fp32 without tensor cores, TF32, bf16) and, for one scale down the ladder, against its bf16 peak.

Results go to benchmarks/results/train_speed-<cpu|gpu>-<date>.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

from llmbook.env import matmul_flops
from llmbook.errors import UserError
from llmbook.model import GPT, GPTConfig, read_metadata
from llmbook.pretrained import DATA_DIR, PRETRAINED

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 1.3  # issue 12: llmbook's CPU train step at least 1.3x transformers' tokens/s
# dense TFLOP/s from NVIDIA's datasheets (SXM parts; the H200 has the H100's chip, more memory)
GPU_PEAKS = {"H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
             "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},
             "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
             "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}}

Step = Callable[[], None]


def poetry_vocab_size() -> int:
    """The shipped poetry-small model's vocabulary size, read from its file's metadata."""
    meta = read_metadata(DATA_DIR / PRETRAINED["poetry-small"])
    return json.loads(meta["llmbook_config"])["vocab_size"]


def hf_gpt2(config: GPTConfig) -> nn.Module:
    """transformers' GPT2LMHeadModel with `config`'s sizes: gelu_new, no dropout, SDPA, tied."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                           n_positions=config.block_size, vocab_size=config.vocab_size,
                           activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0, tie_word_embeddings=True, use_cache=False,
                           bos_token_id=None, eos_token_id=None,  # GPT-2's 50256 is no token here
                           attn_implementation="sdpa")
    model = GPT2LMHeadModel(hf_config)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    assert model.lm_head.weight is model.transformer.wte.weight, "embeddings are not tied"
    return model


def llmbook_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, y)[1]


def hf_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """transformers' own loss, as its users train: it shifts `labels` by one itself (so it
    scores T - 1 positions per row to our T), upcasts the logits and takes the cross-entropy."""
    return model(input_ids=x, labels=x, use_cache=False).loss


def train_step(model: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor,
               context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
               ) -> Step:
    """One step as a closure: forward and loss (inside `context()`, e.g. autocast), backward,
    the optimizer's step, zero_grad."""
    def step() -> None:
        with context():
            loss = loss_fn(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def best_seconds(step: Step, min_run_time: float) -> float:
    """Seconds per step: the fastest block of blocked_autorange, which synchronizes the GPU
    around every block (other programs only add time, so the minimum is the best estimate)."""
    timer = benchmark.Timer("step()", globals={"step": step},
                            num_threads=torch.get_num_threads())  # its default is one thread
    return min(timer.blocked_autorange(min_run_time=min_run_time).times)


def compile_cold(model: nn.Module) -> nn.Module:
    """torch.compile with fixed shapes and inductor's on-disk caches off, so that the first
    step's time is the cold start a first run pays, not a cache hit from an earlier run."""
    import torch._inductor.config

    torch._inductor.config.force_disable_caches = True
    return torch.compile(model, dynamic=False)


def cold_start(step: Step, warmup: int = 2) -> float:
    """Run `step` 1 + `warmup` times (allocations, kernel choice, compilation) and return the
    first run's seconds: for torch.compile, its cold start."""
    start = time.perf_counter()
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    return first


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware() -> dict:
    hw = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        hw.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=props.total_memory / 2**30,
                  gpu_sms=props.multi_processor_count, cuda=torch.version.cuda)
    return hw


def save(report: dict, out: str | None) -> Path:
    path = Path(out) if out else RESULTS / f"train_speed-{report['mode']}-{report['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def run_cpu(args: argparse.Namespace) -> dict:
    """llmbook.GPT and transformers' GPT-2 of the same config, measured alternately."""
    import transformers

    vocab = poetry_vocab_size()
    if args.quick:  # a smoke test of the whole path, not a measurement
        config, batch = GPTConfig(block_size=16, vocab_size=vocab, n_layer=1, n_head=2,
                                  n_embd=32), 2
    else:
        config, batch = GPTConfig(block_size=64, vocab_size=vocab, n_layer=4, n_head=4,
                                  n_embd=128), 12
    seq = config.block_size
    torch.manual_seed(0)
    x = torch.randint(vocab, (batch, seq))
    y = torch.randint(vocab, (batch, seq))
    candidates = [("llmbook", GPT, llmbook_loss), ("transformers", hf_gpt2, hf_loss)]
    if args.compile:
        candidates += [(f"{name}+compile", build, loss) for name, build, loss in candidates]
    steps, rungs = {}, {}
    flops_per_token = GPT(config).estimate_flops_per_token(seq)  # the same sizes, the same count
    for name, build, loss_fn in candidates:
        torch.manual_seed(0)
        model = build(config).train()
        n_params = sum(p.numel() for p in model.parameters())
        if name.endswith("+compile"):
            model = compile_cold(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
        steps[name] = train_step(model, loss_fn, optimizer, x, y)
        rungs[name] = {"parameters": n_params, "cold_start_s": cold_start(steps[name]),
                       "times_s": []}
    peak = max(matmul_flops("cpu", n=n, min_seconds=args.min_run_time) for n in (1024, 2048))
    for _ in range(args.repeats):  # interleaved: llmbook, transformers, llmbook, ...
        for name, step in steps.items():
            rungs[name]["times_s"].append(best_seconds(step, args.min_run_time))
    peak = max(peak, *(matmul_flops("cpu", n=n, min_seconds=args.min_run_time)
                       for n in (1024, 2048)))  # again after: the faster of the two readings
    for r in rungs.values():
        r["step_s"] = min(r["times_s"])
        r["tokens_per_s"] = batch * seq / r["step_s"]
        r["flops_per_s"] = r["tokens_per_s"] * flops_per_token
        r["fraction_of_matmul"] = r["flops_per_s"] / peak
    ratios = {}
    for ours, theirs in [("llmbook", "transformers"),
                         ("llmbook+compile", "transformers+compile"),
                         ("llmbook+compile", "llmbook")]:
        if ours in rungs:
            pairs = [t / o for o, t in zip(rungs[ours]["times_s"], rungs[theirs]["times_s"],
                                           strict=True)]
            ratios[f"{ours} / {theirs}"] = {
                "best": rungs[theirs]["step_s"] / rungs[ours]["step_s"],
                "pairs": pairs, "median_pair": statistics.median(pairs)}
    return {"mode": "cpu", "config": config.to_dict(), "batch": batch, "dtype": "float32",
            "flops_per_token": flops_per_token, "matmul_flops_per_s": peak,
            "transformers": transformers.__version__, "rungs": rungs, "ratios": ratios,
            "target_ratio": TARGET_RATIO}


def print_cpu(report: dict) -> None:
    c = report["config"]
    print(f"CPU train step, float32: {c['n_layer']} layers, {c['n_head']} heads, width "
          f"{c['n_embd']}, context {c['block_size']}, batch {report['batch']}, vocabulary "
          f"{c['vocab_size']}; {report['hardware']['cpu']}, {report['hardware']['torch_threads']} "
          f"thread(s); matmul {report['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (float32, best of "
          "n=1024 and 2048)")
    print(f"{'model':<22}{'step ms':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'of matmul':>11}"
          f"{'cold start s':>14}")
    for name, r in report["rungs"].items():
        print(f"{name:<22}{r['step_s'] * 1e3:>9.2f}{r['tokens_per_s']:>10.0f}"
              f"{r['flops_per_s'] / 1e9:>9.2f}{r['fraction_of_matmul']:>10.1%}"
              f"{r['cold_start_s']:>14.2f}")
    for label, r in report["ratios"].items():
        pairs = ", ".join(f"{p:.2f}" for p in r["pairs"])
        print(f"tokens/s {label}: {r['best']:.2f}x best against best, median pair "
              f"{r['median_pair']:.2f}x (pairs: {pairs})")
    load = report.get("load_average")  # absent from reports saved before it was recorded
    if load and load[0] is not None:
        print("load average before and after: " + ", ".join(f"{x:.2f}" for x in load)
              + f" on {report['hardware']['cpu_count']} CPUs")
    main_ratio = report["ratios"]["llmbook / transformers"]["best"]
    print(f"target llmbook >= {report['target_ratio']}x transformers: "
          f"{'met' if main_ratio >= report['target_ratio'] else 'not met'}")


@dataclass(frozen=True)
class Rung:
    """The switches of one rung of the GPU ladder (each rung turns one more on)."""

    name: str
    precision: str = "fp32"  # fp32, tf32 or bf16 (autocast; the weights stay float32)
    flash: bool = False  # SDPA forced to flash attention; before it, to the math backend
    compile: bool = False
    vocab_multiple: int = 1
    fused_adamw: bool = False
    batch: int = 8


def ladder(batches: tuple[int, ...]) -> list[Rung]:
    """The cumulative rungs, the last one trying each of `batches` (largest first)."""
    r = Rung("fp32")
    rungs = [r]
    for name, change in [("tf32", dict(precision="tf32")),
                         ("bf16 autocast", dict(precision="bf16")),
                         ("flash attention", dict(flash=True)),
                         ("torch.compile", dict(compile=True)),
                         ("vocab padded to 64", dict(vocab_multiple=64)),
                         ("fused AdamW", dict(fused_adamw=True))]:
        r = replace(r, name=name, **change)
        rungs.append(r)
    return rungs + [replace(r, name=f"batch {b}", batch=b) for b in batches]


def gpu_peaks(name: str) -> dict[str, float] | None:
    """The dense TFLOP/s of the first GPU_PEAKS entry named in the device's name, if any."""
    return next((peaks for key, peaks in GPU_PEAKS.items() if key in name), None)


@contextlib.contextmanager
def rung_settings(rung: Rung) -> Iterator[None]:
    """Matmul precision and SDPA backend for a rung's steps, restored afterwards."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest" if rung.precision == "fp32" else "high")
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION if rung.flash else SDPBackend.MATH):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def measure_rung(rung: Rung, base: GPTConfig, min_run_time: float) -> dict:
    """Build the model and optimizer of `rung` afresh and time its step on the GPU."""
    torch._dynamo.reset()  # each compiled rung compiles its own model, not a cached graph
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    config = replace(base, vocab_multiple=rung.vocab_multiple)
    with torch.device("cuda"):
        model = GPT(config).train()
    flops_per_token = model.estimate_flops_per_token(config.block_size)  # real vocab: padding
    compiled = compile_cold(model) if rung.compile else model  # is no work
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1,
                                  fused=rung.fused_adamw)
    x = torch.randint(config.vocab_size, (rung.batch, config.block_size), device="cuda")
    y = torch.randint(config.vocab_size, (rung.batch, config.block_size), device="cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if rung.precision == "bf16" \
        else contextlib.nullcontext
    step = train_step(compiled, llmbook_loss, optimizer, x, y, autocast)
    with rung_settings(rung):
        first = cold_start(step)
        seconds = best_seconds(step, min_run_time)
    tokens_per_s = rung.batch * config.block_size / seconds
    return {**asdict(rung), "step_s": seconds, "tokens_per_s": tokens_per_s,
            "flops_per_s": tokens_per_s * flops_per_token, "cold_start_s": first,
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def run_gpu(args: argparse.Namespace) -> dict:
    """The ladder on GPU 0; the batch rungs that run out of memory are recorded as such."""
    if not torch.cuda.is_available():
        raise UserError("--gpu needs a CUDA GPU and this machine has none"
                        + ("" if torch.version.cuda else " (a CPU-only torch build)")
                        + "; run --cpu here")
    base = GPTConfig.gpt2()
    if args.quick:
        base = replace(base, n_layer=2, block_size=256)
    name = torch.cuda.get_device_name(0)
    peaks = gpu_peaks(name)
    rows = []
    for rung in ladder(batches=(32, 16)):
        if rung.name.startswith("batch") and rows[-1]["name"].startswith("batch") \
                and rows[-1]["fits"]:
            continue  # a larger batch already fitted
        print(f"  {rung.name} ...", flush=True)
        out_of_memory = False
        try:
            row = measure_rung(rung, base, args.min_run_time)
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True  # cleaned up outside the handler, whose traceback holds tensors
        if out_of_memory:
            gc.collect()
            torch.cuda.empty_cache()
            rows.append({**asdict(rung), "fits": False})
            continue
        row["fits"] = True
        if peaks:
            row["mfu"] = row["flops_per_s"] / (peaks[rung.precision] * 1e12)
            row["mfu_bf16_peak"] = row["flops_per_s"] / (peaks["bf16"] * 1e12)
        rows.append(row)
        gc.collect()
        torch.cuda.empty_cache()
    return {"mode": "gpu", "config": base.to_dict(), "quick": args.quick,
            "peak_tflops": peaks, "peak_source": "NVIDIA datasheets, dense" if peaks else None,
            "rungs": rows}


def print_gpu(report: dict) -> None:
    c, hw = report["config"], report["hardware"]
    print(f"GPU train step ladder on {hw['gpu']}: {c['n_layer']} layers, width {c['n_embd']}, "
          f"context {c['block_size']}; MFU against the dense peak of each rung's precision, "
          f"and against bf16's ({report['peak_tflops'] or 'unknown device: no MFU'})")
    print(f"{'rung':<20}{'batch':>6}{'step ms':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'MFU bf16':>9}{'memory GiB':>11}{'cold s':>8}")
    for r in report["rungs"]:
        if not r["fits"]:
            print(f"{r['name']:<20}{r['batch']:>6}  out of memory")
            continue
        mfu = f"{r['mfu']:>7.1%}{r['mfu_bf16_peak']:>9.1%}" if "mfu" in r else f"{'-':>7}{'-':>9}"
        print(f"{r['name']:<20}{r['batch']:>6}{r['step_s'] * 1e3:>9.1f}{r['tokens_per_s']:>11.0f}"
              f"{r['flops_per_s'] / 1e12:>9.1f}{mfu}{r['max_memory_gib']:>11.1f}"
              f"{r['cold_start_s']:>8.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cpu", action="store_true", help="llmbook vs transformers on the CPU")
    mode.add_argument("--gpu", action="store_true", help="the PyTorch 2 ladder on a CUDA GPU")
    parser.add_argument("--compile", action="store_true", help="--cpu: add torch.compile rungs")
    parser.add_argument("--quick", action="store_true", help="a tiny model: a smoke test")
    parser.add_argument("--repeats", type=int, default=5, help="--cpu: alternating rounds")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds of steps per measurement (default 1, --quick 0.05)")
    parser.add_argument("--out", help="the JSON file (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.min_run_time is None:
        args.min_run_time = 0.05 if args.quick else 1.0
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    try:
        if args.repeats < 1 or args.min_run_time <= 0:
            raise UserError("--repeats must be at least 1 and --min-run-time positive")
        report = run_gpu(args) if args.gpu else run_cpu(args)
    except UserError as exc:
        print(f"train_speed.py: {exc}", file=sys.stderr)
        return 2
    # processes wanting a CPU, over the last minute, before and after: near or above the core
    # count, other programs competed with the measurement (the ratios, interleaved, suffer less)
    load = [load_before, os.getloadavg()[0] if load_before is not None else None]
    report.update(date=datetime.date.today().isoformat(), torch=torch.__version__,
                  hardware=hardware(), python=platform.python_version(), load_average=load)
    (print_gpu if args.gpu else print_cpu)(report)
    print(f"saved {save(report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
