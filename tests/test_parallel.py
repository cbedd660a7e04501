"""Tensor and pipeline parallelism by hand (llmbook.parallel): 2 processes on this CPU (gloo,
through torchrun) compute what the unsplit layer or model computes, outputs and gradients."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from llmbook.errors import UserError
from llmbook.parallel import ColumnParallelLinear, main


def two_processes(mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "llmbook.parallel", mode],
                          capture_output=True, text=True, env=env, timeout=120)


def report(mode: str) -> dict:
    run = two_processes(mode)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 1, run.stdout  # rank 0 prints one line, rank 1 nothing
    return json.loads(lines[0])


def test_column_slices_side_by_side_are_the_unsplit_layer():
    # no process group needed: without input gradients a column-parallel forward and its weight
    # gradients involve no message. Slicing the weight along its input columns instead (8 x 4
    # pieces of the square 8 x 8 weight), or the bias otherwise, fails here.
    torch.manual_seed(0)
    full = nn.Linear(8, 8)
    x = torch.randn(3, 8)
    parts = [ColumnParallelLinear(full, rank, 2, gather=False) for rank in range(2)]
    outs = [part(x) for part in parts]
    torch.testing.assert_close(torch.cat(outs, -1), full(x))
    full(x).pow(2).sum().backward()
    torch.cat(outs, -1).pow(2).sum().backward()
    for rank, part in enumerate(parts):
        assert part.weight.shape == (4, 8)
        torch.testing.assert_close(part.weight.grad, full.weight.grad[4 * rank:4 * (rank + 1)])
        torch.testing.assert_close(part.bias.grad, full.bias.grad[4 * rank:4 * (rank + 1)])


def test_an_uneven_split_is_a_user_error():
    with pytest.raises(UserError, match="6 does not split evenly across 4 processes"):
        ColumnParallelLinear(nn.Linear(4, 6), 0, 4)


def test_a_bad_mode_or_no_torchrun_is_one_line_and_status_2(capsys, monkeypatch):
    assert main(["data"]) == 2
    assert capsys.readouterr().err.strip() == \
        "llmbook.parallel: give one mode, tensor or pipeline (got data)"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert main(["tensor"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run it under torchrun" in err


def test_tensor_parallel_layers_equal_the_unsplit_ones_with_one_all_reduce_each_way():
    r = report("tensor")
    assert r["mode"] == "tensor" and r["world"] == 2
    for name in ("column", "row", "mlp"):  # output, input gradient, every gradient slice
        assert max(r[name]["max_abs_diff"].values()) <= r["tolerance"] == 1e-5, (name, r[name])
    # each process holds half of every weight: the output rows (column), the input columns (row);
    # a row-parallel layer keeps the whole bias, added once after the sum (added on both
    # processes it would be counted twice, and the row output would be off by the bias)
    assert r["column"]["shapes"] == [{"weight": [64, 32], "bias": [64]}] * 2
    assert r["row"]["shapes"] == [{"weight": [32, 64], "bias": [32]}] * 2
    assert r["mlp"]["shapes"] == [{"c_fc.weight": [64, 32], "c_fc.bias": [64],
                                   "c_proj.weight": [32, 64], "c_proj.bias": [32]}] * 2
    activation = 4 * 8 * 32 * 4  # (batch, time, n_embd) float32
    assert r["mlp"]["forward"] == r["mlp"]["backward"] == [["all_reduce", activation]]  # Megatron
    assert r["column"]["forward"] == [["all_gather", 2 * activation]]  # its 64 of 128 features
    assert r["column"]["backward"] == r["row"]["forward"] == [["all_reduce", activation]]
    assert r["row"]["backward"] == []


def test_a_gpipe_step_across_two_processes_equals_the_whole_model_on_the_whole_batch():
    r = report("pipeline")
    assert r["mode"] == "pipeline" and r["world"] == 2 and r["micro_batches"] == 4
    assert max(r["max_abs_diff"].values()) <= r["tolerance"], r["max_abs_diff"]
    assert abs(r["loss"] - r["reference_loss"]) <= 1e-5 * r["reference_loss"]
    assert [s["modules"] for s in r["stages"]] == [["Linear", "GELU"] * 2,
                                                   ["Linear", "GELU"] * 2 + ["Linear"]]
    assert [s["params"] for s in r["stages"]] == [2 * 1056, 2 * 1056 + 264]
    # 4 micro-batches of (8, 32) float32: activations forward from stage 0, gradients back
    assert [s["sent_bytes"] for s in r["stages"]] == [4 * 8 * 32 * 4] * 2
    events = {(phase, s, m): (start, end) for phase, s, m, start, end in r["events"]}
    assert len(events) == len(r["events"]) == 2 * 2 * 4
    for s in range(2):  # on each stage all forwards (micro-batch 0 first), then all backwards
        order = sorted((v[0], phase, m) for (phase, stage, m), v in events.items() if stage == s)
        assert [(phase, m) for _, phase, m in order] == \
            [("F", m) for m in range(4)] + [("B", m) for m in reversed(range(4))]
    for m in range(4):  # one clock: stage 1 starts on a micro-batch only after stage 0 sent it
        assert events["F", 1, m][0] >= events["F", 0, m][1]
        assert events["B", 0, m][0] >= events["B", 1, m][1]
