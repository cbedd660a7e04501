"""Tensor and pipeline parallelism built by hand on torch.distributed (chapter 08).

Data parallelism (`llmbook.distributed`) keeps a whole copy of the model in every process. When
the model itself is too big for one device it is cut instead: tensor parallelism (Megatron-LM,
Shoeybi et al. 2019) splits each weight matrix across the processes, pipeline parallelism (GPipe,
Huang et al. 2019) gives each process a run of consecutive layers. Both are written here with
plain all-reduce and send/recv, so that every message is in sight. PyTorch's production versions
are `torch.distributed.tensor.parallel` (ColwiseParallel, RowwiseParallel, on DTensor) and
`torch.distributed.pipelining` (PipelineStage with ScheduleGPipe, Schedule1F1B and others).

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m llmbook.parallel tensor

checks the parallel layers against the unsplit ones (`pipeline`: a GPipe step against one process
running the whole model on the whole batch) and prints one JSON line; gloo runs it on the CPU.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError
from .model import MLP, GPTConfig

MODES = ("tensor", "pipeline")
TOLERANCE = 1e-5  # largest absolute difference allowed: float32 sums taken in another order
# every message this process sent: (operation, bytes of the tensor it handed over), for counting
COMMS: list[tuple[str, int]] = []
Event = tuple[str, int, int, float, float]  # (phase F or B, stage, micro-batch, start s, end s)


def _all_reduce(t: Tensor) -> Tensor:
    """The sum of `t` over all processes, as a new tensor (autograd's tensors stay untouched)."""
    t = t.clone()
    dist.all_reduce(t)
    COMMS.append(("all_reduce", t.numel() * t.element_size()))
    return t


class CopyToParallel(torch.autograd.Function):
    """Megatron's f: identity forward, all-reduce of the gradient in backward. It stands before a
    column-parallel layer: each process's slice of the weight contributes a part of dL/dx."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _all_reduce(grad)


class ReduceFromParallel(torch.autograd.Function):
    """Megatron's g, f's conjugate: all-reduce forward, identity backward. It ends a row-parallel
    layer: the partial products of the processes add up to the output, whose gradient each has."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class GatherFromParallel(torch.autograd.Function):
    """All-gather along the last dimension forward, this process's slice of the gradient in
    backward: a column-parallel layer's slices side by side are the full output."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        COMMS.append(("all_gather", x.numel() * x.element_size()))
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.chunk(dist.get_world_size(), dim=-1)[dist.get_rank()].contiguous()


def _shard(t: Tensor, rank: int, world: int, dim: int, what: str) -> nn.Parameter:
    """This process's slice of `t` along `dim`, as a parameter of its own (a copy: the process
    keeps only its slice); the slices must be equal, so `world` has to divide that size."""
    if t.size(dim) % world:
        raise UserError(f"{what}: {t.size(dim)} does not split evenly across {world} processes; "
                        f"choose a number of processes that divides it")
    return nn.Parameter(t.detach().chunk(world, dim)[rank].clone())


class ColumnParallelLinear(nn.Module):
    """`linear` with its outputs split across processes: this one keeps rows `rank` of
    weight.chunk(world, 0) and of the bias. The input is the whole x on every process; the output
    is this process's slice of features (gather=False, for a row-parallel layer next) or all."""

    def __init__(self, linear: nn.Linear, rank: int, world: int, gather: bool = True):
        super().__init__()
        what = "ColumnParallelLinear's output features"
        self.weight = _shard(linear.weight, rank, world, 0, what)
        self.bias = None if linear.bias is None else _shard(linear.bias, rank, world, 0, what)
        self.gather = gather

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(CopyToParallel.apply(x), self.weight, self.bias)
        return GatherFromParallel.apply(y) if self.gather else y


