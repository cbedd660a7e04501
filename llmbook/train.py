"""Pretraining a GPT on a token stream: the schedule, the parameter groups, and the loop.

Read it top to bottom: `lr_at` (warm-up, then cosine), `param_groups` (what weight decay
touches), `load_data` and `make_windows` (text to the (x, y) windows of `llmbook.data`), the
`Task` that pretraining hands to `fit`, and `fit`, the loop itself (fine-tuning hands it another
task). What it leans on lives beside it: the config in `llmbook.config`, checkpoints in
`llmbook.checkpoint`, the metrics log in `llmbook.metrics`.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm  # text bars: they read "100%|███| n/n" in a notebook saved to the web too

from . import distributed as dist
from .checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    load_model_state,
    prepare_run_folder,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from .config import ConfigError, TrainConfig, TrainSection
from .data import SlidingWindowDataset, corpus_text, document_starts, fixed_batches
from .env import get_device, seed_everything
from .eval import exp_loss, mean_loss
from .generate import generate
from .metrics import METRICS_NAME, append_metrics, plot_losses, truncate_metrics
from .model import GPT, GPTConfig, save_pretrained
from .tokenizer import CharTokenizer


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite."""


# ----------------------------------------------------------------------------- schedule

def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def schedule(cfg: TrainSection) -> dict:
    """`lr_at`'s keyword arguments from a config: `lr_at(step, **schedule(cfg.train))`."""
    return {"lr": cfg.lr, "min_lr": cfg.min_lr, "warmup_steps": cfg.warmup_steps,
            "max_steps": cfg.max_steps}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on every matrix, embeddings included (as nanoGPT; measured better here than
    sparing them, see chapter 07), none on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights (lm_head = wte) appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- data

def load_data(cfg: TrainConfig, tokenizer: CharTokenizer | None = None):
    """(tokenizer, train ids, val ids); the tokenizer is built from the train split if not given."""
    d = cfg.data
    if d.text_file is not None:
        try:
            text = Path(d.text_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"[data] text_file {d.text_file} is not UTF-8 text (byte "
                              f"{exc.start} cannot be decoded); give a UTF-8 text file") from None
        cut = int(len(text) * (1 - d.val_fraction))
        train_text, val_text = text[:cut], text[cut:]
    else:
        train_text = corpus_text("train", forms=d.forms)
        val_text = corpus_text("val", forms=d.forms)
    own = CharTokenizer.from_text(train_text, min_freq=d.min_freq)
    if tokenizer is not None and tokenizer.itos != own.itos:  # resuming on other data
        changed = len(set(tokenizer.itos) ^ set(own.itos))
        raise ConfigError(f"this data gives another vocabulary than the checkpoint's "
                          f"({own.vocab_size} tokens against {tokenizer.vocab_size}, {changed} "
                          "differ): resume with the config and data the run started with")
    tokenizer = tokenizer or own
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    need = cfg.model.block_size + 1
    for name, ids in (("train", train_ids), ("val", val_ids)):
        if len(ids) < need:
            raise ConfigError(f"the {name} split has {len(ids)} tokens but block_size "
                              f"{cfg.model.block_size} needs at least {need}; use more text or a "
                              "smaller block_size (or a larger val_fraction)")
    return tokenizer, train_ids, val_ids


def make_windows(cfg: TrainConfig, ids: torch.Tensor,
                 tokenizer: CharTokenizer) -> SlidingWindowDataset:
    """The (x, y) windows a run draws from: starting anywhere, or at a poem (`window_start`).
    <unk> targets are ignored, so the model never learns to write <unk>."""
    block = cfg.model.block_size
    if cfg.data.window_start == "random":
        return SlidingWindowDataset(ids, block, stride=1, ignore_id=tokenizer.unk_id)
    starts = document_starts(ids, tokenizer.stoi.get("\n", -1), block)
    if len(starts) == 0:
        raise ConfigError("[data] window_start = 'document' needs texts separated by blank "
                          "lines, and a split has none with a full window left")
    return SlidingWindowDataset(ids, block, starts=starts, ignore_id=tokenizer.unk_id)


# ----------------------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    model: nn.Module
    tokenizer: CharTokenizer
    step: int
    val_loss: float | None
    checkpoint: Path
    out_dir: Path


