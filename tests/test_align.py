"""llmbook.align: the DPO loss, GRPO's advantages, loss and KL, the reference with LoRA switched
off, and the config's bad input."""

import math

import pytest
import torch

from llmbook.align import (
    Pair,
    check_pairs,
    dpo_loss,
    group_advantages,
    grpo_loss,
    kl_estimate,
    read_pairs,
    sequence_logprobs,
    token_logprobs,
)
from llmbook.config import AlignConfig, ConfigError
from llmbook.errors import UserError
from llmbook.lora import adapters_disabled, apply_lora
from llmbook.model import GPT, GPTConfig


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16))


# ----------------------------------------------------------------------------- DPO

def test_dpo_loss_is_its_closed_form():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    beta = 0.5
    expected = [-math.log(1 / (1 + math.exp(-beta * ((a - c) - (b - d)))))
                for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(),
                                      strict=True)]
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta), torch.tensor(sum(expected) / 2))


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference():
    logp = torch.tensor([-7.0, -1.5, -30.0])
    other = torch.tensor([-2.0, -9.0, -4.0])
    assert dpo_loss(logp, other, logp, other, 0.1).item() == pytest.approx(math.log(2))


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-3.0], requires_grad=True)
    rejected = torch.tensor([-3.0], requires_grad=True)
    dpo_loss(chosen, rejected, torch.tensor([-3.0]), torch.tensor([-3.0]), 0.1).backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent: chosen up, rejected down


def test_dpo_rejects_a_beta_that_is_not_positive():
    t = torch.zeros(1)
    for beta in (0.0, -0.1, float("nan")):
        with pytest.raises(UserError, match="beta"):
            dpo_loss(t, t, t, t, beta)


def test_pairs_with_equal_replies_are_refused(tmp_path):
    with pytest.raises(UserError, match="same text"):
        check_pairs([Pair("写一首诗", "五言绝句", "山高月小", "山高月小")])
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "form": "五言绝句", "chosen": "a", "rejected": "a"}\n',
                    encoding="utf-8")
    with pytest.raises(UserError, match="pair 1"):
        read_pairs(path)
    path.write_text('{"prompt": "p", "chosen": "a"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 1"):
        read_pairs(path)


# ----------------------------------------------------------------------------- GRPO

def test_group_advantages_have_zero_mean_and_ignore_equal_groups():
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3]])
    adv = group_advantages(rewards)
    torch.testing.assert_close(adv.mean(1), torch.zeros(2))
    assert torch.equal(adv[1], torch.zeros(4))
    assert adv[0, 0] > adv[0, 2] > adv[0, 1]
    with pytest.raises(UserError, match="group"):
        group_advantages(torch.ones(3, 1))


def _batch():
    """Two replies after a 3-token prompt, the second one shorter (right padding)."""
    x = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8, 0]])
    y = torch.tensor([[-100, -100, 4, 5, 6, 9], [-100, -100, 7, 8, 9, -100]])
    return x, y


def test_grpo_ignores_prompt_and_padding_tokens():
    model = tiny_gpt()
    x, y = _batch()
    logp = token_logprobs(model, x, y)
    assert torch.equal(logp[y == -100], torch.zeros(int((y == -100).sum())))
    ref = logp.detach() + 0.1 * torch.randn_like(logp)
    mask = y != -100
    loss = grpo_loss(logp, logp.detach(), ref, torch.tensor([1.0, -1.0]), mask)
    # the loss of a reply is the mean over its response tokens: garbage elsewhere changes nothing
    noisy_ref = torch.where(mask, ref, torch.full_like(ref, 50.0))
    torch.testing.assert_close(loss, grpo_loss(logp, logp.detach(), noisy_ref,
                                               torch.tensor([1.0, -1.0]), mask))
    torch.testing.assert_close(sequence_logprobs(model, x, y), logp.sum(-1))


