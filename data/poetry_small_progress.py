"""What poetry-small knew when: form, rhyme and copying rates of the snapshots its run kept.

    python data/poetry_small_progress.py runs/poetry-small [--n 60] [--out FILE.json]

`llmbook train configs/poetry-small.toml` keeps the weights every `keep_every` steps in
RUN/snapshots/. Each snapshot (and the final model, RUN/ckpt.pt) writes `--n` poems per regular
form for held-out titles with `llmbook.eval.poem_figures` (seed 0, temperature 0.8, top-k 50);
the test split's own poems and their shuffled rhyme endings (`corpus_figures`) give the ceiling
and chance. The JSON is what chapter 07 plots.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from llmbook.checkpoint import load_checkpoint
from llmbook.data import load_poems
from llmbook.eval import corpus_figures, poem_figures
from llmbook.pretrained import load_any
from llmbook.verse import FORM_SHAPES


def measure(model, tokenizer, n: int) -> dict:
    titles = [p["title"] for p in load_poems("test", forms=list(FORM_SHAPES))]
    figures = poem_figures(model, tokenizer, list(FORM_SHAPES), titles, n=n, seed=0)
    return {form: {k: v for k, v in f.items() if k != "samples"} for form, f in figures.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run folder of `llmbook train`")
    parser.add_argument("--n", type=int, default=60, help="poems per form and snapshot")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent /
                        "poetry-small-progress.json")
    args = parser.parse_args()
    snapshots = sorted((args.run / "snapshots").glob("step-*.safetensors"))
    if not snapshots:
        print(f"{args.run / 'snapshots'} holds no snapshots; train with [train] keep_every > 0",
              file=sys.stderr)
        return 2
    final = load_checkpoint(args.run / "ckpt.pt")
    config = final["config"]
    tokens_per_step = (config["train"]["batch_size"] * config["train"]["grad_accum"]
                       * config["model"]["block_size"])
    done = {}  # rows measured by an earlier call with the same --n (snapshots never change)
    old = json.loads(args.out.read_text("utf-8")) if args.out.exists() else {}
    if old.get("n_per_form") == args.n:
        done = {row["step"]: row for row in old["snapshots"]}
    rows = []
    for path in [*snapshots, args.run / "ckpt.pt"]:
        step = (final["step"] if path.suffix == ".pt"
                else int(re.search(r"step-(\d+)", path.name).group(1)))
        if rows and rows[-1]["step"] == step:
            continue  # the last snapshot is the final model
        if step in done:
            rows.append(done[step])
            continue
        model, tokenizer, _ = load_any(path)
        rows.append({"step": step, "tokens": step * tokens_per_step,
                     "figures": measure(model, tokenizer, args.n)})
        a = rows[-1]["figures"]["all"]
        print(f"step {step:>6}: well-formed {a['well_formed']:.1%}, rhyme (no 重韵) "
              f"{a['rhyme_no_repeat']:.1%}, 重韵 {a['repeated']:.1%}, copied {a['copied']:.1%}")
    corpus = corpus_figures(list(FORM_SHAPES))
    result = {"made_by": "python data/poetry_small_progress.py " + " ".join(sys.argv[1:]),
              "n_per_form": args.n, "seed": 0, "temperature": 0.8, "top_k": 50,
              "snapshots": rows, "corpus": corpus}
    args.out.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