def amp_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """The autocast dtype for a run (None: plain float32). "auto" is bfloat16 on a CUDA GPU that
    has it, float16 on an older one (its narrow range needs loss scaling), float32 elsewhere."""
    if dtype == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _diverged(step: int, what: str, value: float, checkpoint: Path | None) -> TrainingDiverged:
    kept = (f"the last good checkpoint is {checkpoint}" if checkpoint is not None and
            checkpoint.exists() else "no checkpoint was written yet")
    return TrainingDiverged(
        f"training diverged at step {step}: the {what} is {value}. Likely causes: the learning "
        "rate is too high (lower [train] lr or lengthen warmup_steps) or bad data (check the "
        f"text file). Training stopped without saving; {kept}.")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after a step, and that step's checkpoint was written."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint} written")
        self.step, self.checkpoint = step, checkpoint


@contextmanager
def _sigint_stops():
    """While training, a first Ctrl-C sets the event (the loop saves and stops after its step); a
    second one interrupts at once. Outside the main thread signals cannot be caught: no-op."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class Task:
    """What the loop trains: a model, where its micro-batches come from, and what each checkpoint
    holds beside the weights to rebuild it (pretraining here; fine-tuning in llmbook.finetune)."""
    model: nn.Module  # model(*batch) -> (output, loss)
    tokenizer: CharTokenizer
    draw: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]  # (batch size, generator)
    val_batches: list[tuple[torch.Tensor, ...]]
    generator: torch.Generator  # draws the batches; its state is saved with every checkpoint
    saved: dict  # the config (and anything else) to store in each checkpoint
    # measures other than the val batches' loss, {"val_loss": ..., ...} (e.g. rewards of samples)
    validate: Callable[[nn.Module, torch.device], dict[str, float]] | None = None


def pretraining_task(cfg: TrainConfig, state: dict | None = None, source: str = "") -> Task:
    """The GPT `cfg` describes and its windows of the poetry corpus (or a text file)."""
    t = cfg.train
    tokenizer = (CharTokenizer.from_json(state["tokenizer"], source=source) if state else None)
    tokenizer, train_ids, val_ids = load_data(cfg, tokenizer)
    if t.sample_every:
        missing = sorted({c for c in t.sample_prompt if c not in tokenizer.stoi})
        if missing:
            raise ConfigError(f"[train] sample_prompt has characters the vocabulary lacks: "
                              f"{missing}; change the prompt")
    windows = make_windows(cfg, train_ids, tokenizer)
    val_batches = fixed_batches(make_windows(cfg, val_ids, tokenizer),  # of the global batch
                                t.batch_size * dist.world_size(), t.eval_batches, seed=t.seed + 1)
    generator = seed_everything(t.seed)  # seeds the model's init; the generator draws windows
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **asdict(cfg.model)))
    return Task(model, tokenizer, windows.sample, val_batches, generator,
                {"config": cfg.to_dict()})


def train(cfg: TrainConfig, out_dir: str | Path, resume: str | Path | None = None,
          progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Pretrain (or resume) the model `cfg` describes; checkpoints, metrics and plots go to
    out_dir. See `fit` for what the loop does."""
    state = load_checkpoint(resume) if resume is not None else None
    return fit(pretraining_task(cfg, state, str(resume)), cfg.train, out_dir, resume, state,
               progress, overwrite)


def fit(task: Task, t: TrainSection, out_dir: str | Path, resume: str | Path | None = None,
        state: dict | None = None, progress: bool = True, overwrite: bool = False) -> TrainResult:
    """The loop: AdamW with warm-up and cosine decay, gradient accumulation and clipping, and
    every `eval_every` steps a validation loss; checkpoints, metrics and plots go to out_dir.
    Under torchrun it trains data-parallel (`llmbook.distributed`); rank 0 writes the files.

    A fresh run refuses a folder that holds another run unless `overwrite`. Ctrl-C (SIGINT)
    finishes the current step, writes its checkpoint and raises `TrainingInterrupted`."""
    world, device = dist.setup(t.parallel, get_device(None if t.device == "auto" else t.device))
    try:
        return _fit(task, t, out_dir, resume, state, progress and world.main, overwrite, world,
                    device)
    finally:
        dist.teardown(world)


