"""llmbook.memory: exact parameter counts, the activation formula against what autograd really
saves, and the per-GPU arithmetic of DDP, ZeRO-1/2 and FSDP."""

import pytest
import torch

from llmbook.errors import UserError
from llmbook.memory import (
    GPU_MEMORY,
    SIZES,
    STRATEGIES,
    activation_bytes,
    block_activation_bytes,
    measure_saved_bytes,
    memory_table,
    param_count,
    training_memory,
)
from llmbook.model import GPT, GPTConfig

SMALL = (GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=300), 4)
WIDER = (GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=6000,
                   vocab_multiple=64), 12)  # padded to 6016 rows: logits keep 6000


def meta_count(cfg: GPTConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(cfg).parameters())


@pytest.mark.parametrize("name", list(SIZES))
def test_param_count_is_exact(name):
    assert param_count(SIZES[name]) == meta_count(SIZES[name])


def test_param_count_known_values_and_variants():
    assert param_count(GPTConfig.gpt2("gpt2")) == 124_439_808
    assert param_count(GPTConfig.gpt2("gpt2-xl")) == 1_557_611_200
    assert 6.5e9 < param_count(SIZES["7B"]) < 7e9
    for cfg in (GPTConfig(n_layer=3, n_head=2, n_embd=32, vocab_size=101, bias=False),
                GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=101, vocab_multiple=64)):
        assert param_count(cfg) == meta_count(cfg)


def measured(cfg: GPTConfig, batch: int, checkpointing: bool) -> int:
    torch.manual_seed(0)
    model = GPT(cfg)
    model.checkpointing = checkpointing
    idx, targets = torch.randint(0, cfg.vocab_size, (2, batch, cfg.block_size))
    return measure_saved_bytes(model, idx, targets)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("cfg, batch", [SMALL, WIDER])
def test_activation_formula_matches_measurement(cfg, batch, checkpointing):
    real = measured(cfg, batch, checkpointing)
    formula = activation_bytes(cfg, batch, cfg.block_size, checkpointing=checkpointing)
    assert abs(formula - real) <= 0.10 * real
    # negative controls: the same check fails without the log-softmax, or with the wrong mode
    N = batch * cfg.block_size
    assert abs(formula - N * cfg.vocab_size * 4 - real) > 0.10 * real
    other = activation_bytes(cfg, batch, cfg.block_size, checkpointing=not checkpointing)
    assert abs(other - real) > 0.10 * real


def test_measurement_counts_activations_not_parameters():
    """Activations grow with the batch, parameters do not: twice the batch saves twice the bytes,
    less the positions (T int64) and the loss's scalar weight that do not grow."""
    cfg, _ = SMALL
    one, two = measured(cfg, 1, False), measured(cfg, 2, False)
    assert two == 2 * one - 8 * cfg.block_size - 4


def test_checkpointing_keeps_one_input_per_block():
    cfg, batch = WIDER
    T = cfg.block_size
    full, kept = (activation_bytes(cfg, batch, T, checkpointing=c) for c in (False, True))
    per_block = block_activation_bytes(cfg, batch, T)
    assert full - kept == cfg.n_layer * (per_block - batch * T * cfg.n_embd * 4)
    ckpt = training_memory(cfg, batch, T, checkpointing=True)["activations"]
    assert ckpt == kept + per_block  # the peak: one block recomputed in backward


def test_sharding_divides_exactly_the_parts_it_shards():
    cfg, n = GPTConfig.gpt2(), 8
    assert param_count(cfg) % n == 0
    one = training_memory(cfg, 1, 1024, mixed=True)
    mem = {s: training_memory(cfg, 1, 1024, n_gpus=n, strategy=s, mixed=True)
           for s in STRATEGIES if s != "single"}
    parts = ("optimizer", "gradients", "parameters")
    assert mem["ddp"] == one
    for strategy, k in (("zero1", 1), ("zero2", 2), ("fsdp", 3)):
        for i, part in enumerate(parts):
            assert mem[strategy][part] == (one[part] // n if i < k else one[part])
        assert mem[strategy]["activations"] == one["activations"]
    totals = [mem[s]["total"] for s in ("ddp", "zero1", "zero2", "fsdp")]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    P = param_count(cfg)
    assert one["parameters"] + one["gradients"] + one["optimizer"] == 16 * P  # ZeRO's 16 bytes
    fp32 = training_memory(cfg, 1, 1024)
    assert fp32["parameters"] + fp32["gradients"] + fp32["optimizer"] == 16 * P  # 4 + 4 + 8
    odd = training_memory(cfg, 1, 1024, n_gpus=7, strategy="fsdp")
    assert odd["parameters"] == -(-P // 7) * 4  # a padded flat shard per GPU


def test_memory_table_rows():
    rows = memory_table(n_gpus=8)
    assert {r["model"] for r in rows} == set(SIZES)
    assert not any(r["model"].startswith("gpt2") and r["seq_len"] > 1024 for r in rows)
    assert all(r["fits"] == (r["total"] <= GPU_MEMORY) for r in rows)
    big = [r for r in rows if r["model"] == "70B"]
    assert not any(r["fits"] for r in big if r["strategy"] != "fsdp")
    small = [r for r in rows if r["model"] == "gpt2"]
    assert all(r["fits"] for r in small)


@pytest.mark.parametrize("kwargs, words", [
    (dict(strategy="zero4", n_gpus=8), "unknown strategy"),
    (dict(strategy="ddp", n_gpus=0), "n_gpus"),
    (dict(strategy="single", n_gpus=8), "one GPU"),
    (dict(batch=0), "batch"),
    (dict(seq_len=-1), "seq_len"),
    (dict(seq_len=2048), "context"),
])
def test_bad_input_is_a_user_error(kwargs, words):
    args = dict(batch=1, seq_len=128) | kwargs
    with pytest.raises(UserError, match=words):
        training_memory(GPTConfig.gpt2(), args.pop("batch"), args.pop("seq_len"), **args)


def test_dropout_is_not_modelled():
    with pytest.raises(UserError, match="dropout"):
        activation_bytes(GPTConfig(dropout=0.1), 1, 16)
