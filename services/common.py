"""What every service shell shares: flags with DISAGG_* environment defaults, the NATS
connection (credentials, TLS, reconnects), liveness from heartbeats, signal handling and error
replies."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from disagg.services.scheduler.placement import WorkerReport, WorkerTable
from disagg.shared.log import configure_logging, get_logger
from disagg.shared.messages import ErrorBody, ErrorReply, MessageError, Subjects, encode

log = get_logger("disagg.service")
T = TypeVar("T")

# Secrets travel in these variables (or flags); `disagg up` hands them to its children this way.
NATS_SECRET_ENV = ("DISAGG_NATS_PASSWORD", "DISAGG_NATS_TOKEN")


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


def add_nats_auth_flags(p: argparse.ArgumentParser) -> None:
    """Credentials and TLS for NATS; secrets are better given in the environment."""
    flag(p, "--nats-user", default=None, help="NATS user (password in DISAGG_NATS_PASSWORD)")
    flag(p, "--nats-password", default=None, help=argparse.SUPPRESS)
    flag(p, "--nats-token", default=None, help="NATS token (better: DISAGG_NATS_TOKEN)")
    flag(p, "--nats-creds", default=None, help="NATS credentials file (JWT + nkey seed)")
    flag(p, "--nats-nkey", default=None, help="NATS nkey seed file")
    flag(p, "--nats-tls-ca", default=None, help="CA bundle that signed the NATS server cert")
    flag(p, "--nats-tls-cert", default=None, help="client certificate (mutual TLS)")
    flag(p, "--nats-tls-key", default=None, help="client certificate key (mutual TLS)")


def add_nats_flags(p: argparse.ArgumentParser) -> None:
    flag(p, "--nats", default="nats://127.0.0.1:4222", help="NATS server URL(s), comma separated")
    add_nats_auth_flags(p)
    flag(p, "--namespace", default="disagg", help="subject prefix, to share one NATS cluster")
    flag(p, "--missed-heartbeats", type=int, default=3, help="silent beats before a peer is dead")
    flag(p, "--log-level", default="info")


def redact_url(url: str) -> str:
    """`nats://user:secret@host:4222` -> `nats://***@host:4222`, for logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


@dataclass(frozen=True)
class NatsConfig:
    """How to reach NATS. Its repr never shows a secret."""

    servers: list[str]
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    nkey: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("--nats needs at least one server URL")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--nats-tls-cert and --nats-tls-key go together")
        if self.user and self.token:
            raise ValueError("give NATS a user/password or a token, not both")

    def __repr__(self) -> str:  # never print secrets
        servers = [redact_url(s) for s in self.servers]
        tls = "yes" if self.tls_ca or self.tls_cert else "no"
        auth = "yes" if self.has_auth else "no"
        return f"NatsConfig(servers={servers!r}, auth={auth}, tls={tls})"

    __str__ = __repr__

    @property
    def has_auth(self) -> bool:
        return bool(self.user or self.token or self.creds or self.nkey)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NatsConfig:
        servers = [s.strip() for s in args.nats.split(",") if s.strip()]
        names = ("user", "password", "token", "creds", "nkey", "tls_ca", "tls_cert", "tls_key")
        return cls(servers, **{n: getattr(args, "nats_" + n, None) for n in names})

    def tls_context(self) -> ssl.SSLContext | None:
        """A client TLS context when a CA or a client certificate is configured."""
        if not (self.tls_ca or self.tls_cert):
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def auth_options(self) -> dict[str, Any]:
        """The nats.connect keywords for credentials and TLS."""
        options: dict[str, Any] = {}
        if self.user:
            options |= dict(user=self.user, password=self.password or "")
        if self.token:
            options["token"] = self.token
        if self.creds:
            options["user_credentials"] = self.creds
        if self.nkey:
            options["nkeys_seed"] = self.nkey
        if (context := self.tls_context()) is not None:
            options["tls"] = context
        return options


Callback = Callable[[], Awaitable[None]]


class NatsRefused(Exception):
    """The NATS server refused this service (credentials or TLS): retrying cannot help."""


def _is_refusal(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, ssl.SSLError) or "authorization" in text or "authentication" in text


async def connect_nats(cfg: NatsConfig, name: str, *, on_reconnect: Callback | None = None) -> NATS:
    """Connect with endless reconnects: a restarted nats-server is picked up by itself.

    Until the first connection it waits for the server (it may start later), but a refusal
    (bad credentials, TLS) raises NatsRefused at once. Publishes made while disconnected are
    buffered (bounded by nats-py's pending size). `on_reconnect` runs after each reconnection.
    """
    nc = NATS()
    refused = asyncio.Event()

    async def on_error(err: Exception) -> None:
        log.warning("nats_error", error=_describe(err))
        if not nc.is_connected and _is_refusal(err):
            refused.set()

    async def on_disconnect() -> None:
        log.warning("nats_disconnected")

    async def reconnected() -> None:
        log.info("nats_reconnected")
        if on_reconnect is not None:
            await on_reconnect()

    options = dict(
        servers=cfg.servers,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=reconnected,
    )
    await _connect_unless_refused(nc, options | cfg.auth_options(), refused)
    return nc


