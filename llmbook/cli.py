"""The `llmbook` command: doctor, book (and, from chapter 07 on, train and generate)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    from .book import BookError, run_book
    from .env import CHAPTERS_DIR

    try:
        results = run_book(
            args.chapters,
            quick=args.quick,
            out_dir=Path(args.out),
            source=Path(args.source or CHAPTERS_DIR),
        )
    except BookError as exc:
        print(f"llmbook book: {exc}", file=sys.stderr)
        return 2
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmbook", description=__doc__)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
