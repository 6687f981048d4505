"""The `disagg` command: one subcommand per service, `up`, `bench` and local tools.

Each service's flags come from its config's fields (``disagg.shared.config``); the parser builds
the config and hands it to the service's ``main``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from disagg.shared.config import add_flags, from_args
from disagg.shared.model.args import CheckpointError
from disagg.shared.protocol.types import Role

# command -> (help, "module:Config", module with main(config), fixed config fields)
SERVICES: dict[str, tuple[str, str, str, dict[str, object]]] = {
    "prefill": (
        "prefill worker: runs prompts, ships KV over ZeroMQ",
        "disagg.services.workers.config:WorkerConfig", "disagg.services.workers.main",
        {"role": Role.PREFILL},
    ),
    "decode": (
        "decode worker: receives KV, continuous batching, streams tokens",
        "disagg.services.workers.config:WorkerConfig", "disagg.services.workers.main",
        {"role": Role.DECODE},
    ),
    "worker": (
        "aggregated worker: prefill and decode in one process",
        "disagg.services.workers.config:WorkerConfig", "disagg.services.workers.main",
        {"role": Role.BOTH},
    ),
    "scheduler": (
        "places requests on prefill and decode workers",
        "disagg.services.scheduler.config:SchedulerConfig", "disagg.services.scheduler.service",
        {},
    ),
    "planner": (
        "desired prefill and decode worker counts from measured load and SLOs",
        "disagg.services.planner.config:PlannerConfig", "disagg.services.planner.service", {},
    ),
    "gateway": (
        "OpenAI-compatible HTTP API and NATS JSON API",
        "disagg.services.gateway.config:GatewayConfig", "disagg.services.gateway.service", {},
    ),
    "up": (
        "start nats-server and every service on this machine",
        "disagg.cli.up:UpConfig", "disagg.cli.up", {},
    ),
}  # fmt: skip


def _add_services(sub: argparse._SubParsersAction) -> None:
    """One subcommand per service: flags from its config; the service module loads on run."""
    for name, (text, config_path, main_module, fixed) in SERVICES.items():
        module, _, cls_name = config_path.partition(":")
        config_cls = getattr(importlib.import_module(module), cls_name)

        def run(args: argparse.Namespace, cls=config_cls, target=main_module, fixed=fixed) -> int:
            return importlib.import_module(target).main(from_args(cls, args, **fixed))

        p = sub.add_parser(name, help=text)
        add_flags(p, config_cls)
        p.set_defaults(run=run)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from disagg.benchmarks.harness import cli as bench

    bench.add_parser(sub)


def _add_local(sub: argparse._SubParsersAction) -> None:
    from disagg.cli import local

    p = sub.add_parser("tiny-model", help="write a small random checkpoint in Hugging Face layout")
    local.add_tiny_model_args(p)
    p.set_defaults(run=local.run_tiny_model)
    p = sub.add_parser("generate", help="one-shot local generation through the engine")
    local.add_generate_args(p)
    p.set_defaults(run=local.run_generate)
    from disagg.cli import role

    p = sub.add_parser("role", help="switch a live worker's role (it drains first)")
    role.add_role_args(p)
    p.set_defaults(run=role.run_role)


SUBCOMMANDS = [_add_services, _add_bench, _add_local]


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