def test_a_group_of_equal_rewards_gives_no_gradient():
    model = tiny_gpt()
    x, y = _batch()
    logp = token_logprobs(model, x, y)
    adv = group_advantages(torch.tensor([[0.5, 0.5]])).flatten()
    grpo_loss(logp, logp.detach(), logp.detach(), adv, y != -100).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_grpo_pushes_the_better_reply_up():
    model = tiny_gpt()
    x, y = _batch()
    logp = token_logprobs(model, x, y)
    loss = grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0, -1.0]), y != -100)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
        after = sequence_logprobs(model, x, y)
    before = logp.sum(-1).detach()
    assert after[0] > before[0] and after[1] < before[1]


def test_kl_estimate_is_non_negative_and_zero_for_identical_models():
    a, b = torch.randn(1000), torch.randn(1000)
    assert (kl_estimate(a, b) >= 0).all()
    assert torch.equal(kl_estimate(a, a), torch.zeros(1000))


def test_grpo_clips_the_ratio():
    logp, old = torch.tensor([[0.5]]), torch.tensor([[0.0]])  # ratio e^0.5 ≈ 1.65
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss = grpo_loss(logp, old, logp, torch.tensor([1.0]), mask, clip_eps=0.2, kl_beta=0.0)
    assert loss.item() == pytest.approx(-1.2)  # min(1.65, 1.2) for a positive advantage


# ----------------------------------------------------------------------------- LoRA reference

def test_switching_adapters_off_gives_the_reference_logits_exactly():
    model = tiny_gpt()
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        reference = model(x)[0].clone()
    apply_lora(model, rank=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
        assert not torch.equal(model(x)[0], reference)
        with adapters_disabled(model):
            assert torch.equal(model(x)[0], reference)
        assert not torch.equal(model(x)[0], reference)  # switched back on


def test_lora_alignment_changes_only_adapter_parameters():
    model = tiny_gpt()
    apply_lora(model, rank=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = _batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        logp = token_logprobs(model, x, y)
        with torch.no_grad(), adapters_disabled(model):
            ref = token_logprobs(model, x, y)
        grpo_loss(logp, logp.detach(), ref, torch.tensor([1.0, -1.0]), y != -100).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("align, message", [
    ({"method": "dpo", "beta": 0.0}, "beta must be > 0"),
    ({"method": "dpo", "beta": -1}, "beta must be > 0"),
    ({"group_size": 1}, "group_size must be >= 2"),
    ({"rewards": {"form": 1.0, "beauty": 1.0}}, "no reward called \\['beauty'\\]"),
    ({"rewards": {"form": -1.0}}, "none negative"),
    ({"rewards": {}}, "at least one positive"),
    ({"method": "ppo"}, "'dpo' or 'grpo'"),
    ({"rewards": {"form": "high"}}, "wrong type"),
    ({"clip_eps": 1.5}, "clip_eps"),
    ({"pairs_file": "nowhere.jsonl", "method": "dpo"}, "does not exist"),
])
def test_align_config_rejects_bad_input(align, message):
    with pytest.raises(ConfigError, match=message):
        AlignConfig.from_dict({"align": align})


def test_align_config_rejects_adapters_and_pretraining_knobs():
    with pytest.raises(ConfigError, match="'full' or 'lora'"):
        AlignConfig.from_dict({"method": {"kind": "adapter"}})
    with pytest.raises(ConfigError, match="sample_every"):
        AlignConfig.from_dict({"train": {"sample_every": 10}})
    with pytest.raises(ConfigError, match="unknown key"):
        AlignConfig.from_dict({"align": {"betta": 0.1}})


def test_write_prompts_leave_room_for_a_reply():
    from llmbook.align import write_prompts
    from llmbook.pretrained import load_pretrained

    _, tok = load_pretrained("poetry-small-sft")
    prompts = write_prompts(tok, "val", 0, room=100, block_size=128)
    assert prompts and all(len(p.ids) + 100 <= 128 for p in prompts)
    assert len(prompts) < len(write_prompts(tok, "val", 0, room=10, block_size=128))
    with pytest.raises(UserError, match="leaves 200 tokens"):
        write_prompts(tok, "val", 5, room=200, block_size=128)
