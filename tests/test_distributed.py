"""Data-parallel training under torchrun on this CPU (gloo): 2 processes with batch B end where 1
process with batch 2B ends, by DDP and by FSDP2 (the same global batches, gradients averaged)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmbook.checkpoint import load_checkpoint
from llmbook.config import TrainConfig
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
max_steps = 6
batch_size = {batch}
lr = 3e-3
warmup_steps = 2
eval_every = 3
eval_batches = 2
checkpoint_every = 3
log_every = 1
parallel = "{mode}"
"""


def config(tmp_path: Path, batch: int, mode: str = "ddp") -> Path:
    (tmp_path / "corpus.txt").write_text("床前明月光，疑是地上霜。举头望明月，低头思故乡。\n" * 40,
                                         encoding="utf-8")
    path = tmp_path / f"{mode}-{batch}.toml"
    path.write_text(CONFIG.format(batch=batch, mode=mode), encoding="utf-8")
    return path


def two_processes(cfg: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "llmbook", "train", str(cfg), "--out", str(out),
                           "--nproc", "2"], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_end_where_one_with_the_global_batch_ends(tmp_path, mode):
    one = train(TrainConfig.from_toml(config(tmp_path, 8)), tmp_path / "one", progress=False)
    run = two_processes(config(tmp_path, 4, mode), tmp_path / mode)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("done: step 6") == 1  # only rank 0 reports
    state = load_checkpoint(tmp_path / mode / "ckpt.pt")
    assert state["step"] == 6 and state["tokens"] == 6 * 8 * 16
    for name, ours in one.model.state_dict().items():  # float sums in another order: 1e-5
        torch.testing.assert_close(state["model"][name], ours, rtol=1e-4, atol=1e-5)
    # and the 2-process checkpoint resumes in one process with the same optimizer state
    assert set(state["optimizer"]["state"]) == set(range(len(list(one.model.parameters()))))


def test_bad_input_to_a_distributed_run_is_one_line(tmp_path):
    cfg = config(tmp_path, 4)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "ckpt.pt").write_text("x")
    run = two_processes(cfg, tmp_path / "taken")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "already holds a run" in run.stderr
