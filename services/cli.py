"""The `disagg` command: one subcommand per service plus local tools (tiny-model, generate)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from disagg.shared.model.args import CheckpointError

Command = Callable[[argparse.Namespace], int]


def _add_tiny_model(sub: argparse._SubParsersAction) -> None:
    from disagg.services import local

    p = sub.add_parser("tiny-model", help="write a small random checkpoint in Hugging Face layout")
    local.add_tiny_model_args(p)
    p.set_defaults(run=local.run_tiny_model)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from disagg.services import local

    p = sub.add_parser("generate", help="one-shot local generation through the engine")
    local.add_generate_args(p)
    p.set_defaults(run=local.run_generate)


SUBCOMMANDS = [_add_tiny_model, _add_generate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disagg", description="Prefill/decode disaggregated LLM serving."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointError, ValueError) as err:
        # A bad checkpoint or flag is the user's to fix: one line, no stack trace.
        print(f"disagg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
