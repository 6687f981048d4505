"""`disagg role WORKER ROLE`: ask a live worker to drain and go on as another role (prefill,
decode or both) on the weights it holds; what an autoscaler does on a fixed core budget, by
hand."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

import nats.errors

from disagg.shared.config import add_flags, from_args, group, option
from disagg.shared.log import configure_logging
from disagg.shared.protocol.codec import ErrorReply
from disagg.shared.protocol.subjects import Subjects
from disagg.shared.protocol.types import Role
from disagg.shared.service import NatsConfig, ask_role, connect_nats


@dataclass(frozen=True)
class RoleConfig:
    nats: NatsConfig = group(NatsConfig)
    namespace: str = option("disagg", help="subject prefix of the deployment")
    timeout_s: float = option(10.0, help="bound on connecting and on the worker's answer")
    drain_s: float | None = option(
        None, help="bound on its drain; then its requests move on (default: its own bound)"
    )


def add_role_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("worker_id", help="the worker's id (its heartbeats, /metrics labels)")
    p.add_argument("role", choices=[str(r) for r in Role])
    add_flags(p, RoleConfig)


def run_role(args: argparse.Namespace) -> int:
    cfg = from_args(RoleConfig, args)
    configure_logging("error")  # the answer is the output, not NATS's connection events
    subjects = Subjects(cfg.namespace)

    async def ask():
        async with asyncio.timeout(cfg.timeout_s):
            nc = await connect_nats(cfg.nats, "disagg-role")
        try:
            return await ask_role(nc, subjects, args.worker_id, args.role,
                                  drain_s=cfg.drain_s, timeout=cfg.timeout_s)  # fmt: skip
        finally:
            await nc.close()

    try:
        reply = asyncio.run(ask())
    except nats.errors.NoRespondersError:
        print(f"disagg role: no worker {args.worker_id!r} listens on {cfg.nats.display}")
        return 1
    except (TimeoutError, nats.errors.TimeoutError):
        print(f"disagg role: no answer within {cfg.timeout_s:g} s")
        return 1
    if isinstance(reply, ErrorReply):
        print(f"disagg role: {args.worker_id}: {reply.error.message}")
        return 1
    state = "switching to" if reply.switching else "already"
    print(f"{reply.worker_id}: {state} {reply.role}")
    return 0
