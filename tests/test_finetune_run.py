"""`llmbook finetune`: the pretraining loop on a fine-tuning task, resumed exactly, with what it
learned written out, and a one-line error for each bad input."""

import json
import subprocess
import sys

import pytest
import torch

import llmbook.finetune as finetune_module
from llmbook.checkpoint import load_checkpoint
from llmbook.config import ConfigError, FinetuneConfig
from llmbook.errors import UserError
from llmbook.finetune import finetune
from llmbook.lora import load_adapter
from llmbook.model import load_model
from llmbook.pretrained import load_pretrained
from llmbook.train import TrainingInterrupted

TRAIN = {"max_steps": 6, "batch_size": 4, "warmup_steps": 1, "eval_every": 3,
         "checkpoint_every": 3, "eval_batches": 1, "log_every": 1}


def _cfg(kind="classify", method=None, **train):
    return FinetuneConfig.from_dict({
        "task": {"kind": kind, "train_examples": 32, "val_examples": 8},
        "method": method or {"kind": "lora", "rank": 2}, "train": {**TRAIN, **train}})


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, interrupt_at_draw):
    whole = finetune(_cfg(), tmp_path / "whole", progress=False)
    restore = interrupt_at_draw(finetune_module, "finetuning_task")  # Ctrl-C during the third step
    with pytest.raises(TrainingInterrupted) as stopped:
        finetune(_cfg(), tmp_path / "cut", progress=False)
    assert load_checkpoint(stopped.value.checkpoint)["step"] == 3
    restore()
    resumed = finetune(_cfg(), tmp_path / "cut", resume=stopped.value.checkpoint, progress=False)
    for (name, a), b in zip(whole.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    report = json.loads((tmp_path / "cut" / "finetune.json").read_text())
    assert 0 <= report["val_accuracy"] <= 1 and report["trainable_parameters"] < 100_000


def test_classifier_lora_adapter_reloads_onto_the_base(tmp_path):
    result = finetune(_cfg(), tmp_path / "run", progress=False)
    gpt, _ = load_pretrained()
    fresh = load_adapter(finetune_module.GPTClassifier(gpt, 2), tmp_path / "run" /
                         "adapter.safetensors").eval()
    x = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(fresh(x)[0], result.model.cpu()(x)[0])


def test_instruction_tuning_writes_a_whole_model_with_the_chat_tokens(tmp_path):
    result = finetune(_cfg("instruct", max_steps=2, eval_every=2, checkpoint_every=2),
                      tmp_path / "run", progress=False)
    model = load_model(tmp_path / "run" / "model.safetensors")
    assert model.config.vocab_size == result.tokenizer.vocab_size
    assert result.tokenizer.itos[-3:] == list(finetune_module.CHAT_TOKENS)
    x = torch.tensor([[5, 6, result.tokenizer.vocab_size - 1]])
    torch.testing.assert_close(model(x)[0], result.model.cpu()(x)[0], rtol=1e-5, atol=1e-5)


def _generate(*args):
    return subprocess.run([sys.executable, "-m", "llmbook", "generate", *args],
                          capture_output=True, text=True)


def test_generate_chat_answers_with_an_instruction_tuned_model_only(tmp_path):
    finetune(_cfg("instruct", max_steps=2, eval_every=2, checkpoint_every=2), tmp_path / "run",
             progress=False)
    model = str(tmp_path / "run" / "model.safetensors")
    answer = _generate("--checkpoint", model, "--chat", "--prompt", "写一首五言绝句",
                       "--max-new-tokens", "8")
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
    assert "写一首" not in answer.stdout  # the answer alone, not the prompt
    plain = _generate("--chat", "--prompt", "写一首五言绝句")
    assert plain.returncode == 2 and "has no chat template" in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1


def test_resuming_on_another_base_model_is_refused(tmp_path):
    finetune(_cfg(max_steps=3), tmp_path / "run", progress=False)
    ckpt = tmp_path / "run" / "ckpt.pt"
    state = load_checkpoint(ckpt)
    state["base_sha256"] = "0" * 64
    with pytest.raises(UserError, match="another base model"):
        finetune_module.finetuning_task(_cfg(max_steps=3), state, str(ckpt))


@pytest.mark.parametrize("raw, message", [
    ({"task": {"kind": "translate"}}, "kind must be 'classify' or 'instruct'"),
    ({"task": {"kind": "instruct"}, "method": {"kind": "freeze"}}, "needs \\[task\\] kind"),
    ({"method": {"kind": "freeze", "freeze": "first:2"}}, "must be 'head' or 'last:N'"),
    ({"method": {"rank": 0}}, "rank >= 1"),
    ({"method": {"lr": 1e-3}}, "unknown key"),
    ({"train": {"keep_every": 10}}, "keep_every"),
])
def test_bad_configs_are_clear_errors(raw, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig.from_dict(raw)


@pytest.mark.parametrize("method, message", [
    ({"kind": "lora", "targets": "q_proj"}, "match no linear layer"),
    ({"kind": "lora", "rank": 500}, "rank must be an int in"),
    ({"kind": "freeze", "freeze": "last:9"}, "N must be in 1..4"),
])
def test_bad_methods_fail_before_the_run_starts(tmp_path, method, message):
    with pytest.raises(UserError, match=message):
        finetune(_cfg(method=method), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[base]\nmodel = "missing.safetensors"\n')
    run = subprocess.run([sys.executable, "-m", "llmbook", "finetune", str(config), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmbook finetune:") and "missing" in lines[0]
