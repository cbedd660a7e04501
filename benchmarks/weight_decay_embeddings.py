"""Weight decay on the (tied) embedding matrix or not: the evidence behind `train.param_groups`.

    python benchmarks/weight_decay_embeddings.py [--steps 800]

Trains the shipped recipe (configs/poetry-small.toml, shortened to --steps with its schedule
squeezed to fit) twice from the same seed, once decaying every matrix (nanoGPT, and llmbook) and
once sparing the embeddings (as GPT-2's code does), side by side in two processes of one thread
each, and prints both validation losses on 40 fixed batches. About 20 minutes on two idle cores
(an estimate from the 800-step runs this choice was made with, which ran beside other work).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "poetry-small.toml"


def run(variant: str, steps: int, out: str) -> float:
    """One shortened run of the shipped recipe; `variant` is 'decay_all' or 'spare_embeddings'."""
    from torch import nn

    from llmbook import train as train_module
    from llmbook.config import TrainConfig

    torch.set_num_threads(1)
    if variant == "spare_embeddings":
        def groups(model: nn.Module, weight_decay: float) -> list[dict]:
            embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
            decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]
            rest = [p for p in model.parameters() if p.dim() < 2 or id(p) in embeddings]
            return [{"params": decay, "weight_decay": weight_decay},
                    {"params": rest, "weight_decay": 0.0}]
        train_module.param_groups = groups
    cfg = TrainConfig.from_toml(CONFIG)
    t = cfg.train
    t.max_steps, t.warmup_steps, t.eval_every, t.eval_batches = steps, steps // 13, steps // 4, 40
    t.sample_every, t.checkpoint_every, t.keep_every = 0, steps, 0
    return train_module.train(cfg, out, progress=False).val_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # a child process: one run
    parser.add_argument("--out", default="runs/weight-decay", help="folder for the two runs")
    args = parser.parse_args()
    if args.variant:
        print(run(args.variant, args.steps, f"{args.out}/{args.variant}"))
        return
    variants = ("decay_all", "spare_embeddings")
    procs = {v: subprocess.Popen([sys.executable, __file__, "--variant", v, "--steps",
                                  str(args.steps), "--out", args.out],
                                 stdout=subprocess.PIPE, text=True) for v in variants}
    losses = {v: float(p.communicate()[0].split()[-1]) for v, p in procs.items()}
    for v in variants:
        print(f"{v:<17} val loss after {args.steps} steps: {losses[v]:.4f}")


if __name__ == "__main__":
    main()
