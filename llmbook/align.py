"""Preference tuning after SFT (偏好对齐): DPO on pairs made by scoring the model's own samples,
and GRPO, reinforcement learning from rewards a program checks (form, rhyme and tones from
`llmbook.eval`). `align` runs either on the loop of pretraining for `llmbook align`.

Both tie the policy to a frozen reference (the SFT model): DPO through its loss, GRPO through a KL
penalty. With LoRA the reference is the same model with its adapters switched off.
"""

from __future__ import annotations

import copy
import json
import math
import random
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_checkpoint
from .config import AlignConfig, ConfigError
from .data import load_poems
from .distributed import world_size
from .env import seed_everything
from .errors import UserError
from .eval import mean_loss, poem_rates, total_reward
from .finetune import END, encode_chat, sft_batch
from .generate import generate, left_pad
from .lora import adapters_disabled, apply_lora, count_parameters, merge_and_unload
from .model import GPT, save_pretrained, tensors_digest
from .pretrained import load_any
from .tasks import REGULAR_FORMS, write_prompt
from .tokenizer import CharTokenizer
from .train import Task, TrainResult, fit

REPORT_NAME = "align.json"  # what a run measured, written beside its checkpoint


# ----------------------------------------------------------------------------- log-probabilities

def token_logprobs(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """log p(y_t | x_<=t) at every position, (B, T); 0 where y is -100 (prompt and padding)."""
    logits, _ = model(x)
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (y != -100)


def sequence_logprobs(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """log p(response | prompt) of each row, (B,): the sum over the response's tokens."""
    return token_logprobs(model, x, y).sum(-1)


# ----------------------------------------------------------------------------- DPO

def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float) -> Tensor:
    """Direct Preference Optimization (Rafailov et al., 2023): -log σ(β (Δ_chosen - Δ_rejected))
    with Δ = log π(y|x) - log π_ref(y|x), averaged over pairs; log 2 while π is the reference."""
    if not beta > 0:
        raise UserError(f"DPO's beta must be > 0, got {beta}")
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


@dataclass(frozen=True)
class Pair:
    """A preference pair: two replies to one prompt, the one with the higher reward chosen."""
    prompt: str
    form: str
    chosen: str
    rejected: str
    margin: float = math.nan  # reward(chosen) - reward(rejected), when scored


def check_pairs(pairs: list[Pair], source: str = "pairs") -> None:
    """A clear error for pairs DPO cannot learn from: equal or empty replies."""
    for i, p in enumerate(pairs):
        if not p.prompt or not p.chosen or not p.rejected:
            raise UserError(f"{source} pair {i + 1}: prompt, chosen and rejected must not be empty")
        if p.chosen == p.rejected:
            raise UserError(f"{source} pair {i + 1}: chosen and rejected are the same text, so "
                            "there is no preference to learn; drop the pair")


def read_pairs(path: str | Path) -> list[Pair]:
    """Pairs from a JSON-lines file of {"prompt", "form", "chosen", "rejected"} objects."""
    pairs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append(Pair(row["prompt"], row["form"], row["chosen"], row["rejected"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{path} line {n} is not a pair object with prompt, form, chosen "
                            f"and rejected ({type(exc).__name__}: {exc})") from None
    if not pairs:
        raise UserError(f"{path} holds no pairs")
    check_pairs(pairs, str(path))
    return pairs


# ----------------------------------------------------------------------------- sampling, rewards

@dataclass(frozen=True)
class Prompt:
    """A "write" instruction: its text, the form asked for, and its ids in the chat template."""
    text: str
    form: str
    ids: tuple[int, ...]


def write_prompts(tokenizer: CharTokenizer, split: str, n: int, seed: int = 0,
                  room: int = 80, block_size: int = 128) -> list[Prompt]:
    """Up to `n` (0 = all) "write" prompts (`tasks.write_prompt`) for the titles of one split's
    regular poems, in a seeded order, leaving out titles with characters the vocabulary lacks
    and prompts that leave less than `room` tokens for the reply in a context of `block_size`."""
    poems = load_poems(split, forms=REGULAR_FORMS)
    random.Random(seed).shuffle(poems)
    prompts = []
    for p in poems:
        text = write_prompt(p["form"], p["title"])
        if all(c in tokenizer.stoi for c in text):
            ids = tuple(encode_chat(tokenizer, text)[0])
            if len(ids) + room <= block_size:
                prompts.append(Prompt(text, p["form"], ids))
            if len(prompts) == n:
                break
    if not prompts:
        raise UserError(f"the {split} split gives no prompt in the model's vocabulary that "
                        f"leaves {room} tokens for a reply in a context of {block_size}")
    return prompts


@torch.no_grad()
def sample_replies(model: GPT, prompts: list[tuple[int, ...]], n: int, end_id: int,
                   max_new_tokens: int, temperature: float, top_k: int | None,
                   generator: torch.Generator) -> list[list[list[int]]]:
    """`n` sampled replies to each prompt, as ids up to and including <|end|> (if written), in one
    left-padded batch; replies[i][j] is prompt i's j-th."""
    if n < 1:
        raise UserError(f"need at least one sample per prompt, got {n}")
    rows = [list(p) for p in prompts for _ in range(n)]
    room = model.config.block_size - max(len(r) for r in rows)
    if room < 1:
        raise UserError("a prompt fills the model's context: no room for a reply")
    device = next(model.parameters()).device
    idx, mask = left_pad(rows, end_id)
    out = generate(model, idx.to(device), min(max_new_tokens, room), temperature=temperature,
                   top_k=top_k, stop_token=end_id, generator=generator,
                   attention_mask=mask.to(device))[:, idx.size(1):].tolist()
    replies = [r[:r.index(end_id) + 1] if end_id in r else r for r in out]
    return [replies[i * n:(i + 1) * n] for i in range(len(prompts))]


def reply_text(tokenizer: CharTokenizer, ids: list[int]) -> str:
    """A reply's text, without its <|end|>."""
    end = tokenizer.stoi[END]
    return tokenizer.decode(ids[:ids.index(end)] if end in ids else ids)


def reward_of(reply: str, form: str, weights: dict[str, float]) -> float:
    """The weighted reward of a "write" reply: the poem is the reply under a header line."""
    return total_reward(f"{form}\n{reply}", form, weights)


def reply_figures(model: GPT, tokenizer: CharTokenizer, prompts: list[Prompt], seed: int = 0,
                  temperature: float = 0.8, top_k: int | None = 50, max_new_tokens: int = 80,
                  batch_size: int = 64) -> tuple[dict, list[str]]:
    """One sampled reply per prompt (a fixed seed), measured as `llmbook evaluate` measures poems
    (`eval.poem_rates`): (the rates, the poems as "<form>\n<reply>")."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    end, poems = tokenizer.stoi[END], []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b:b + batch_size]
        groups = sample_replies(model, [p.ids for p in chunk], 1, end, max_new_tokens,
                                temperature, top_k, g)
        poems += [f"{p.form}\n{reply_text(tokenizer, grp[0])}"
                  for p, grp in zip(chunk, groups, strict=True)]
    return poem_rates([(t, p.form) for t, p in zip(poems, prompts, strict=True)]), poems


def make_pairs(model: GPT, tokenizer: CharTokenizer, prompts: list[Prompt], n_samples: int,
               weights: dict[str, float], generator: torch.Generator, temperature: float = 1.0,
               top_k: int | None = None, max_new_tokens: int = 80) -> list[Pair]:
    """Preference pairs without labels: `n_samples` replies per prompt, scored by the rewards; the
    best is chosen and the worst rejected. Prompts whose best and worst tie are dropped."""
    pairs = []
    end = tokenizer.stoi[END]
    for b in range(0, len(prompts), 16):
        chunk = prompts[b:b + 16]
        groups = sample_replies(model, [p.ids for p in chunk], n_samples, end, max_new_tokens,
                                temperature, top_k, generator)
        for p, group in zip(chunk, groups, strict=True):
            texts = [reply_text(tokenizer, r) for r in group]
            scores = [reward_of(t, p.form, weights) for t in texts]
            best, worst = max(range(len(texts)), key=scores.__getitem__), min(
                range(len(texts)), key=scores.__getitem__)
            if scores[best] > scores[worst] and texts[best] != texts[worst]:
                pairs.append(Pair(p.text, p.form, texts[best], texts[worst],
                                  scores[best] - scores[worst]))
    return pairs


# ----------------------------------------------------------------------------- GRPO

def group_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO's advantages (Shao et al., 2024): each reward minus its group's mean, over the group's
    standard deviation; rewards (prompts, group) -> the same shape. A group of equal rewards
    gets 0 everywhere: it says nothing about which reply is better."""
    if rewards.dim() != 2 or rewards.size(1) < 2:
        raise UserError(f"rewards must be (prompts, group) with a group of at least 2, got "
                        f"{tuple(rewards.shape)}")
    centred = rewards - rewards.mean(1, keepdim=True)
    return centred / (rewards.std(1, keepdim=True) + eps)


def kl_estimate(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL(π || π_ref) estimate on tokens sampled from π: exp(r) - r - 1, r = log π_ref -
    log π (Schulman's k3; ≥ 0, and 0 exactly where the two agree)."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor,
              mask: Tensor, clip_eps: float = 0.2, kl_beta: float = 0.04) -> Tensor:
    """GRPO: PPO's clipped objective with group-relative advantages (B,) and no value network, a
    KL penalty to the reference, on the response tokens of `mask` (B, T) only; each reply's
    tokens are averaged, then the replies. Log-probabilities are per token, (B, T)."""
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    per_token = -(surrogate - kl_beta * kl_estimate(logp, ref_logp))
    mask = mask.to(per_token.dtype)
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


# ----------------------------------------------------------------------------- the objectives

class _Reference:
    """The frozen reference: a separate model, or the policy with its LoRA adapters off."""

    def __init__(self, policy: GPT, separate: GPT | None):
        self.policy, self.separate = policy, separate

    def __call__(self) -> AbstractContextManager[nn.Module]:
        if self.separate is not None:
            return nullcontext(self.separate)
        return adapters_disabled(self.policy)


class DPOObjective(nn.Module):
    """policy + (chosen, rejected) batches and their reference log-probs -> (None, DPO loss)."""

    def __init__(self, policy: GPT, beta: float):
        super().__init__()
        self.policy, self.beta = policy, beta

    def forward(self, xc: Tensor, yc: Tensor, xr: Tensor, yr: Tensor, ref_c: Tensor,
                ref_r: Tensor) -> tuple[None, Tensor]:
        return None, dpo_loss(sequence_logprobs(self.policy, xc, yc),
                              sequence_logprobs(self.policy, xr, yr), ref_c, ref_r, self.beta)


class GRPOObjective(nn.Module):
    """policy + a batch of sampled replies, their advantages and reference log-probs -> (None,
    GRPO loss). One update per batch of samples, so the old policy is the current one."""

    def __init__(self, policy: GPT, clip_eps: float, kl_beta: float):
        super().__init__()
        self.policy, self.clip_eps, self.kl_beta = policy, clip_eps, kl_beta

    def forward(self, x: Tensor, y: Tensor, advantages: Tensor,
                ref_logp: Tensor) -> tuple[None, Tensor]:
        logp = token_logprobs(self.policy, x, y)
        return None, grpo_loss(logp, logp.detach(), ref_logp, advantages, y != -100,
                               self.clip_eps, self.kl_beta)


# ----------------------------------------------------------------------------- runs

def _encode_pairs(pairs: list[Pair], tokenizer: CharTokenizer,
                  block_size: int) -> list[tuple[tuple, tuple]]:
    """Each pair as (chosen ids, prompt length), (rejected ids, prompt length); pairs too long
    for the context are left out."""
    rows = []
    for p in pairs:
        c, r = encode_chat(tokenizer, p.prompt, p.chosen), encode_chat(tokenizer, p.prompt,
                                                                       p.rejected)
        if max(len(c[0]), len(r[0])) <= block_size + 1:
            rows.append((c, r))
    return rows


@torch.no_grad()
def _with_reference(rows: list, reference: nn.Module, pad: int, block: int) -> list[tuple]:
    """DPO rows with the reference's log-probs of both replies, computed once."""
    out = []
    for b in range(0, len(rows), 32):
        chunk = rows[b:b + 32]
        xc, yc = sft_batch([c for c, _ in chunk], pad, block)
        xr, yr = sft_batch([r for _, r in chunk], pad, block)
        device = next(reference.parameters()).device
        ref_c = sequence_logprobs(reference, xc.to(device), yc.to(device)).cpu()
        ref_r = sequence_logprobs(reference, xr.to(device), yr.to(device)).cpu()
        out += [(c, r, float(a), float(b_)) for (c, r), a, b_ in zip(chunk, ref_c, ref_r,
                                                                     strict=True)]
    return out


def _dpo_batch(rows: list[tuple], pad: int, block: int) -> tuple[Tensor, ...]:
    xc, yc = sft_batch([r[0] for r in rows], pad, block)
    xr, yr = sft_batch([r[1] for r in rows], pad, block)
    return xc, yc, xr, yr, torch.tensor([r[2] for r in rows]), torch.tensor([r[3] for r in rows])


def _load_base(cfg: AlignConfig, state: dict | None, source: str):
    if state is not None and "align" not in state.get("config", {}):
        raise UserError(f"{source} is not a checkpoint of llmbook align (it has no [align] "
                        "config); resume from the ckpt.pt of an align run")
    base, tokenizer, _ = load_any(cfg.base.model)
    if END not in tokenizer.stoi:
        raise UserError(f"[base] model {cfg.base.model!r} has no chat template tokens: align an "
                        "instruction-tuned model (llmbook finetune with [task] kind = 'instruct', "
                        "or 'poetry-small-sft')")
    digest = tensors_digest(base.state_dict())
    if state is not None and state.get("base_sha256") != digest:
        raise UserError(f"{source} was aligned from another base model than "
                        f"{cfg.base.model!r} (its weights differ): resume with the [base] model "
                        "the run started from")
    reference = None
    if cfg.align.reference is not None:
        reference, ref_tok, _ = load_any(cfg.align.reference)
        if reference.config != base.config or ref_tok.itos != tokenizer.itos:
            raise ConfigError(f"[align] reference {cfg.align.reference!r} has another shape or "
                              f"vocabulary than the base model ({reference.config} against "
                              f"{base.config}); the reference must be a model like the policy")
        reference.requires_grad_(False)
    return base, tokenizer, reference, digest


def alignment_task(cfg: AlignConfig, state: dict | None = None, source: str = "") -> Task:
    """The policy (the base model, with LoRA if asked), its reference, and batches of pairs (DPO)
    or of freshly sampled groups (GRPO), for `llmbook.train.fit`."""
    a, t = cfg.align, cfg.train
    policy, tokenizer, separate, digest = _load_base(cfg, state, source)
    generator = seed_everything(t.seed)  # seeds LoRA's A; it draws prompts and samples
    top_k = a.top_k or None
    end, pad, block = tokenizer.stoi[END], tokenizer.unk_id, policy.config.block_size
    train_prompts = write_prompts(tokenizer, "train", a.prompts, t.seed, a.max_new_tokens, block)
    val_prompts = write_prompts(tokenizer, "val", a.val_prompts, t.seed, a.max_new_tokens, block)
    # without LoRA or a given reference, the reference is a frozen copy of the starting policy
    if separate is None and cfg.method.kind != "lora":
        separate = copy.deepcopy(policy).requires_grad_(False)
    if cfg.method.kind == "lora":
        m = cfg.method
        apply_lora(policy, m.rank, m.alpha, m.dropout, m.targets)
    reference = _Reference(policy, separate)
    saved = {"config": cfg.to_dict(), "base_sha256": digest}
    recent: list[float] = []  # GRPO: the mean reward of each step's samples since the last eval

    def sample_generator() -> torch.Generator:  # a device generator, seeded from the batches'
        device = next(policy.parameters()).device
        seed = int(torch.randint(2**62, (1,), generator=generator))
        return torch.Generator(device=device).manual_seed(seed)

    if a.method == "dpo":
        if state is not None:
            pairs = [Pair(**p) for p in state["pairs"]]
        elif a.pairs_file is not None:
            pairs = read_pairs(a.pairs_file)
        else:
            pairs = make_pairs(policy, tokenizer, train_prompts, a.samples_per_prompt, a.rewards,
                               sample_generator(), a.temperature, top_k, a.max_new_tokens)
        check_pairs(pairs)
        saved["pairs"] = [asdict(p) for p in pairs]
        with reference() as ref:
            rows = _with_reference(_encode_pairs(pairs, tokenizer, block), ref, pad, block)
        n_val = max(1, len(rows) // 20)
        val_rows, train_rows = rows[:n_val], rows[n_val:]
        if len(train_rows) < t.batch_size:
            raise UserError(f"only {len(train_rows)} training pairs for batch_size = "
                            f"{t.batch_size}: raise [align] prompts or samples_per_prompt")
        objective: nn.Module = DPOObjective(policy, a.beta)
        val_bs = t.batch_size * world_size()  # the global batch, as in pretraining
        val_batches = [_dpo_batch(val_rows[i:i + val_bs], pad, block)
                       for i in range(0, len(val_rows), val_bs)][:t.eval_batches]

        def draw(batch_size: int, g: torch.Generator) -> tuple[Tensor, ...]:
            picks = torch.randint(len(train_rows), (batch_size,), generator=g).tolist()
            return _dpo_batch([train_rows[i] for i in picks], pad, block)
    else:
        objective = GRPOObjective(policy, a.clip_eps, a.kl_beta)
        val_batches = []

        def draw(batch_size: int, g: torch.Generator) -> tuple[Tensor, ...]:
            picks = torch.randint(len(train_prompts), (batch_size,), generator=g).tolist()
            chosen = [train_prompts[i] for i in picks]
            groups = sample_replies(policy, [p.ids for p in chosen], a.group_size, end,
                                    a.max_new_tokens, a.temperature, top_k, sample_generator())
            rewards = torch.tensor([[reward_of(reply_text(tokenizer, r), p.form, a.rewards)
                                     for r in grp] for p, grp in zip(chosen, groups, strict=True)])
            recent.append(float(rewards.mean()))
            rows = [(list(p.ids) + r, len(p.ids)) for p, grp in zip(chosen, groups, strict=True)
                    for r in grp]
            x, y = sft_batch(rows, pad, block)
            device = next(policy.parameters()).device
            with torch.no_grad(), reference() as ref:
                was_training = ref.training
                ref_logp = token_logprobs(ref.eval(), x.to(device), y.to(device)).cpu()
                ref.train(was_training)
            return x, y, group_advantages(rewards).flatten(), ref_logp

    @torch.no_grad()
    def validate(model: nn.Module, device: torch.device) -> dict[str, float]:
        """Rewards of one sampled reply per val prompt (the same seed every time), and the
        policy's per-token KL to the reference on them."""
        g = torch.Generator(device=device).manual_seed(t.seed + 1)
        replies = [grp[0] for grp in sample_replies(policy, [p.ids for p in val_prompts], 1, end,
                                                    a.max_new_tokens, a.temperature, top_k, g)]
        poems = [(f"{p.form}\n{reply_text(tokenizer, r)}", p.form)
                 for p, r in zip(val_prompts, replies, strict=True)]
        out = {name: sum(total_reward(text, form, {name: 1.0}) for text, form in poems)
               / len(poems) for name in a.rewards}
        out["reward"] = sum(total_reward(t, f, a.rewards) for t, f in poems) / len(poems)
        rates = poem_rates(poems)  # diversity and copying: what a reward can cost
        out |= {k: rates[k] for k in ("repeated", "copied", "distinct_endings")}
        x, y = sft_batch([(list(p.ids) + r, len(p.ids)) for p, r in zip(val_prompts, replies,
                                                                         strict=True)], pad, block)
        x, y = x.to(device), y.to(device)
        was_training = policy.training
        policy.eval()
        logp = token_logprobs(policy, x, y)
        with reference() as ref:
            ref_logp = token_logprobs(ref.eval(), x, y)
        policy.train(was_training)
        mask = y != -100
        out["kl"] = float((kl_estimate(logp, ref_logp) * mask).sum() / mask.sum())
        if recent:
            out["train_reward"] = sum(recent) / len(recent)
            recent.clear()
        # DPO: its loss on held-out pairs; GRPO: the reward, negated (lower is better)
        out["val_loss"] = (mean_loss(model, val_batches, device) if val_batches
                           else -out["reward"])
        return out

    if separate is not None:
        objective.reference = separate  # a submodule: moved to the device, saved, resumed
    return Task(objective, tokenizer, draw, val_batches, generator, saved, validate)


def align(cfg: AlignConfig, out_dir: str | Path, resume: str | Path | None = None,
          progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Align (or resume) as `cfg` says on `llmbook.train.fit`, then write the policy as
    model.safetensors (LoRA merged; `load_any` and `llmbook generate --checkpoint` read it) and
    align.json: the last validation's rewards and KL, and the trainable parameters."""
    state = load_checkpoint(resume) if resume is not None else None
    task = alignment_task(cfg, state, str(resume))
    result = fit(task, cfg.train, out_dir, resume, state, progress, overwrite)
    policy = result.model.policy
    trainable, total = count_parameters(policy)
    report = {"method": cfg.align.method, "step": result.step, "val_loss": result.val_loss,
              "trainable_parameters": trainable, "parameters": total,
              "pairs": len(task.saved.get("pairs", []))}
    (result.out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    policy = merge_and_unload(copy.deepcopy(policy).cpu())
    save_pretrained(policy, result.out_dir / "model.safetensors", tokenizer=task.tokenizer,
                    metadata={"llmbook_align_config": json.dumps(cfg.to_dict(),
                                                                 ensure_ascii=False)})
    result.model = policy
    return result
