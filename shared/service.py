"""What every service shell shares: its NATS connection (credentials, TLS, reconnects), the
config of that connection, signal handling, bounded waits and handlers whose failures become
coded error replies."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from disagg.shared.config import group, option
from disagg.shared.log import configure_logging, get_logger
from disagg.shared.protocol.codec import ErrorReply, decode_reply, encode, error_reply
from disagg.shared.protocol.messages import RoleReply, RoleRequest
from disagg.shared.protocol.subjects import Subjects
from disagg.shared.protocol.types import MessageError

log = get_logger("disagg.service")
T = TypeVar("T")


@dataclass(frozen=True)
class NatsAuth:
    """Credentials and TLS for NATS. Secrets are better given in the environment; repr never
    shows one."""

    user: str | None = option(None, help="NATS user (password in DISAGG_NATS_PASSWORD)")
    password: str | None = option(None, help="NATS password", secret=True, hidden=True)
    token: str | None = option(None, help="NATS token", secret=True)
    creds: Path | None = option(None, help="NATS credentials file (JWT + nkey seed)")
    nkey: Path | None = option(None, help="NATS nkey seed file")
    tls_ca: Path | None = option(None, help="CA bundle that signed the NATS server cert")
    tls_cert: Path | None = option(None, help="client certificate (mutual TLS)")
    tls_key: Path | None = option(None, help="client certificate key (mutual TLS)")

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--nats-tls-cert and --nats-tls-key go together")
        if self.user and self.token:
            raise ValueError("give NATS a user/password or a token, not both")

    @property
    def has_auth(self) -> bool:
        return bool(self.user or self.token or self.creds or self.nkey)

    def tls_context(self) -> ssl.SSLContext | None:
        """A client TLS context when a CA or a client certificate is configured."""
        if not (self.tls_ca or self.tls_cert):
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def options(self) -> dict[str, Any]:
        """The nats.connect keywords for credentials and TLS."""
        options: dict[str, Any] = {}
        if self.user:
            options |= dict(user=self.user, password=self.password or "")
        if self.token:
            options["token"] = self.token
        if self.creds:
            options["user_credentials"] = str(self.creds)
        if self.nkey:
            options["nkeys_seed"] = str(self.nkey)
        if (context := self.tls_context()) is not None:
            options["tls"] = context
        return options


@dataclass(frozen=True)
class NatsConfig:
    """How to reach NATS; repr never shows a secret."""

    servers: tuple[str, ...] = option(
        ("nats://127.0.0.1:4222",), help="NATS server URL(s), comma separated", flag="--nats"
    )
    auth: NatsAuth = group(NatsAuth, "nats-")

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("--nats needs at least one server URL")

    def __repr__(self) -> str:  # never print secrets
        tls = "yes" if self.auth.tls_ca or self.auth.tls_cert else "no"
        auth = "yes" if self.auth.has_auth else "no"
        return f"NatsConfig(servers={self.display}, auth={auth}, tls={tls})"

    __str__ = __repr__

    @property
    def display(self) -> str:
        """The server URLs without userinfo, for logs."""
        return ",".join(redact_url(s) for s in self.servers)


@dataclass(frozen=True)
class ServiceConfig:
    """What every service on the bus is configured with."""

    nats: NatsConfig = group(NatsConfig)
    namespace: str = option("disagg", help="subject prefix, to share one NATS cluster")
    missed_heartbeats: int = option(3, help="silent heartbeats (1 s) before a peer is dead")
    log_level: str = option("info", help="debug | info | warning | error")

    def __post_init__(self) -> None:
        Subjects(self.namespace)  # raises MessageError (a ValueError) for a bad prefix
        if self.missed_heartbeats < 1:
            raise ValueError(f"--missed-heartbeats must be >= 1, got {self.missed_heartbeats}")

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.namespace)


def redact_url(url: str) -> str:
    """`nats://user:secret@host:4222` -> `nats://***@host:4222`, for logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


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
        servers=list(cfg.servers),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=reconnected,
    )
    await _connect_unless_refused(nc, options | cfg.auth.options(), refused)
    return nc


async def _connect_unless_refused(nc: NATS, options: dict, refused: asyncio.Event) -> None:
    try:
        await unless(refused.wait, nc.connect(**options))
    except Interrupted:
        raise NatsRefused("the NATS server refused this client (credentials or TLS)") from None


class Interrupted(Exception):
    """`unless` cancelled its work because the trigger fired first."""


async def sleep_unless(event: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``event`` is set, whichever is first; True if it is set.

    ``asyncio.timeout`` rather than ``wait_for``: on Python 3.11 wait_for can lose a
    cancellation that lands as its awaitable completes."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


async def request(nc: NATS, subject: str, payload: bytes, timeout: float) -> Msg:
    """``nc.request``, keeping a cancellation that lands as the reply does: nats-py awaits the
    reply with ``wait_for``, which on Python 3.11 then returns the reply and drops the cancel
    (an abort or a gone client would go unheard and the request run to its end)."""
    task = asyncio.current_task()
    cancels = task.cancelling() if task is not None else 0
    msg = await nc.request(subject, payload, timeout=timeout)
    if task is not None and task.cancelling() > cancels:
        raise asyncio.CancelledError
    return msg


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


Handler = Callable[[Msg], Awaitable[bytes]]


class BusyError(Exception):
    """The service cannot take this request now (a bounded queue is full): a 429 reply."""


async def ask_role(
    nc: NATS,
    subjects: Subjects,
    worker_id: str,
    role: str,
    *,
    drain_s: float | None = None,
    timeout: float = 10.0,
) -> RoleReply | ErrorReply:
    """Ask one worker to drain and go on as ``role`` (a ``RoleRequest``): its reply, or its
    error reply (it is draining already). NATS errors (no such worker, no answer) propagate."""
    body = encode(RoleRequest(role=role, drain_s=drain_s))
    msg = await request(nc, subjects.role(worker_id), body, timeout)
    return decode_reply(RoleReply, msg.data)


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


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def run_service(cfg: ServiceConfig, main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Configure logs, run `main(stop)` until SIGINT/SIGTERM sets `stop`; exit code 0.

    A NATS server that cannot be reached, or that refuses the credentials, at start is exit
    code 1 with one log line (a supervisor retries).
    """
    configure_logging(cfg.log_level)

    async def entry() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await main(stop)

    try:
        asyncio.run(entry())
    except NatsRefused as err:
        log.error("nats_refused", nats=cfg.nats.display, error=str(err))
        return 1
    return 0


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:300]
