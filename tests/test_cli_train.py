"""`llmbook train`, `llmbook generate` and `llmbook export` from the command line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmbook.cli import main
from llmbook.env import REPO_ROOT

POEM = "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。\n\n"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def write_config(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "corpus.txt").write_text(POEM * 60, encoding="utf-8")
    path = tmp_path / "tiny.toml"
    path.write_text(f"""
[model]
block_size = 16
n_layer = 1
n_head = 2
n_embd = 32

[data]
text_file = "corpus.txt"

[train]
max_steps = 30
batch_size = 8
lr = 1e-2
min_lr = 1e-3
warmup_steps = 3
eval_every = 30
eval_batches = 2
checkpoint_every = 30
device = "cpu"
{extra}
""", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    assert main(["train", str(write_config(tmp)), "--out", str(tmp / "run")]) == 0
    return tmp / "run" / "ckpt.pt"


def test_train_writes_checkpoint_metrics_and_plot(checkpoint, capsys):
    run = checkpoint.parent
    assert {p.name for p in run.iterdir()} == {"ckpt.pt", "metrics.jsonl", "loss.png"}


def test_generate_prints_text(checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "白日",
                 "--max-new-tokens", "20", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("白日") and len(out.strip()) > 5
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "白日",
                 "--max-new-tokens", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out == out  # same seed, same poem


def test_generate_rejects_an_overlong_prompt_cleanly(checkpoint):
    r = subprocess.run([sys.executable, "-m", "llmbook", "generate", "--checkpoint",
                        str(checkpoint), "--prompt", "白日依山尽" * 4], env=ENV,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "20 tokens long, longer than the model's context of 16" in r.stderr


def test_generate_names_unknown_characters(checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "白日xyz"]) == 2
    err = capsys.readouterr().err
    assert "'x' 'y' 'z'" in err and "vocabulary lacks" in err


def test_generate_reports_a_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "none.pt"), "--prompt", "白"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_export_matches_the_checkpoint(checkpoint, tmp_path, capsys):
    from llmbook.checkpoint import load_checkpoint, model_from_checkpoint
    from llmbook.pretrained import load_safetensors

    out = tmp_path / "tiny.safetensors"
    assert main(["export", str(checkpoint), str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["export", str(checkpoint), str(tmp_path / "again.safetensors")]) == 0
    assert (tmp_path / "again.safetensors").read_bytes() == out.read_bytes()  # reproducible
    capsys.readouterr()
    exported, tok, train_config = load_safetensors(out)
    model, tok2 = model_from_checkpoint(load_checkpoint(checkpoint))
    assert tok.itos == tok2.itos and train_config["model"]["n_layer"] == 1
    idx = torch.tensor([tok.encode("白日依山尽")])
    torch.testing.assert_close(exported(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert main(["generate", "--checkpoint", str(out), "--prompt", "白日", "--seed", "1",
                 "--max-new-tokens", "20"]) == 0
    from_file = capsys.readouterr().out
    main(["generate", "--checkpoint", str(checkpoint), "--prompt", "白日", "--seed", "1",
          "--max-new-tokens", "20"])
    assert capsys.readouterr().out == from_file


def test_train_divergence_exits_nonzero_with_one_message(tmp_path, capsys):
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("lr = 1e-2", "lr = 1e6"))
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("llmbook train: training diverged at step ")


def test_train_resume_from_a_bad_checkpoint_is_one_message(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["train", str(write_config(tmp_path)), "--out", str(tmp_path / "run"),
                 "--resume", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"refused to load {bad}: it is corrupted" in err and len(err.splitlines()) == 1
