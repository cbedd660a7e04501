"""Data-parallel training under `torchrun`: DDP or FSDP2, one process per device.

torchrun starts the processes and sets RANK, WORLD_SIZE and LOCAL_RANK; `setup` joins them into
one group (gloo on the CPU, NCCL on CUDA). Every rank draws the same global batch from the same
seeded generator and keeps its own slice (`shard`), so N processes see exactly the batches one
process with an N times larger batch would; only rank 0 writes files. `launch` is
`llmbook train --nproc N`: torchrun's own code run for one machine.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError

MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class World:
    """Which process this is among how many; `World()` is a single process."""
    rank: int = 0
    size: int = 1
    mode: str = "none"  # "none", "ddp" or "fsdp"

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, prints and writes files."""
        return self.rank == 0


def world_size() -> int:
    """How many processes torchrun started (1 without torchrun), known before `setup`: tasks
    size their validation batches by the global batch, so every world size validates alike."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(mode: str, device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun's variables describe (a single process if there are none)
    and pick this rank's device (cuda:LOCAL_RANK on GPUs)."""
    size = world_size()
    if size == 1:
        return World(), device
    if mode not in MODES:
        raise UserError(f"[train] parallel must be one of {MODES}, not {mode!r}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"distributed training runs on CUDA (NCCL) or the CPU (gloo), not on "
                        f"{device.type}; set [train] device = 'cpu'")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=
                                device if device.type == "cuda" else None)
    return World(dist.get_rank(), dist.get_world_size(), mode), device


def teardown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World) -> nn.Module:
    """DDP: a wrapper that averages gradients across ranks in backward. FSDP2: each block, then
    the whole model, sharded in place (parameters, gradients and optimizer states split across
    ranks; a block's full weights are gathered just for its forward and backward)."""
    if world.mode == "ddp":
        return nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    if world.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(getattr(model, "transformer", None), "h", []):
            fully_shard(block)
        fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself (DDP wraps it; FSDP2 shards it in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shard(batch: tuple[torch.Tensor, ...], world: World) -> tuple[torch.Tensor, ...]:
    """This rank's rows of a global batch (every rank drew the same one)."""
    if world.size == 1:
        return batch
    n = batch[0].size(0) // world.size
    return tuple(b[world.rank * n:(world.rank + 1) * n] for b in batch)


def mean(values: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of `values` over the ranks (each rank's own losses, say)."""
    if world.size == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)  # gloo has no AVG: sum, then divide
    return values / world.size


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True if `flag` is set on any rank, so that all stop at the same step (Ctrl-C)."""
    if world.size == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def model_state(model: nn.Module, world: World) -> dict:
    """The model's state dict in the single-process layout. FSDP gathers the shards (every rank
    takes part; the tensors end up on the CPU)."""
    if world.mode != "fsdp":
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, world: World
               ) -> tuple[dict, dict]:
    """(model, optimizer) state dicts in the single-process layout, for a checkpoint (FSDP: both
    gathered, as `model_state` does)."""
    if world.mode != "fsdp":
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (model_state(model, world),
            _by_index(get_optimizer_state_dict(model, optimizer, options=options),
                      _names(model, optimizer)))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                         world: World) -> None:
    """The inverse of `full_state` for the optimizer (the model's weights are loaded before
    `wrap`); FSDP keeps each rank's shard of the saved moments."""
    if world.mode != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, _by_name(state, _names(model, optimizer)),
                             options=StateDictOptions(full_state_dict=True))


def grad_sync(model: nn.Module, world: World, last: bool):
    """A context for one micro-step's backward: gradients are averaged across ranks only on the
    last micro-step of an optimizer step (the others just accumulate locally)."""
    if world.mode == "ddp" and not last:
        return model.no_sync()
    if world.mode == "fsdp":
        model.set_requires_gradient_sync(last)
    return nullcontext()


def _names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order `optimizer.state_dict()` numbers them (group by group)."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _by_index(state: dict, names: list[str]) -> dict:
    """An optimizer state keyed by parameter name (FSDP's) as `optimizer.state_dict()` keys it
    (empty on ranks other than 0, where the gathered state is not kept)."""
    if not state:
        return state
    index = {name: i for i, name in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def _by_name(state: dict, names: list[str]) -> dict:
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def launch(nproc: int, argv: list[str]) -> int:
    """Run `llmbook ARGV` in `nproc` processes on this machine through torchrun (PyTorch's
    launcher); the exit status is the first failing worker's, whose message it printed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "--no-python",
         sys.executable, "-m", "llmbook", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        first = min(exc.failures.values(), key=lambda f: f.timestamp)
        return first.exitcode if first.exitcode > 0 else 1
    return 0
