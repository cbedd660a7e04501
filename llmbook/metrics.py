"""A training run's log, metrics.jsonl: one JSON object per logged step, and its loss plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import UserError

METRICS_NAME = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics log (step, lr, train_loss, val_loss, tokens, elapsed). A torn last
    line (a run killed while writing it) is dropped with a one-line warning on stderr."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path} line {i + 1} is not JSON: the log is damaged; delete "
                                "it, or train into a new folder") from None
            print(f"llmbook: dropped the torn last line of {path} (a run killed while writing "
                  "it)", file=sys.stderr)
    return rows


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the rows past `step` (written by a run killed after its last checkpoint)."""
    if path.exists():
        kept = [r for r in read_metrics(path) if r["step"] <= step]
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept),
                        encoding="utf-8")


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Train and val loss against step, from the metrics log."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    rows = read_metrics(metrics_path)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], label="train", lw=1)
    val = [r for r in rows if r.get("val_loss") is not None]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val", ms=3)
    ax.set(xlabel="step", ylabel="cross-entropy loss (nats)", title="training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
