"""Data-parallel training under torchrun on this CPU (gloo): 2 processes with batch B end where 1
process with batch 2B ends, by DDP and by FSDP2 (the same global batches, gradients averaged),
and a 2-process run killed and resumed ends where an uninterrupted one ends."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmbook.checkpoint import load_checkpoint
from llmbook.config import TrainConfig
from llmbook.metrics import read_metrics
from llmbook.train import train

CONFIG = """
[model]
block_size = 16
n_layer = 2
n_head = 2
n_embd = 32
[data]
text_file = "corpus.txt"
[train]
max_steps = {steps}
batch_size = {batch}
lr = 3e-3
warmup_steps = 2
eval_every = {every}
eval_batches = 2
checkpoint_every = {every}
keep_every = {keep}
log_every = 1
parallel = "{mode}"
"""


def config(tmp_path: Path, batch: int, mode: str = "ddp", steps: int = 6, every: int = 3,
           keep: int = 0) -> Path:
    (tmp_path / "corpus.txt").write_text("床前明月光，疑是地上霜。举头望明月，低头思故乡。\n" * 40,
                                         encoding="utf-8")
    path = tmp_path / f"{mode}-{batch}.toml"
    path.write_text(CONFIG.format(batch=batch, mode=mode, steps=steps, every=every, keep=keep),
                    encoding="utf-8")
    return path


def command(cfg: Path, out: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "llmbook", "train", str(cfg), "--out", str(out), "--nproc", "2",
            *more]


def two_processes(cfg: Path, out: Path, *more: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command(cfg, out, *more), capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_end_where_one_with_the_global_batch_ends(tmp_path, mode):
    one = train(TrainConfig.from_toml(config(tmp_path, 8)), tmp_path / "one", progress=False)
    run = two_processes(config(tmp_path, 4, mode, keep=6), tmp_path / mode)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("done: step 6") == 1  # only rank 0 reports
    state = load_checkpoint(tmp_path / mode / "ckpt.pt")
    assert state["step"] == 6 and state["tokens"] == 6 * 8 * 16
    # validated on the same windows: batches of the global batch, whatever the world size
    assert abs(state["val_loss"] - one.val_loss) <= 1e-4 * one.val_loss
    for name, ours in one.model.state_dict().items():  # float sums in another order: 1e-5
        torch.testing.assert_close(state["model"][name], ours, rtol=1e-4, atol=1e-5)
    # and the 2-process checkpoint resumes in one process with the same optimizer state
    assert set(state["optimizer"]["state"]) == set(range(len(list(one.model.parameters()))))
    # the weight snapshot of the last step holds what the checkpoint holds (FSDP: gathered)
    snapshot = load_file(tmp_path / mode / "snapshots" / "step-000006.safetensors")
    assert snapshot.keys() == state["model"].keys() - {"lm_head.weight"}
    for name, tensor in snapshot.items():
        assert torch.equal(tensor, state["model"][name]), name


def test_bad_input_to_a_distributed_run_is_one_line(tmp_path):
    cfg = config(tmp_path, 4)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "ckpt.pt").write_text("x")
    run = two_processes(cfg, tmp_path / "taken")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "already holds a run" in run.stderr


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command's name (state, parent, ...); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def kill_past_first_checkpoint(cfg: Path, out: Path, every: int) -> None:
    """Start a 2-process run that checkpoints every `every` steps and SIGKILL it, launcher and
    workers at once (a power cut), once it has logged a step past its first checkpoint."""
    err, log = out.with_name(out.name + ".err"), out / "metrics.jsonl"
    with open(err, "w") as f:
        launcher = subprocess.Popen(command(cfg, out), stdout=subprocess.DEVNULL, stderr=f,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                                    start_new_session=True)
    deadline = time.monotonic() + 120
    while (launcher.poll() is None and time.monotonic() < deadline
           and not (log.exists() and log.read_text(encoding="utf-8").count("\n") > every)):
        time.sleep(0.01)
    # torchrun starts each worker in a session of its own: killing the launcher's process group
    # alone would leave them training
    workers = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
               if (fields := _stat(int(p.parent.name))) and fields[1] == str(launcher.pid)]
    if launcher.poll() is None:
        for group in (*workers, launcher.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
    launcher.wait()
    assert launcher.returncode == -signal.SIGKILL, ("the run ended before it could be killed: "
                                                    + err.read_text()[-2000:])
    assert len(workers) == 2
    while any((fields := _stat(pid)) and fields[0] not in "ZX" for pid in workers):
        time.sleep(0.01)  # until no worker can write another byte


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_killed_and_resumed_run_ends_where_an_uninterrupted_one_ends(tmp_path, mode):
    # 36 steps between the first checkpoint and the last: room for a slow kill on a busy machine
    cfg = config(tmp_path, 4, mode, steps=48, every=12)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    kill_past_first_checkpoint(cfg, killed, every=12)
    stopped_at = load_checkpoint(killed / "ckpt.pt")["step"]
    assert stopped_at in (12, 24, 36)
    assert read_metrics(killed / "metrics.jsonl")[-1]["step"] > stopped_at  # rows to drop
    resumed = two_processes(cfg, killed, "--resume", str(killed / "ckpt.pt"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    uninterrupted = two_processes(cfg, whole)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]

    a, b = load_checkpoint(killed / "ckpt.pt"), load_checkpoint(whole / "ckpt.pt")
    assert a["step"] == b["step"] == 48
    for name, tensor in b["model"].items():  # the same sums in the same order: bit for bit
        assert torch.equal(a["model"][name], tensor), name
    assert torch.equal(a["rng"]["batches"], b["rng"]["batches"])
    # the rows the killed run wrote past its checkpoint were dropped, and the resumed run's rows
    # are the uninterrupted run's (but for the time they took)
    logged = [[{k: v for k, v in row.items() if k != "elapsed"} for row in read_metrics(path)]
              for path in (killed / "metrics.jsonl", whole / "metrics.jsonl")]
    assert [row["step"] for row in logged[0]] == list(range(1, 49))
    assert logged[0] == logged[1]