def _fit(task: Task, t: TrainSection, out_dir: str | Path, resume: str | Path | None,
         state: dict | None, progress: bool, overwrite: bool, world: dist.World,
         device: torch.device) -> TrainResult:
    grad_accum = _grad_accum(t, task, world.size)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.tf32
    model, tokenizer, batches = task.model.to(device), task.tokenizer, task.generator
    for m in model.modules():
        if isinstance(m, GPT):
            m.checkpointing = t.activation_checkpointing
    if state is not None:  # the weights go in before DDP copies them or FSDP shards them
        load_model_state(model, state["model"], str(resume))
    model = dist.wrap(model, world)
    fused = t.fused_adamw == "on" or (t.fused_adamw == "auto" and device.type == "cuda")
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr,
                                  betas=(t.beta1, t.beta2), fused=fused or None)
    amp = amp_dtype(device, t.dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    step, tokens, elapsed = 0, 0, 0.0
    if state is not None:
        dist.load_optimizer_state(model, optimizer, state["optimizer"], world)
        scaler.load_state_dict(state.get("scaler", {}))
        set_rng_states(state["rng"], batches)
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed"]
    # only now, with every input checked, is the run folder created (or an old run cleared);
    # every rank checks it, so that a refusal stops them all
    out_dir = prepare_run_folder(Path(out_dir), resume, overwrite)
    dist.barrier(world)
    ckpt_path, metrics_path = out_dir / CHECKPOINT_NAME, out_dir / METRICS_NAME
    if state is not None and world.main:
        truncate_metrics(metrics_path, step)
    # torch.compile compiles at the first call, where the loop catches a failure (no C compiler,
    # an unsupported op) and goes on eagerly
    forward = torch.compile(model) if t.compile else model
    plain = dist.unwrap(model)  # for evaluation and samples: no gradient synchronisation

    last_ckpt = Path(resume) if state is not None else None
    val_loss = (state or {}).get("val_loss")
    pending: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (loss, grad norm) per step
    bar = tqdm(total=t.max_steps, initial=step, disable=not progress, desc="train",
               mininterval=1.0, dynamic_ncols=True)
    say = bar.write if world.main else (lambda text: None)  # only rank 0 prints
    model.train()
    start = time.perf_counter() - elapsed
    with _sigint_stops() as stop:  # Ctrl-C: finish the step, save, then stop
        while step < t.max_steps:
            lr = lr_at(step, **schedule(t))
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for micro in range(grad_accum):
                # every rank draws the same global batch and keeps its rows
                batch = [b.to(device) for b in dist.shard(
                    task.draw(t.batch_size * world.size, batches), world)]
                with dist.grad_sync(model, world, micro == grad_accum - 1), \
                        torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    try:
                        loss = _backward(forward, batch, scaler, grad_accum)
                    except torch._dynamo.exc.TorchDynamoException as exc:
                        if forward is model:
                            raise
                        say(f"torch.compile failed ({str(exc).splitlines()[0][:120]}); "
                            "training eagerly instead")
                        forward = model
                        loss = _backward(forward, batch, scaler, grad_accum)
                step_loss += loss.detach() / grad_accum  # stays on the device: no sync per step
                tokens += batch[0].numel() * world.size  # input positions (a shape: no sync)
            scaler.unscale_(optimizer)
            norm = (nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip > 0
                    else None)
            scaler.step(optimizer)  # float16: skipped if a gradient overflowed, scale lowered
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if hasattr(norm, "full_tensor"):  # FSDP: the norm is a distributed tensor
                norm = norm.full_tensor()
            pending.append((step_loss, norm))
            bar.update(1)
            stopping = dist.any_rank(stop.is_set(), world, device)  # all ranks stop together

            evaluate = step % t.eval_every == 0 or step == t.max_steps
            save = step % t.checkpoint_every == 0 or step == t.max_steps or stopping
            keep = t.keep_every > 0 and step % t.keep_every == 0
            if not (step % t.log_every == 0 or evaluate or save or keep):
                continue
            # read the losses back once per log line; a NaN is reported at the step it appeared
            losses = dist.mean(torch.stack([loss for loss, _ in pending]), world).tolist()
            norms = (torch.stack([n for _, n in pending]).tolist()
                     if t.grad_clip > 0 and not scaler.is_enabled()  # float16 overflows: skips
                     else [0.0] * len(pending))
            for i, (value, n) in enumerate(zip(losses, norms, strict=True)):
                what, bad = ("loss", value) if not math.isfinite(value) else ("gradient norm", n)
                if not math.isfinite(bad):
                    bar.close()
                    raise _diverged(step - len(pending) + i + 1, what, bad, last_ckpt)
            elapsed = time.perf_counter() - start
            row = {"step": step, "lr": lr, "train_loss": sum(losses) / len(losses),
                   "val_loss": None, "tokens": tokens, "elapsed": round(elapsed, 3)}
            pending = []
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):,.0f}",
                            refresh=False)
            if evaluate:  # every rank evaluates (FSDP needs them all for each forward)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    measured = (task.validate(plain, device) if task.validate else
                                {"val_loss": mean_loss(plain, task.val_batches, device)})
                val_loss = measured["val_loss"]
                if not math.isfinite(val_loss):
                    bar.close()
                    raise _diverged(step, "validation loss", val_loss, last_ckpt)
                row.update(measured)
                shown = (", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in measured.items())
                         if task.validate else f"val loss {val_loss:.4f} (perplexity "
                         f"{exp_loss(val_loss):.2f})")
                say(f"step {step}: train loss {row['train_loss']:.4f}, {shown}")
            if world.main:
                append_metrics(metrics_path, row)
                if evaluate:
                    plot_losses(metrics_path, out_dir / "loss.png")
            if t.sample_every and (step % t.sample_every == 0 or step == t.max_steps):
                idx = torch.tensor([tokenizer.encode(t.sample_prompt)], device=device)
                g = torch.Generator(device=device).manual_seed(t.seed)  # the same draws every time
                out = generate(plain, idx, t.sample_tokens, temperature=0.8, top_k=50, generator=g)
                text = tokenizer.decode(out[0].tolist())
                say(f"--- sample at step {step} ---\n{text}\n---")
                if world.main:
                    with open(out_dir / "samples.txt", "a", encoding="utf-8") as f:
                        f.write(f"--- step {step} ---\n{text}\n")
            if keep:  # a snapshot of the weights, to see what the model knew when
                weights = dist.model_state(model, world)  # FSDP: every rank helps gather them
                if world.main:
                    save_pretrained(plain, out_dir / "snapshots" / f"step-{step:06d}.safetensors",
                                    tokenizer=tokenizer, state_dict=weights, metadata={
                                        "llmbook_step": str(step), "llmbook_train_config":
                                        json.dumps(task.saved["config"], ensure_ascii=False)})
            if save:
                model_state, optimizer_state = dist.full_state(model, optimizer, world)
                if world.main:
                    save_checkpoint(ckpt_path, {
                        "step": step, "tokens": tokens, "elapsed": elapsed, "val_loss": val_loss,
                        "model": model_state, "optimizer": optimizer_state,
                        **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
                        "tokenizer": tokenizer.to_json(), "rng": rng_states(batches),
                        **task.saved})
                dist.barrier(world)  # the checkpoint is whole before any rank goes on
                last_ckpt = ckpt_path
                if stopping:
                    bar.close()
                    raise TrainingInterrupted(step, ckpt_path)
    bar.close()
    return TrainResult(plain.eval(), tokenizer, step, val_loss, ckpt_path, out_dir)


def _backward(forward: Callable, batch: list[torch.Tensor], scaler: torch.amp.GradScaler,
              grad_accum: int) -> torch.Tensor:
    """One micro-batch: forward, then backward of its (scaled) share of the step's mean loss."""
    _, loss = forward(*batch)
    scaler.scale(loss / grad_accum).backward()
    return loss


def _grad_accum(t: TrainSection, task: Task, processes: int) -> int:
    """Micro-steps per optimizer step: `grad_accum`, or what reaches `tokens_per_step`."""
    if not t.tokens_per_step:
        return t.grad_accum
    if not task.val_batches:
        raise ConfigError("[train] tokens_per_step needs batches of fixed length; use grad_accum")
    tokens_per_micro_step = t.batch_size * task.val_batches[0][0].size(1) * processes
    if t.tokens_per_step % tokens_per_micro_step:
        raise ConfigError(f"[train] tokens_per_step {t.tokens_per_step:,} is not a multiple of "
                          f"the {tokens_per_micro_step:,} tokens of one micro-step (batch_size x "
                          "block_size x processes); change one of them")
    return t.tokens_per_step // tokens_per_micro_step

