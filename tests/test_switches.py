"""The speed ladder's switches (chapter 08): each one turns on and off, and a tiny model trained a
few steps on this CPU with it on ends where it ends with it off (per-step losses and final
weights), within the tolerance that switch's arithmetic allows, stated beside each test."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from llmbook.checkpoint import load_checkpoint
from llmbook.config import TrainConfig
from llmbook.metrics import read_metrics
from llmbook.model import Block
from llmbook.train import train

TEXT = "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n" * 40
MODEL = {"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0}
TRAIN = {"max_steps": 8, "batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
         "eval_every": 8, "eval_batches": 1, "checkpoint_every": 8, "log_every": 1, "seed": 0,
         "device": "cpu", "dtype": "float32", "tf32": False, "fused_adamw": "off"}


@dataclass(frozen=True)
class Tolerance:
    """How far a run with a switch on may end from the baseline."""
    loss: float  # relative, on every step's train loss
    weight: float  # absolute, on every final weight (8 Adam steps move one by at most ~0.016)


EXACT = Tolerance(0.0, 0.0)  # the same operations in the same order
# the same sums in another order (float32 rounding); weights whose true gradient is zero (the
# key biases: softmax ignores a shift) walk on rounding noise, which Adam scales to whole steps
REORDERED = Tolerance(1e-5, 1e-5)
# matmuls in a 16-bit float (8 or 11 significant bits): the losses stay within 0.2% (measured:
# 1e-4 for bfloat16), but the noise-driven weights above may walk anywhere Adam can take them
HALF = Tolerance(2e-3, 2e-2)


@dataclass
class Run:
    losses: torch.Tensor  # the train loss of every step, from metrics.jsonl
    weights: dict[str, torch.Tensor]
    checkpoint: Path


def run(folder: Path, model: dict | None = None, **switches) -> Run:
    """Train the tiny model in `folder` with the baseline's settings but `switches`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text(TEXT, encoding="utf-8")
    cfg = TrainConfig.from_dict({"model": {**MODEL, **(model or {})},
                                 "data": {"text_file": str(folder / "corpus.txt")},
                                 "train": {**TRAIN, **switches}})
    result = train(cfg, folder / "run", progress=False)
    rows = read_metrics(folder / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, TRAIN["max_steps"] + 1))
    return Run(torch.tensor([r["train_loss"] for r in rows], dtype=torch.float64),
               result.model.state_dict(), result.checkpoint)


def assert_same_run(ours: Run, base: Run, tolerance: Tolerance) -> None:
    torch.testing.assert_close(ours.losses, base.losses, rtol=tolerance.loss, atol=0.0)
    assert ours.weights.keys() == base.weights.keys()
    for name, weight in base.weights.items():
        torch.testing.assert_close(ours.weights[name], weight, rtol=0.0, atol=tolerance.weight,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Run:
    """Every switch off: float32, no TF32, the for-each AdamW, batch 8 in one micro-step."""
    return run(tmp_path_factory.mktemp("baseline"))


def test_the_tolerances_catch_a_learning_rate_changed_by_a_tenth(baseline, tmp_path):
    """What a switch that silently changed the step size would do: every tolerance fails."""
    nudged = run(tmp_path, lr=TRAIN["lr"] * 1.1)
    for tolerance in (EXACT, REORDERED, HALF):
        with pytest.raises(AssertionError):
            assert_same_run(nudged, baseline, tolerance)


def test_tf32_is_a_no_op_on_the_cpu(baseline, tmp_path):
    assert_same_run(run(tmp_path, tf32=True), baseline, EXACT)  # a CUDA matmul mode only


def test_fused_adamw_steps_as_the_for_each_one(baseline, tmp_path):
    fused = run(tmp_path, fused_adamw="on")
    groups = load_checkpoint(fused.checkpoint)["optimizer"]["param_groups"]
    assert [g["fused"] for g in groups] == [True, True]
    # one kernel per parameter instead of a loop over tensors: the same formula, other roundings
    assert_same_run(fused, baseline, REORDERED)


def test_activation_checkpointing_recomputes_the_same_gradients(baseline, tmp_path, monkeypatch):
    calls, forward = [], Block.forward
    monkeypatch.setattr(Block, "forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    recomputed = run(tmp_path, activation_checkpointing=True)
    # each block runs twice per step (again in the backward pass), once per evaluation batch
    assert len(calls) == MODEL["n_layer"] * (2 * TRAIN["max_steps"] + TRAIN["eval_batches"])
    # the same operations on the same inputs
    assert_same_run(recomputed, baseline, EXACT)


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory) -> Run:
    """Two micro-steps of 4 windows per optimizer step."""
    return run(tmp_path_factory.mktemp("accumulated"), batch_size=4, grad_accum=2)


def test_two_micro_steps_of_half_the_batch_step_as_the_whole_batch(baseline, accumulated):
    # the same 8 windows (drawn in the same order), their gradient summed in two halves
    assert_same_run(accumulated, baseline, REORDERED)


def test_tokens_per_step_picks_the_grad_accum_that_reaches_it(accumulated, tmp_path):
    tokens = 4 * MODEL["block_size"] * 2  # batch 4 x 16 positions x 2 micro-steps
    assert_same_run(run(tmp_path, batch_size=4, tokens_per_step=tokens), accumulated, EXACT)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_trains_as_float32_within_its_precision(baseline, tmp_path, dtype):
    half = run(tmp_path, dtype=dtype)
    assert not torch.equal(half.losses, baseline.losses)  # the matmuls did round
    # float16 also scales the loss (GradScaler); the weights stay float32
    assert_same_run(half, baseline, HALF)


def test_vocab_multiple_pads_rows_that_stay_zero_and_change_nothing_else(baseline, tmp_path):
    padded = run(tmp_path, model={"vocab_multiple": 64})
    vocab = baseline.weights["lm_head.weight"].size(0)
    for name in ("lm_head.weight", "transformer.wte.weight"):  # one matrix, tied
        assert padded.weights[name].size(0) == 64
        assert not padded.weights[name][vocab:].any()  # no loss reaches them: no update
        padded.weights[name] = padded.weights[name][:vocab]
    # the real rows start from the same draws; the output matmul has more rows to sum over
    assert_same_run(padded, baseline, REORDERED)


@pytest.mark.slow  # torch.compile's cold start takes tens of seconds on this CPU
def test_compile_trains_as_eager_does(baseline, tmp_path, capsys, monkeypatch):
    calls, compile_ = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: calls.append(1) or compile_(model))
    compiled = run(tmp_path, compile=True)
    assert calls == [1]
    said = capsys.readouterr().out
    if "torch.compile failed" in said:  # no C compiler, say: the loop went on eagerly
        assert "training eagerly instead" in said
        assert_same_run(compiled, baseline, EXACT)
        pytest.skip(f"torch.compile cannot compile here: {said.strip().splitlines()[0]}")
    assert_same_run(compiled, baseline, REORDERED)  # fused kernels round differently
