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


def _add_services(sub: argparse._SubParsersAction) -> None:
    from disagg.services import up
    from disagg.services.gateway import service as gateway
    from disagg.services.scheduler import service as scheduler
    from disagg.services.workers import service as workers

    roles = {
        "prefill": "prefill worker: runs prompts, ships KV over ZeroMQ",
        "decode": "decode worker: receives KV, continuous batching, streams tokens",
        "worker": "aggregated worker: prefill and decode in one process",
    }
    for name, text in roles.items():
        p = sub.add_parser(name, help=text)
        workers.add_worker_args(p)
        role = "both" if name == "worker" else name
        p.set_defaults(run=lambda args, role=role: workers.main(args, role))
    p = sub.add_parser("scheduler", help="places requests on prefill and decode workers")
    scheduler.add_scheduler_args(p)
    p.set_defaults(run=scheduler.main)
    p = sub.add_parser("gateway", help="OpenAI-compatible HTTP API and NATS JSON API")
    gateway.add_gateway_args(p)
    p.set_defaults(run=gateway.main)
    p = sub.add_parser("up", help="start nats-server and every service on this machine")
    up.add_up_args(p)
    p.set_defaults(run=up.main)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from disagg.services.bench import cli as bench

    bench.add_parser(sub)


SUBCOMMANDS = [_add_services, _add_bench, _add_tiny_model, _add_generate]


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