class RowParallelLinear(nn.Module):
    """`linear` with its inputs split across processes: this one keeps columns `rank` of
    weight.chunk(world, 1) and reads the same slice of x's features. The partial products are
    all-reduced, then the (whole) bias is added once, after the sum, not once per process."""

    def __init__(self, linear: nn.Linear, rank: int, world: int):
        super().__init__()
        self.weight = _shard(linear.weight, rank, world, 1, "RowParallelLinear's input features")
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        y = ReduceFromParallel.apply(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class TensorParallelMLP(nn.Module):
    """The model's MLP split as in Megatron: c_fc column-parallel (no gather), GELU on each
    process's slice of hidden units, c_proj row-parallel; one all-reduce forward, one backward."""

    def __init__(self, mlp: MLP, rank: int, world: int):
        super().__init__()
        self.c_fc = ColumnParallelLinear(mlp.c_fc, rank, world, gather=False)
        self.gelu = mlp.gelu
        self.c_proj = RowParallelLinear(mlp.c_proj, rank, world)
        self.dropout = mlp.dropout  # on the summed output: p > 0 needs one seed on every process

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


def split_even(seq: nn.Sequential, k: int) -> list[nn.Sequential]:
    """Chapter 03's cut: k consecutive slices with (almost) equal numbers of modules, sharing the
    modules with `seq`."""
    bounds = torch.linspace(0, len(seq), k + 1).round().long().tolist()
    return [seq[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _send(t: Tensor, dst: int) -> None:
    """Send `t`'s values to process `dst` (which must know its shape and dtype) and count them."""
    dist.send(t.contiguous(), dst)
    COMMS.append(("send", t.numel() * t.element_size()))


def _send_with_shape(t: Tensor, dst: int) -> None:
    """Send `t` after its shape (its number of dimensions, then its sizes), so that the receiver
    can allocate the buffer `dist.recv` fills."""
    dist.send(torch.tensor(t.dim()), dst)
    dist.send(torch.tensor(t.shape), dst)
    _send(t, dst)


def _recv_with_shape(src: int) -> Tensor:
    """A tensor sent by `_send_with_shape` from process `src` (in the default dtype)."""
    ndim = torch.empty((), dtype=torch.long)
    dist.recv(ndim, src)
    shape = torch.empty(int(ndim), dtype=torch.long)
    dist.recv(shape, src)
    t = torch.empty(shape.tolist())
    dist.recv(t, src)
    return t


def gpipe_step(stage: nn.Module, x: Tensor, y: Tensor, n_micro: int
               ) -> tuple[float | None, list[Event]]:
    """Chapter 03's GPipe step with stage s on process s: all forwards, then all backwards (last
    micro-batch first), activations sent forward and their gradients sent back. Stage 0 reads x,
    the last stage y. Returns the loss (on the last stage; None elsewhere) and this stage's
    events, in seconds from rank 0's start, on the clock every process here shares."""
    s, K = dist.get_rank(), dist.get_world_size()
    if x.size(0) % n_micro:
        raise UserError(f"a batch of {x.size(0)} does not split into {n_micro} equal micro-batches")
    xs, ys = x.chunk(n_micro), y.chunk(n_micro)
    inp, out, losses, events = [], [], [], []
    t0 = torch.tensor(time.time(), dtype=torch.float64)
    dist.broadcast(t0, 0)  # rank 0's start; processes on one machine share the wall clock
    t0 = t0.item()
    for m in range(n_micro):
        # a fresh leaf, as in chapter 03; waiting for it is idle time, not part of the event
        inp.append(xs[m] if s == 0 else _recv_with_shape(s - 1).requires_grad_())
        start = time.time() - t0
        out.append(stage(inp[m]))
        if s == K - 1:  # per-micro-batch losses scaled so that they add up to the batch mean
            losses.append(F.mse_loss(out[m], ys[m], reduction="sum") / y.numel())
        events.append(("F", s, m, start, time.time() - t0))
        if s < K - 1:
            _send_with_shape(out[m].detach(), s + 1)  # values only: the graph stays here
    for m in reversed(range(n_micro)):
        if s < K - 1:  # the gradient has the shape of the activation this stage sent
            grad = torch.empty_like(out[m])
            dist.recv(grad, s + 1)
        start = time.time() - t0
        if s == K - 1:
            losses[m].backward()
        else:
            out[m].backward(grad)
        events.append(("B", s, m, start, time.time() - t0))
        if s > 0:
            _send(inp[m].grad, s - 1)
    return (sum(loss.item() for loss in losses) if s == K - 1 else None), events


def _slice_like(full: Tensor, part: Tensor, rank: int, world: int) -> Tensor:
    """The slice of `full` that this process's `part` holds: all of it if the shapes agree, else
    chunk `rank` along the dimension where they differ."""
    dims = [d for d in range(full.dim()) if full.size(d) != part.size(d)]
    return full.chunk(world, dims[0])[rank] if dims else full


def _max_diff(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


def _check_layer(full: nn.Module, part: nn.Module, x: Tensor, x_part: Tensor, rank: int,
                 world: int) -> dict:
    """`full` on x and this process's `part` on its `x_part`, forward and backward with the same
    upstream gradient: the largest differences of output, input gradient and parameter gradients
    (each this process's slice of the full one), the shapes it holds, and its messages."""
    full.zero_grad(set_to_none=True)
    x, x_part = x.clone().requires_grad_(), x_part.clone().requires_grad_()
    y = full(x)
    n = len(COMMS)
    y_part = part(x_part)
    forward = COMMS[n:]
    dy = torch.randn_like(y)  # the same on every process: the same seed, the same draws
    y.backward(dy)
    n = len(COMMS)
    y_part.backward(dy)
    full_params = dict(full.named_parameters())
    grads = [_max_diff(p.grad, _slice_like(full_params[name].grad, p, rank, world))
             for name, p in part.named_parameters()]
    return {"max_abs_diff": {"output": _max_diff(y_part, y),
                             "input_grad": _max_diff(x_part.grad, _slice_like(x.grad, x_part,
                                                                              rank, world)),
                             "param_grads": max(grads)},
            "shapes": {name: list(p.shape) for name, p in part.named_parameters()},
            "forward": forward, "backward": COMMS[n:]}


def check_tensor(rank: int, world: int) -> dict:
    """A column-parallel Linear (gathered), a row-parallel Linear and the tensor-parallel MLP,
    each against the unsplit layer it was cut from (GPT-like sizes, n_embd 32, hidden 128)."""
    mlp = MLP(GPTConfig(n_embd=32, n_head=1))  # nn.Linear's own init: the biases are not zero
    x, hidden = torch.randn(4, 8, 32), torch.randn(4, 8, 128)  # (batch, time, features)
    return {"column": _check_layer(mlp.c_fc, ColumnParallelLinear(mlp.c_fc, rank, world), x, x,
                                   rank, world),
            "row": _check_layer(mlp.c_proj, RowParallelLinear(mlp.c_proj, rank, world), hidden,
                                hidden.chunk(world, -1)[rank], rank, world),
            "mlp": _check_layer(mlp, TensorParallelMLP(mlp, rank, world), x, x, rank, world)}


def check_pipeline(rank: int, world: int, n_micro: int = 4) -> dict:
    """Chapter 03's model and batch cut into `world` stages, one per process, for one GPipe step
    against the unsplit model on the whole batch: loss and this stage's parameter gradients."""
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(32, 32), nn.GELU())],
                          nn.Linear(32, 8))
    reference = copy.deepcopy(model)  # the unsplit model, same weights
    x, y = torch.randn(32, 32), torch.randn(32, 8)
    stage = split_even(model, world)[rank]
    for _ in range(2):  # the second step is the one timed: a process's first backward is slow
        model.zero_grad(set_to_none=True)
        COMMS.clear()
        loss, events = gpipe_step(stage, x, y, n_micro)
    ref_loss = F.mse_loss(reference(x), y)
    ref_loss.backward()
    mine = {id(p) for p in stage.parameters()}
    grads = [_max_diff(p.grad, q.grad) for p, q in
             zip(model.parameters(), reference.parameters(), strict=True) if id(p) in mine]
    return {"loss": loss, "reference_loss": ref_loss.item(), "param_grads": max(grads, default=0),
            "modules": [type(m).__name__ for m in stage],
            "params": sum(p.numel() for p in stage.parameters()),
            "sent_bytes": sum(n for _, n in COMMS), "events": events, "micro_batches": n_micro}


def _tensor_report(parts: list[dict]) -> tuple[dict, float]:
    """Rank 0's summary of every process's `check_tensor`, and the largest difference in it."""
    report = {}
    for name in parts[0]:
        layer = [p[name] for p in parts]
        report[name] = {"max_abs_diff": {k: max(p["max_abs_diff"][k] for p in layer)
                                         for k in layer[0]["max_abs_diff"]},
                        "shapes": [p["shapes"] for p in layer],
                        "forward": layer[0]["forward"], "backward": layer[0]["backward"]}
    return report, max(max(r["max_abs_diff"].values()) for r in report.values())


def _pipeline_report(parts: list[dict]) -> tuple[dict, float]:
    """Rank 0's summary of every stage's `check_pipeline`, and the largest difference in it."""
    last = parts[-1]
    diff = {"loss": abs(last["loss"] - last["reference_loss"]),
            "param_grads": max(p["param_grads"] for p in parts)}
    events = sorted((e for p in parts for e in p["events"]), key=lambda e: e[3])
    return {"loss": last["loss"], "reference_loss": last["reference_loss"],
            "max_abs_diff": diff, "micro_batches": last["micro_batches"],
            "stages": [{"modules": p["modules"], "params": p["params"],
                        "sent_bytes": p["sent_bytes"]} for p in parts],
            "events": [[ph, s, m, round(a, 6), round(b, 6)] for ph, s, m, a, b in events]
            }, max(diff.values())


def main(argv: list[str] | None = None) -> int:
    """`-m llmbook.parallel tensor|pipeline` under torchrun: every process checks its part, rank 0
    prints one JSON line. Exit 1 if a difference passes TOLERANCE, 2 for a command it cannot run."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) != 1 or args[0] not in MODES:
            raise UserError(f"give one mode, {' or '.join(MODES)} (got {' '.join(args) or 'none'})")
        if "WORLD_SIZE" not in os.environ:
            raise UserError("run it under torchrun: python -m torch.distributed.run --standalone "
                            f"--nproc-per-node 2 -m llmbook.parallel {args[0]}")
        dist.init_process_group("gloo")
        try:
            torch.manual_seed(0)  # every process builds the same layers, batch and gradients
            rank, world = dist.get_rank(), dist.get_world_size()
            part = (check_tensor if args[0] == "tensor" else check_pipeline)(rank, world)
            parts = [None] * world if rank == 0 else None
            dist.gather_object(part, parts, dst=0)
        finally:
            dist.destroy_process_group()
    except UserError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process fails alike
            print(f"llmbook.parallel: {exc}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    report, worst = (_tensor_report if args[0] == "tensor" else _pipeline_report)(parts)
    print(json.dumps({"mode": args[0], "world": world, "tolerance": TOLERANCE, **report}))
    if worst > TOLERANCE:
        print(f"llmbook.parallel: the parallel {args[0]} result differs from the unsplit one by "
              f"{worst:.2e} (more than {TOLERANCE:g})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
