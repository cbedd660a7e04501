"""llmbook.train: config validation, the lr schedule, checkpoints (atomic, safe, verified),
divergence, and resuming bit-identically after a SIGKILL."""

import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llmbook.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from llmbook.config import ConfigError, TrainConfig
from llmbook.data import SlidingWindowDataset, document_starts
from llmbook.env import REPO_ROOT
from llmbook.train import TrainingDiverged, lr_at, param_groups, train

POEM = "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。\n\n"
VARIED = "".join(f"第{i}首：{POEM[(i * 3) % 20:]}{POEM[:(i * 3) % 20]}" for i in range(60))


def write_config(tmp_path: Path, text: str = POEM * 60, name: str = "tiny.toml", **train) -> Path:
    """A tiny model on a text file written next to the config."""
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    settings = {"max_steps": 40, "batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5,
                "eval_every": 20, "eval_batches": 2, "checkpoint_every": 10, "log_every": 5,
                "seed": 0, "device": "cpu", **train}
    lines = ["[model]", "block_size = 16", "n_layer = 2", "n_head = 2", "n_embd = 32",
             "dropout = 0.1", "", "[data]", 'text_file = "corpus.txt"', "", "[train]"]
    lines += [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"'
              for k, v in settings.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines).replace("True", "true").replace("False", "false") + "\n",
                    encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- config

def test_config_loads_and_resolves_paths(tmp_path):
    cfg = TrainConfig.from_toml(write_config(tmp_path))
    assert cfg.model.n_embd == 32 and cfg.train.max_steps == 40
    assert cfg.data.text_file == str((tmp_path / "corpus.txt").resolve())
    assert isinstance(cfg.train.lr, float)


def test_shipped_configs_are_valid():
    from llmbook.config import AlignConfig, FinetuneConfig

    paths = sorted((REPO_ROOT / "configs").glob("*.toml"))
    kinds = {"finetune": FinetuneConfig, "align": AlignConfig}  # the command by name prefix
    for path in paths:
        kinds.get(path.name.split("-")[0], TrainConfig).from_toml(path)
    assert {p.name.split("-")[0] for p in paths} >= {"finetune", "align", "poetry"}


def test_unknown_key_is_named_with_the_valid_ones(tmp_path):
    path = write_config(tmp_path, learning_rate=0.1)
    with pytest.raises(ConfigError, match="learning_rate") as info:
        TrainConfig.from_toml(path)
    assert "'lr'" in str(info.value) and "'warmup_steps'" in str(info.value)
    path.write_text(path.read_text() + "\n[optimizer]\nlr = 1\n")
    with pytest.raises(ConfigError, match="optimizer.*valid keys are.*'train'"):
        TrainConfig.from_toml(path)


def test_wrong_type_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="lr = 'fast' has the wrong type: expected float"):
        TrainConfig.from_toml(write_config(tmp_path, lr="fast"))
    with pytest.raises(ConfigError, match="max_steps .* expected int, got float"):
        TrainConfig.from_toml(write_config(tmp_path, max_steps=10.5))
    with pytest.raises(ConfigError, match="n_embd"):  # GPTConfig's own check: 30 % 4 != 0
        TrainConfig.from_dict({"model": {"n_embd": 30, "n_head": 4}})


def test_missing_data_file_fails_before_any_work(tmp_path, capsys):
    from llmbook.cli import main

    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("corpus.txt", "nowhere.txt"))
    with pytest.raises(ConfigError, match="nowhere.txt does not exist"):
        TrainConfig.from_toml(path)
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nowhere.txt does not exist" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing was started