async def _connect_unless_refused(nc: NATS, options: dict, refused: asyncio.Event) -> None:
    try:
        await unless(refused.wait, nc.connect(**options))
    except Interrupted:
        raise NatsRefused("the NATS server refused this client (credentials or TLS)") from None


class Interrupted(Exception):
    """`unless` cancelled its work because the trigger fired first."""


async def unless(trigger: Callable[[], Awaitable[Any]], work: Awaitable[T]) -> T:
    """Await `work` in this task; if `trigger()` returns first, cancel `work` (its cleanup
    runs) and raise Interrupted. Errors of `work` propagate unchanged."""
    task = asyncio.current_task()
    fired = False

    async def watch() -> None:
        nonlocal fired
        try:
            await trigger()
        except Exception:  # a trigger that breaks never fires
            return
        fired = True
        task.cancel()

    outcome: list[Any] = []  # [result] or [None, error]: kept out of the TaskGroup's groups
    try:
        async with asyncio.TaskGroup() as tasks:
            watcher = tasks.create_task(watch())
            try:
                outcome.append(await work)
            except Exception as err:
                outcome += [None, err]
            finally:
                watcher.cancel()
    except asyncio.CancelledError:
        if not fired:
            raise
        task.uncancel()
        raise Interrupted() from None
    if len(outcome) == 2:
        raise outcome[1]
    return outcome[0]


async def publish(nc: NATS, subject: str, data: bytes) -> bool:
    """Publish without ever raising: a NATS outage drops the message (logged), not the service."""
    try:
        await nc.publish(subject, data)
        return True
    except nats.errors.Error as err:
        log.warning("publish_failed", subject=subject, error=type(err).__name__)
        return False


def subjects_for(args: argparse.Namespace) -> Subjects:
    return Subjects(args.namespace)


def error_reply(message: str, status: int, *, kind: str | None = None, param=None) -> bytes:
    kind = kind or ("invalid_request_error" if status < 500 else "service_unavailable")
    return encode(ErrorReply(error=ErrorBody(message=message, type=kind, code=status, param=param)))


Handler = Callable[[Msg], Awaitable[bytes]]


class BusyError(Exception):
    """The service cannot take this request now (a bounded queue is full): a 429 reply."""


def guarded(handler: Handler, what: str) -> Callable[[Msg], Awaitable[None]]:
    """Wrap a request handler: any failure becomes a coded error reply, never a dead service."""

    async def run(msg: Msg) -> None:
        try:
            reply = await handler(msg)
        except MessageError as err:
            reply = error_reply(f"malformed {what}: {err}", 400)
        except BusyError as err:
            reply = error_reply(f"{what} refused: {err}", 429, kind="rate_limit_error")
        except TimeoutError:
            reply = error_reply(f"{what} timed out", 503)
        except Exception as err:  # a bug in one request must not take the service down
            log.exception("handler_failed", handler=what)
            reply = error_reply(f"{what} failed: {err}", 500, kind="server_error")
        if msg.reply:
            await publish_reply(msg, reply)

    return run


async def publish_reply(msg: Msg, reply: bytes) -> None:
    try:
        await msg.respond(reply)
    except nats.errors.Error as err:
        log.warning("reply_failed", error=type(err).__name__)


class PeerWatch:
    """Workers known from their heartbeats; one silent for `missed_beats` beats is dead.

    Silence while this process's own NATS connection is down is not the workers' fault: it is
    not counted, and after a reconnection every known worker gets a fresh bound.
    """

    def __init__(self, is_connected: Callable[[], bool], missed_beats: int = 3) -> None:
        self.table = WorkerTable(missed_beats=missed_beats)
        self._is_connected = is_connected
        self._was_down = False

    def beat(self, report: WorkerReport, now: float | None = None) -> bool:
        """Record a heartbeat; True when the worker was not known (joined or came back)."""
        known = report.worker_id in self.table
        self.table.update(report, time.monotonic() if now is None else now)
        return not known

    def expire(self, now: float | None = None) -> list[str]:
        """Forget and return the workers that went silent."""
        now = time.monotonic() if now is None else now
        if not self._is_connected():
            self._was_down = True
            return []
        if self._was_down:
            self._was_down = False
            for state in self.table.workers():
                self.table.update(state.report, now)
        return self.table.expire(now)


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def run_service(args: argparse.Namespace, main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Configure logs, run `main(stop)` until SIGINT/SIGTERM sets `stop`; exit code 0.

    A NATS server that cannot be reached, or that refuses the credentials, at start is exit
    code 1 with one log line (a supervisor retries).
    """
    configure_logging(args.log_level)

    async def entry() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await main(stop)

    try:
        asyncio.run(entry())
    except NatsRefused as err:
        log.error("nats_refused", nats=redact_url(args.nats), error=str(err))
        return 1
    return 0


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:300]
