"""What every service shell shares: flags with DISAGG_* environment defaults, the NATS
connection, signal handling and error replies."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from disagg.shared.log import configure_logging, get_logger
from disagg.shared.messages import ErrorBody, ErrorReply, MessageError, Subjects, encode

log = get_logger("disagg.service")


def env_name(flag: str) -> str:
    """`--kv-memory-gb` -> `DISAGG_KV_MEMORY_GB`."""
    return "DISAGG_" + flag.lstrip("-").replace("-", "_").upper()


def flag(parser: argparse.ArgumentParser, name: str, *, type: Callable = str, **kw: Any) -> None:
    """An option whose default comes from DISAGG_<NAME> when that is set."""
    env = os.environ.get(env_name(name))
    if env is not None:
        if kw.get("action") == "store_true":
            kw["default"] = env.lower() in ("1", "true", "yes", "on")
        else:
            kw["default"] = type(env)
        kw.pop("required", None)
    if kw.get("action") != "store_true":
        kw["type"] = type
    parser.add_argument(name, **kw)


def add_nats_flags(p: argparse.ArgumentParser) -> None:
    flag(p, "--nats", default="nats://127.0.0.1:4222", help="NATS server URL(s), comma separated")
    flag(p, "--nats-user", default=None, help="NATS user (password in DISAGG_NATS_PASSWORD)")
    flag(p, "--nats-password", default=None, help=argparse.SUPPRESS)
    flag(p, "--nats-token", default=None, help="NATS token (better: DISAGG_NATS_TOKEN)")
    flag(p, "--nats-creds", default=None, help="NATS credentials file (nkey/JWT)")
    flag(p, "--namespace", default="disagg", help="subject prefix, to share one NATS cluster")
    flag(p, "--log-level", default="info")


@dataclass(frozen=True)
class NatsConfig:
    servers: list[str]
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None

    def __repr__(self) -> str:  # never print secrets
        return f"NatsConfig(servers={self.servers!r}, auth={'yes' if self.has_auth else 'no'})"

    @property
    def has_auth(self) -> bool:
        return bool(self.user or self.token or self.creds)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NatsConfig:
        servers = [s.strip() for s in args.nats.split(",") if s.strip()]
        if not servers:
            raise ValueError("--nats needs at least one server URL")
        return cls(servers, args.nats_user, args.nats_password, args.nats_token, args.nats_creds)


async def connect_nats(cfg: NatsConfig, name: str) -> NATS:
    """Connect with endless reconnects: a restarted nats-server is picked up by itself."""

    async def on_error(err: Exception) -> None:
        log.warning("nats_error", error=str(err))

    async def on_disconnect() -> None:
        log.warning("nats_disconnected")

    async def on_reconnect() -> None:
        log.info("nats_reconnected")

    options: dict[str, Any] = dict(
        servers=cfg.servers,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    if cfg.user:
        options |= dict(user=cfg.user, password=cfg.password or "")
    if cfg.token:
        options["token"] = cfg.token
    if cfg.creds:
        options["user_credentials"] = cfg.creds
    return await nats.connect(**options)


def subjects_for(args: argparse.Namespace) -> Subjects:
    return Subjects(args.namespace)


def error_reply(message: str, status: int, *, kind: str | None = None, param=None) -> bytes:
    kind = kind or ("invalid_request_error" if status < 500 else "service_unavailable")
    return encode(ErrorReply(error=ErrorBody(message=message, type=kind, code=status, param=param)))


Handler = Callable[[Msg], Awaitable[bytes]]


def guarded(handler: Handler, what: str) -> Callable[[Msg], Awaitable[None]]:
    """Wrap a request handler: any failure becomes a coded error reply, never a dead service."""

    async def run(msg: Msg) -> None:
        try:
            reply = await handler(msg)
        except MessageError as err:
            reply = error_reply(f"malformed {what}: {err}", 400)
        except Exception as err:  # a bug in one request must not take the service down
            log.exception("handler_failed", handler=what)
            reply = error_reply(f"{what} failed: {err}", 500, kind="server_error")
        if msg.reply:
            await msg.respond(reply)

    return run


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def run_service(args: argparse.Namespace, main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Configure logs, run `main(stop)` until SIGINT/SIGTERM sets `stop`; exit code 0."""
    configure_logging(args.log_level)

    async def entry() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await main(stop)

    asyncio.run(entry())
    return 0