def test_bad_values_are_errors(tmp_path):
    for bad, pattern in [({"warmup_steps": 40}, "warmup_steps"), ({"min_lr": 1.0}, "min_lr"),
                         ({"dtype": "float8"}, "dtype"), ({"parallel": "tp"}, "parallel"),
                         ({"fused_adamw": True}, "fused_adamw"),
                         ({"tokens_per_step": -1}, "tokens_per_step"),
                         ({"device": "gpu"}, "device")]:
        with pytest.raises(ConfigError, match=pattern):
            TrainConfig.from_toml(write_config(tmp_path, **bad))
    with pytest.raises(ConfigError, match="window_start must be 'random' or 'document'"):
        TrainConfig.from_dict({"data": {"window_start": "poem"}})
    with pytest.raises(ConfigError, match="forms.*not among"):
        TrainConfig.from_dict({"data": {"forms": ["五言绝句", "sonnet"]}})


# ----------------------------------------------------------------------------- schedule, optimizer

def test_lr_schedule_warmup_then_cosine():
    kw = {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "max_steps": 110}
    assert lr_at(0, **kw) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert lr_at(4, **kw) == pytest.approx(5e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, **kw) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway down
    assert lr_at(110, **kw) == pytest.approx(1e-4) and lr_at(500, **kw) == pytest.approx(1e-4)
    decay = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert lr_at(35, **kw) == pytest.approx(1e-4 + 0.45e-3 * (1 + math.cos(math.pi * 0.25)))


def test_weight_decay_on_matrices_and_embeddings_only():
    from llmbook.model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
        "transformer.wte.weight", "transformer.wpe.weight"}  # wte is lm_head too: listed once
    assert all(p.dim() == 1 for p in no_decay["params"])  # biases and LayerNorm weights
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_batches_are_a_function_of_the_generator_state():
    windows = SlidingWindowDataset(torch.arange(100), 8, stride=1)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    x, y = windows.sample(4, g)
    assert torch.equal(y, x + 1) and x.shape == (4, 8)
    g.set_state(state)
    assert torch.equal(windows.sample(4, g)[0], x)


def test_document_windows_start_where_a_text_starts():
    ids = torch.tensor([5, 6, 0, 0, 7, 8, 9, 0, 0, 4, 4, 4, 4, 0, 0, 3, 3])  # 0 is "\n"
    starts = document_starts(ids, newline_id=0, block_size=3)
    assert starts.tolist() == [0, 4, 9]  # 15 would leave less than a full window
    x, y = SlidingWindowDataset(ids, 3, starts=starts).sample(64, torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {5, 7, 4} and torch.equal(x[:, 1:], y[:, :-1])


# ----------------------------------------------------------------------------- training

def test_loss_falls_on_a_repetitive_corpus(tmp_path):
    cfg = TrainConfig.from_toml(write_config(tmp_path, max_steps=60, eval_every=60, lr=1e-2,
                                             min_lr=1e-3))
    result = train(cfg, tmp_path / "run", progress=False)
    # the text repeats a 26-character poem: after 60 steps the model has nearly memorised it
    assert result.val_loss < 0.5, result.val_loss
    rows = [__import__("json").loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text()
            .splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 61, 5))
    assert rows[0]["train_loss"] > 2.0 > 0.5 > rows[-1]["train_loss"]
    assert set(rows[0]) == {"step", "lr", "train_loss", "val_loss", "tokens", "elapsed"}
    assert rows[-1]["tokens"] == 60 * 8 * 16
    assert (tmp_path / "run/loss.png").stat().st_size > 1000


def test_checkpoint_roundtrip_is_atomic_and_exact(tmp_path):
    state = {"step": 3, "model": {"w": torch.randn(4, 5)}, "rng": rng_states(torch.Generator())}
    path = save_checkpoint(tmp_path / "ckpt.pt", state)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind
    loaded = load_checkpoint(path)
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], state["model"]["w"])


def test_rng_states_roundtrip():
    g = torch.Generator().manual_seed(5)
    states = rng_states(g)
    first = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g))
    set_rng_states(states, g)
    second = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g))
    assert first == second


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig.from_toml(write_config(tmp, max_steps=10))
    return train(cfg, tmp / "run", progress=False).checkpoint


def test_truncated_checkpoint_is_a_clear_error(trained_checkpoint, tmp_path):
    data = trained_checkpoint.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="is truncated or corrupted") as info:
            load_checkpoint(bad)
        assert str(bad) in str(info.value)
        assert "resume from an earlier checkpoint" in str(info.value)


