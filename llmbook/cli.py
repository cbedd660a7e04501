"""The `llmbook` command: doctor, book, train, finetune, align, generate, export, evaluate,
serve, exercises and site."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path

from .errors import UserError

EXERCISES_DIR = "build/exercises"  # llmbook.exercises.DEFAULT_OUT, the nbgrader course folder
MAX_NEW_TOKENS = 2000  # --max-new-tokens' cap: a poem is under 100; generation stops at its end


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    from .env import doctor

    checks = doctor(check_compile=not args.no_compile)
    rows = [(c.name, "ok" if c.ok else ("FAIL" if c.fatal else "warn"), c.detail) for c in checks]
    print(_table(rows, ("check", "status", "detail")))
    for c in checks:
        if not c.ok and c.fix:
            print(f"{'error' if c.fatal else 'note'}: {c.name}: {c.fix}")
    failed = [c for c in checks if not c.ok and c.fatal]
    if failed:
        print(
            f"\n{len(failed)} problem(s) to fix before running the course: "
            + "; ".join(f"{c.name} ({c.detail})" for c in failed),
            file=sys.stderr,
        )
        return 1
    print("\nAll set: this machine can run the course.")
    return 0


def cmd_book(args: argparse.Namespace) -> int:
    from .book import run_book
    from .env import CHAPTERS_DIR

    results = run_book(args.chapters, quick=args.quick, out_dir=Path(args.out),
                       source=Path(args.source or CHAPTERS_DIR))
    print()
    print(
        _table(
            [(r.chapter, r.status, f"{r.seconds:.1f}") for r in results],
            ("chapter", "status", "seconds"),
        )
    )
    failed = [r for r in results if r.status != "ok"]
    for r in failed:
        copy = Path(args.out) / f"{r.chapter}.ipynb"
        print(f"llmbook book: {r.chapter} failed: {r.error} (see {copy})", file=sys.stderr)
    return 1 if failed else 0


def cmd_train(args: argparse.Namespace) -> int:
    """`llmbook train`, `finetune` and `align`: one loop, so one way to run, stop and resume."""
    from .train import TrainingDiverged, TrainingInterrupted

    if args.command == "finetune":
        from .config import FinetuneConfig as Config
        from .finetune import REPORT_NAME
        from .finetune import finetune as run
    elif args.command == "align":
        from .align import REPORT_NAME
        from .align import align as run
        from .config import AlignConfig as Config
    else:
        from .config import TrainConfig as Config
        from .train import train as run
    cfg = Config.from_toml(args.config)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    if args.nproc > 1:  # torchrun starts the processes; each runs this command without --nproc
        from .checkpoint import load_checkpoint, prepare_run_folder
        from .distributed import launch

        if args.resume:
            load_checkpoint(args.resume)  # a bad checkpoint or folder: one line, here
        prepare_run_folder(out, args.resume, args.overwrite)  # as each worker will check it
        return launch(args.nproc, [args.command, args.config, "--out", str(out),
                                   *(["--resume", args.resume] if args.resume else []),
                                   *(["--overwrite"] if args.overwrite else [])])
    try:
        result = run(cfg, out, resume=args.resume, overwrite=args.overwrite)
    except TrainingDiverged as exc:
        print(f"llmbook {args.command}: {exc}", file=sys.stderr)
        return 3
    except TrainingInterrupted as exc:
        resume = shlex.join(["llmbook", args.command, args.config, "--out", str(out),
                             "--resume", str(exc.checkpoint)])
        print(f"llmbook {args.command}: {exc}; resume with: {resume}", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun only rank 0 reports
    print(f"done: step {result.step}, val loss {result.val_loss:.4f}; checkpoint "
          f"{result.checkpoint}, metrics and loss.png in {result.out_dir}")
    if args.command in ("finetune", "align"):
        import json

        report = json.loads((result.out_dir / REPORT_NAME).read_text())
        if "val_accuracy" in report:
            print(f"val accuracy {report['val_accuracy']:.1%}")
        print(f"trained {report['trainable_parameters']:,} of {report['parameters']:,} "
              f"parameters; what was learned is in {result.out_dir}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .env import get_device
    from .generate import generate
    from .model import check_context
    from .pretrained import load_any

    model, tokenizer, _ = load_any(args.checkpoint, get_device())
    if not args.prompt:
        raise UserError("the prompt is empty; give the start of a text, e.g. --prompt "
                        "'五言绝句《春晓》'")
    unknown = sorted({c for c in args.prompt if c not in tokenizer.stoi})
    if unknown:
        raise UserError(f"the prompt has characters the model's vocabulary lacks: "
                        f"{' '.join(repr(c) for c in unknown)}; remove or replace them")
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(args.seed)
    if args.chat:  # an instruction-tuned model: the prompt in its template, the reply
        from .finetune import CHAT_TOKENS, answer

        if not set(CHAT_TOKENS) <= set(tokenizer.stoi):
            raise UserError(f"{args.checkpoint} has no chat template: --chat needs a model "
                            "instruction-tuned by `llmbook finetune` ([task] kind = 'instruct')")
        print(answer(model, tokenizer, args.prompt, args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     generator=g))
        return 0
    idx = torch.tensor([tokenizer.encode(args.prompt)], device=device)
    n_prompt = idx.size(1)
    # in chunks, so that a poem's end (a blank line) stops it; chunking draws the same tokens
    block = model.config.block_size  # the model sees at most its context, in one call or many
    check_context(n_prompt, block)
    while idx.size(1) - n_prompt < args.max_new_tokens:
        chunk = min(16, args.max_new_tokens - (idx.size(1) - n_prompt))
        context = idx[:, -block:]
        out = generate(model, context, chunk, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, generator=g)
        idx = torch.cat([idx, out[:, context.size(1):]], dim=1)
        if not args.no_stop and "\n\n" in tokenizer.decode(idx[0, n_prompt:].tolist()):
            break
    text = args.prompt + tokenizer.decode(idx[0, n_prompt:].tolist())
    if not args.no_stop and "\n\n" in text[len(args.prompt):]:  # one poem: up to a blank line
        text = text[:text.index("\n\n", len(args.prompt))]
    print(text.rstrip("\n"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .env import sha256
    from .pretrained import export_checkpoint

    if Path(args.out).suffix != ".safetensors":
        raise UserError(f"{args.out}: a model file's name must end in .safetensors (that is how "
                        "generate and evaluate know how to read it)")
    out = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {out} ({out.stat().st_size:,} bytes, sha256 {sha256(out)})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from .env import get_device
    from .eval import FORM_SHAPES, evaluate_model, format_report
    from .pretrained import load_any

    forms = args.forms or list(FORM_SHAPES)
    unknown = [f for f in forms if f not in FORM_SHAPES]
    if unknown:
        raise UserError(f"--forms {unknown} are not regular forms; choose from "
                        f"{list(FORM_SHAPES)}")
    model, tokenizer, train_config = load_any(args.model, get_device())
    if train_config.get("data", {}).get("text_file"):
        raise UserError("a model trained on a text file has no poetry splits to be evaluated on")
    report = evaluate_model(model, tokenizer, forms, n=args.n, seed=args.seed,
                            temperature=args.temperature, top_k=args.top_k,
                            eval_batches=args.eval_batches)
    print(format_report(report, show=args.show))
    if args.json:
        for figures in report["model"].values():
            figures.pop("samples", None)
        Path(args.json).write_text(json.dumps(report, ensure_ascii=False, indent=1),
                                   encoding="utf-8")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    serve(args.checkpoint, host=args.host, port=args.port)
    return 0


def cmd_exercises(args: argparse.Namespace) -> int:
    from .exercises import GRADES_CSV, grade, release

    out = Path(args.out)
    if args.action == "release":
        for chapter, notebook in release(args.chapters or None, out).items():
            print(f"{chapter}: {notebook}")
        print(f"\nstudent versions in {out / 'release'}; the gradebook is {out / 'gradebook.db'}")
        return 0
    graded = grade(Path(args.submissions), out, jobs=args.jobs, quick=args.quick)
    print(_table([(g.student, g.chapter, f"{g.score:g}", f"{g.max_score:g}") for g in graded],
                 ("student", "chapter", "score", "max")))
    print(f"\ngrades in {out / GRADES_CSV}; the graded notebooks, with their outputs, in "
          f"{out / 'autograded'}")
    return 0


def cmd_site(args: argparse.Namespace) -> int:
    from .site import build_site

    site = build_site(Path(args.out))
    for line in site.warnings:
        print(f"llmbook site: {line}", file=sys.stderr)
    print(f"{len(site.pages)} chapters built into {site.out}; open {site.out / 'index.html'}, or "
          f"serve it: python -m http.server -d {site.out}")
    return 1 if site.warnings else 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmbook", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="check that this machine can run the course")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile check (slow)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("book", help="execute the chapters with papermill into --out")
    p.add_argument("--quick", action="store_true", help="QUICK mode: less data, fewer steps (CI)")
    p.add_argument("--chapters", nargs="+", metavar="NN", help="chapter numbers, e.g. 00 03")
    p.add_argument("--out", default="build", help="folder for the executed notebooks")
    p.add_argument("--source", help=argparse.SUPPRESS)  # another chapters folder (tests)
    p.set_defaults(func=cmd_book)

    for name, what, tables in [
            ("train", "train a GPT from a TOML config (see configs/)", "[model], [data], [train]"),
            ("finetune", "fine-tune a pretrained GPT from a TOML config (see "
             "configs/finetune-*.toml)", "[base], [task], [method], [train]"),
            ("align", "align an instruction-tuned GPT by DPO or GRPO on verse rewards from a "
             "TOML config (see configs/align-*.toml)", "[base], [align], [method], [train]")]:
        p = sub.add_parser(name, help=what)
        p.add_argument("config", help=f"a TOML file with the tables {tables}")
        p.add_argument("--resume", metavar="CHECKPOINT", help="continue from this checkpoint")
        p.add_argument("--overwrite", action="store_true", help="start afresh in --out even if "
                       "it holds a run (its files are replaced)")
        p.add_argument("--out", help="folder for checkpoints, metrics, plots and what was "
                       "learned (default: runs/CONFIG_NAME)")
        p.add_argument("--nproc", type=_int_in(1, None), default=1, metavar="N",
                       help="train data-parallel in N processes on this machine (torchrun; "
                       "[train] parallel picks DDP or FSDP)")
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample text from a trained model")
    p.add_argument("--checkpoint", default="poetry-small", help="a training checkpoint, a "
                   ".safetensors model or a shipped name (default: poetry-small)")
    p.add_argument("--prompt", required=True, help="the start of the text, e.g. 五言绝句《春晓》")
    p.add_argument("--max-new-tokens", type=_int_in(1, MAX_NEW_TOKENS), default=120,
                   help=f"at most this many tokens (1-{MAX_NEW_TOKENS}); a blank line (the end "
                   "of a poem) stops earlier")
    p.add_argument("--temperature", type=_temperature, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=_int_in(1, None), default=None)
    p.add_argument("--top-p", type=_top_p, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stop", action="store_true",
                   help="print everything generated, not just up to the first blank line")
    p.add_argument("--chat", action="store_true", help="an instruction-tuned model (llmbook "
                   "finetune, task instruct): put the prompt in its chat template and print the "
                   "answer")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a training checkpoint's model as .safetensors")
    p.add_argument("checkpoint")
    p.add_argument("out", help="the .safetensors file to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="a poetry model's losses, and the form, rhyme, copying "
                       "and <unk> rates of poems it writes for held-out titles")
    p.add_argument("model", nargs="?", default="poetry-small",
                   help="a pretrained name, a .safetensors file or a training checkpoint")
    p.add_argument("--n", type=_int_in(1, None), default=100, help="poems sampled per form")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=_temperature, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=_int_in(1, None), default=50)
    p.add_argument("--forms", nargs="+", default=None, help="regular forms (default: all four)")
    p.add_argument("--eval-batches", type=_int_in(1, None), default=50)
    p.add_argument("--show", type=_int_in(0, None), default=2, help="sample poems printed per form")
    p.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="serve a model over HTTP: the OpenAI completions API "
                       "(/v1/completions) and a page that writes poems (/)")
    p.add_argument("--checkpoint", default="poetry-small", help="a training checkpoint, a "
                   ".safetensors model or a shipped name (default: poetry-small)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: "
                   "127.0.0.1, this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=_int_in(0, 65535), default=8000,
                   help="the port (default: 8000; 0: a free one)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("exercises", help="release the chapters' exercises and grade the "
                       "submissions, with nbgrader (docs/instructors.md)")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("release", help="write the student versions (no solutions, no hidden "
                           "tests) to OUT/release/CHAPTER/CHAPTER.ipynb")
    q.add_argument("chapters", nargs="*", metavar="CHAPTER",
                   help="chapter numbers or names, e.g. 00 03 (default: every chapter)")
    q.add_argument("--out", default=EXERCISES_DIR, help="the nbgrader course folder (default: "
                   f"{EXERCISES_DIR})")
    q = actions.add_parser("grade", help="autograde the submissions and export the grades to "
                           "OUT/grades.csv")
    q.add_argument("submissions", metavar="SUBMISSIONS_DIR", help="one folder per student, one "
                   "per chapter in it, holding the chapter's notebook: "
                   "STUDENT/CHAPTER/CHAPTER.ipynb, e.g. alice/00_setup/00_setup.ipynb")
    q.add_argument("--out", default=EXERCISES_DIR, help="the nbgrader course folder (default: "
                   f"{EXERCISES_DIR})")
    q.add_argument("--jobs", type=_int_in(1, None), default=1,
                   help="notebooks graded at once (default: 1)")
    q.add_argument("--quick", action="store_true", help="run the notebooks in QUICK mode")
    p.set_defaults(func=cmd_exercises)

    p = sub.add_parser("site", help="build the book as a static website (every chapter with its "
                       "committed outputs; works offline)")
    p.add_argument("--out", default="build/site", help="the site's folder (default: build/site)")
    p.set_defaults(func=cmd_site)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (`llmbook CMD: ...`, exit 2), not usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _int_in(low: int, high: int | None):
    """An argparse type: an integer in [low, high] (no upper bound if high is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _temperature(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 means greedy), got {text}")
    return value


def _top_p(text: str) -> float:
    value = _finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run one command. A `UserError` is one line on stderr and exit status 2 (with
    LLMBOOK_DEBUG=1, its traceback too); anything else is a bug and shows its traceback."""
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show Chinese gets escapes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except UserError as exc:
        if os.environ.get("LLMBOOK_DEBUG", "") not in ("", "0"):
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike
            print(f"llmbook {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmbook {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
