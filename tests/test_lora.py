"""llmbook.lora: LoRA and Adapters leave the model unchanged at first, train only themselves,
merge exactly, save alone and reload onto a fresh base; and our LoRA equals peft's."""

import pytest
import torch

from llmbook.errors import UserError
from llmbook.lora import (
    LoRALinear,
    apply_adapters,
    apply_lora,
    count_parameters,
    load_adapter,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from llmbook.model import GPT, GPTConfig

CFG = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def _idx():
    return torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_unchanged_at_start_and_only_new_weights_get_gradients(method):
    model, ref = _model(), _model()
    if method == "lora":
        names = apply_lora(model, rank=4, alpha=8)
        assert len(names) == 4 * CFG.n_layer
    else:
        apply_adapters(model, bottleneck=8)
    torch.testing.assert_close(model(_idx())[0], ref(_idx())[0], rtol=0, atol=0)
    _perturb(model)  # a zero B (or up) would give A (or down) no gradient at the start
    _, loss = model(_idx(), _idx())
    loss.backward()
    for name, p in model.named_parameters():
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        assert has_grad == (("lora_" in name) or (".adapter." in name)), name
    trainable, total = count_parameters(model)
    assert 0 < trainable < 0.2 * total


def test_merged_equals_unmerged_and_unmerge_restores_the_base():
    model = _model()
    apply_lora(model, rank=4, alpha=16)
    _perturb(model)
    base = {n: p.clone() for n, p in model.named_parameters() if "base" in n}
    before = model(_idx())[0]
    merge_lora(model)
    torch.testing.assert_close(model(_idx())[0], before, rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    unmerge_lora(model)
    torch.testing.assert_close(model(_idx())[0], before, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_saved_adapter_reloads_onto_a_fresh_base(tmp_path, method):
    model = _model()
    apply_lora(model, rank=2, targets="c_attn") if method == "lora" else apply_adapters(model, 4)
    _perturb(model)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    n_trained = count_parameters(model)[0]
    assert path.stat().st_size < 4 * n_trained + 4096  # only the adapter, not the model
    fresh = load_adapter(_model(), path)
    torch.testing.assert_close(fresh(_idx())[0], model(_idx())[0], rtol=0, atol=0)
    with pytest.raises(UserError, match="another base model"):
        load_adapter(_model(seed=1), path)


def test_bad_lora_settings_are_clear_errors():
    with pytest.raises(UserError, match="match no linear layer"):
        apply_lora(_model(), targets="q_proj")
    with pytest.raises(UserError, match="rank must be an int in"):
        apply_lora(_model(), rank=0)
    with pytest.raises(UserError, match=r"rank must be an int in \[1, 32\]"):
        LoRALinear(torch.nn.Linear(32, 96), rank=33)
    with pytest.raises(UserError, match="not a regular expression"):
        apply_lora(_model(), targets="c_attn(")


def test_our_lora_equals_peft_on_a_transformers_gpt2():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     vocab_size=50, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = GPT.from_hf_gpt2(hf.state_dict(), n_head=2).eval()
    rank, alpha = 4, 8
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                 target_modules=["c_attn"], fan_in_fan_out=True))
    apply_lora(ours, rank=rank, alpha=alpha, targets="c_attn")
    gen = torch.Generator().manual_seed(2)
    for i in range(CFG.n_layer):
        theirs = hf.base_model.model.transformer.h[i].attn.c_attn
        mine = ours.transformer.h[i].attn.c_attn
        a = torch.randn(mine.lora_A.shape, generator=gen)
        b = torch.randn(mine.lora_B.shape, generator=gen) * 0.1  # nonzero: a real update
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(a)
            theirs.lora_B["default"].weight.copy_(b)
            mine.lora_A.copy_(a)
            mine.lora_B.copy_(b)
    idx = _idx()
    expected = hf(input_ids=idx).logits
    torch.testing.assert_close(ours(idx)[0], expected, rtol=1e-4, atol=1e-4)
    with hf.disable_adapter():  # the update is real: it moves the logits
        assert (hf(input_ids=idx).logits - expected).abs().max() > 1e-2
    hf = hf.merge_and_unload()
    merge_lora(ours)
    torch.testing.assert_close(ours(idx)[0], hf(input_ids=idx).logits, rtol=1e-4, atol=1e-4)