def test_flipped_bytes_are_detected(trained_checkpoint, tmp_path):
    data = bytearray(trained_checkpoint.read_bytes())
    middle = len(data) // 2  # inside the tensor data, which torch.load would read silently
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted") as info:
        load_checkpoint(bad)
    assert str(bad) in str(info.value)


class Payload:
    """Unpickling this runs a shell command: what a malicious 'checkpoint' would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = {"model": Payload(marker)}
    cases = [("evil.pt", lambda p: torch.save(evil, p), "asks to call posix.system"),
             ("evil2.pkl", lambda p: p.write_bytes(pickle.dumps(evil, protocol=2)), "posix.system"),
             ("evil5.pkl", lambda p: p.write_bytes(pickle.dumps(evil, protocol=5)), "plain data")]
    for name, write, reason in cases:
        path = tmp_path / name
        write(path)
        with pytest.raises(CheckpointError, match=f"refused to load .*{reason}") as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)
        assert not marker.exists()  # the command did not run
    assert os.system(f"touch {marker}") == 0 and marker.exists()  # but it would have worked


def test_other_shapes_name_the_tensor(trained_checkpoint, tmp_path):
    path = write_config(tmp_path, max_steps=12)
    path.write_text(path.read_text().replace("n_embd = 32", "n_embd = 48"))
    cfg = TrainConfig.from_toml(path)
    with pytest.raises(CheckpointError, match=r"tensor 'transformer\.wte\.weight' has shape "
                                              r"\(24, 32\) but .* wants \(24, 48\)"):
        train(cfg, tmp_path / "run", resume=trained_checkpoint, progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 1000 with a warm-up from 100: the weights blow up within a few steps
    cfg = TrainConfig.from_toml(write_config(tmp_path, lr=1000.0, min_lr=0.0, warmup_steps=10,
                                             checkpoint_every=1))
    with pytest.raises(TrainingDiverged) as info:
        train(cfg, tmp_path / "run", progress=False)
    message = str(info.value)
    step = int(message.split("diverged at step ")[1].split(":")[0])
    assert step >= 2 and "learning rate is too high" in message
    assert str(tmp_path / "run" / "ckpt.pt") in message
    good = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert good["step"] == step - 1
    assert all(torch.isfinite(t).all() for t in good["model"].values())


def test_nan_from_the_model_names_the_step(tmp_path, monkeypatch):
    from llmbook.model import GPT

    cfg = TrainConfig.from_toml(write_config(tmp_path, checkpoint_every=5))
    forward, calls = GPT.forward, []

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls.append(1)
            if len(calls) == 8:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="diverged at step 8: the loss is nan"):
        train(cfg, tmp_path / "run", progress=False)
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == 5


# ----------------------------------------------------------------------------- resume

def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmbook", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """Kill a run after its first checkpoint, resume it, and get the uninterrupted run's weights."""
    config = write_config(tmp_path, text=VARIED, max_steps=100, checkpoint_every=10,
                          eval_every=100)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    uninterrupted = subprocess.Popen(_cli("train", str(config), "--out", str(whole)), env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(_cli("train", str(config), "--out", str(killed)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "ckpt.pt"
    deadline = time.monotonic() + 60
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    stopped_at = load_checkpoint(ckpt)["step"]
    assert 0 < stopped_at < 100

    resumed = subprocess.run(_cli("train", str(config), "--out", str(killed), "--resume",
                                  str(ckpt)), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert uninterrupted.wait() == 0, uninterrupted.stderr.read()[-2000:]

    a, b = load_checkpoint(ckpt), load_checkpoint(whole / "ckpt.pt")
    assert a["step"] == b["step"] == 100
    for name, tensor in b["model"].items():
        assert torch.equal(a["model"][name], tensor), name
    assert torch.equal(a["rng"]["batches"], b["rng"]["batches"])
    log = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if line]
    assert len(log) == 100 // 5  # lines the killed run wrote past its checkpoint were dropped
