"""`llmbook align`: DPO and GRPO on the loop of pretraining, resumed exactly, the aligned model
written out, and a one-line error for each bad input."""

import json
import subprocess
import sys

import pytest
import torch

import llmbook.align as align_module
from llmbook.align import align
from llmbook.checkpoint import load_checkpoint
from llmbook.config import AlignConfig, ConfigError
from llmbook.errors import UserError
from llmbook.pretrained import load_any, load_pretrained
from llmbook.train import TrainingInterrupted

TRAIN = {"max_steps": 4, "batch_size": 2, "warmup_steps": 1, "eval_every": 2, "lr": 1e-3,
         "checkpoint_every": 2, "log_every": 1, "weight_decay": 0.0}
GRPO = {"method": "grpo", "prompts": 16, "val_prompts": 4, "group_size": 4,
        "max_new_tokens": 80}


def _grpo(**align):
    return AlignConfig.from_dict({"align": {**GRPO, **align}, "train": TRAIN})


def _pairs_file(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


PAIRS = [{"prompt": f"写一首五言绝句，题目是《{t}》。", "form": "五言绝句",
          "chosen": "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。",
          "rejected": "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼楼楼。"}
         for t in ("春", "夏", "秋", "冬", "山", "水", "月", "风")]


def test_an_interrupted_grpo_run_resumes_to_the_same_weights(tmp_path, interrupt_at_draw):
    whole = align(_grpo(), tmp_path / "whole", progress=False)
    restore = interrupt_at_draw(align_module, "alignment_task")  # Ctrl-C as step 3 samples
    with pytest.raises(TrainingInterrupted) as stopped:
        align(_grpo(), tmp_path / "cut", progress=False)
    assert load_checkpoint(stopped.value.checkpoint)["step"] == 3
    restore()
    resumed = align(_grpo(), tmp_path / "cut", resume=stopped.value.checkpoint, progress=False)
    for (name, a), b in zip(whole.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    sft, _ = load_pretrained("poetry-small-sft")
    assert any(not torch.equal(a, b) for a, b in zip(sft.state_dict().values(),
                                                      whole.model.state_dict().values(),
                                                      strict=True))
    log = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").open()]
    evals = [r for r in log if r["val_loss"] is not None]
    assert [r["step"] for r in evals] == [2, 4]
    for key in ("form", "rhyme", "tone", "reward", "kl", "train_reward", "distinct_endings"):
        assert key in evals[-1], key
    assert evals[-1]["kl"] >= 0 and evals[-1]["val_loss"] == -evals[-1]["reward"]


def test_dpo_with_lora_writes_a_whole_aligned_model(tmp_path):
    cfg = AlignConfig.from_dict({
        "align": {"method": "dpo", "pairs_file": str(_pairs_file(tmp_path, PAIRS)),
                  "val_prompts": 4, "max_new_tokens": 30},
        "method": {"kind": "lora", "rank": 2}, "train": TRAIN})
    result = align(cfg, tmp_path / "dpo", progress=False)
    report = json.loads((tmp_path / "dpo" / "align.json").read_text())
    assert report["method"] == "dpo" and report["pairs"] == len(PAIRS)
    assert 0 < report["trainable_parameters"] < 0.05 * report["parameters"]  # LoRA's A and B
    assert sum(p.numel() for p in result.model.parameters()) < report["parameters"]  # merged
    model, tokenizer, _ = load_any(tmp_path / "dpo" / "model.safetensors")
    sft, sft_tok = load_pretrained("poetry-small-sft")
    assert tokenizer.itos == sft_tok.itos and model.config == sft.config
    changed = [n for (n, a), b in zip(sft.state_dict().items(), model.state_dict().values(),
                                      strict=True) if not torch.equal(a, b)]
    # LoRA touched the blocks' linear layers only: embeddings and LayerNorms are the SFT model's
    assert changed and all(".attn." in n or ".mlp." in n for n in changed)
    log = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").open()]
    first = next(r for r in log if r["val_loss"] is not None)
    assert first["val_loss"] < 0.7  # from log 2 = 0.693 at the start, down on these easy pairs


def test_pairs_whose_replies_are_equal_are_refused(tmp_path):
    rows = [dict(PAIRS[0], rejected=PAIRS[0]["chosen"]), *PAIRS[1:]]
    cfg = AlignConfig.from_dict({"align": {"method": "dpo",
                                           "pairs_file": str(_pairs_file(tmp_path, rows))}})
    with pytest.raises(UserError, match="pair 1: chosen and rejected are the same text"):
        align(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_reference_of_another_shape_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="another shape or vocabulary"):
        align(_grpo(reference="poetry-small"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_resuming_from_another_kind_of_checkpoint_is_refused(tmp_path):
    from llmbook.checkpoint import save_checkpoint

    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, {"step": 1, "model": {"w": torch.zeros(1)},
                           "config": {"model": {}, "data": {}, "train": {}}})
    with pytest.raises(UserError, match="not a checkpoint of llmbook align"):
        align(_grpo(), tmp_path / "run", resume=ckpt, progress=False)


def test_a_base_model_without_the_chat_template_is_refused(tmp_path):
    cfg = AlignConfig.from_dict({"base": {"model": "poetry-small"}, "align": GRPO,
                                 "train": TRAIN})
    with pytest.raises(UserError, match="no chat template tokens"):
        align(cfg, tmp_path / "run", progress=False)


@pytest.mark.parametrize("toml, message", [
    ('[align]\ngroup_size = 1\n', "group_size must be >= 2"),
    ('[align]\nmethod = "dpo"\nbeta = 0\n', "beta must be > 0"),
    ('[align]\nrewards = { elegance = 1.0 }\n', "no reward called ['elegance']"),
])
def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path, toml, message):
    config = tmp_path / "bad.toml"
    config.write_text(toml, encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "llmbook", "align", str(config), "--out",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_the_aligned_model_ships_beside_the_sft_model():
    aligned, tok = load_pretrained("poetry-small-aligned")
    sft, sft_tok = load_pretrained("poetry-small-sft")
    assert aligned.config == sft.config and tok.itos == sft_tok.itos and "<|end|>" in tok.stoi
    assert any(not torch.equal(a, b) for a, b in zip(aligned.state_dict().values(),
                                                      sft.state_dict().values(), strict=True))
