"""What every worker shell does, whatever its role: load the runtime, run the core on the
compute thread (``ComputeLoop``), heartbeat, abort, publish outputs, drain on SIGTERM.

A role is a subclass (``prefill_service.PrefillService``, ``decode_service.DecodeService``)
that builds its core and its KV endpoint, subscribes to its own subjects and turns the core's
outputs into NATS messages. On SIGTERM a worker stops taking work, says so in its heartbeats,
finishes what it holds (bounded by --drain-timeout-s) and exits 0. A NATS outage is survived:
publishes are buffered or dropped, never fatal.
"""

from __future__ import annotations

import abc
import asyncio
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg

from disagg.services.workers.config import WorkerConfig
from disagg.services.workers.loop import ComputeLoop
from disagg.shared.cluster import Leases
from disagg.shared.engine.runtime import Runtime, build_runtime, tty_progress
from disagg.shared.log import get_logger
from disagg.shared.protocol.codec import ErrorBody, Message, decode, encode, error_reply
from disagg.shared.protocol.messages import (
    AbortReply,
    AbortRequest,
    GatewayHeartbeat,
    Heartbeat,
    RoleReply,
    RoleRequest,
    StreamChunk,
)
from disagg.shared.protocol.types import MessageError, Role, new_worker_id
from disagg.shared.service import connect_nats, guarded, publish, sleep_unless

log = get_logger("disagg.worker")
HEARTBEAT_S = 1.0
MAX_REPORTED_HASHES = 4096  # prefix summary in a heartbeat: ~37 KB of msgpack
PUBLISH_QUEUE = 65536  # outgoing messages waiting for NATS


@dataclass(frozen=True)
class Stats:
    """What the heartbeat reports; written by the compute thread, read by the event loop."""

    free_blocks: int = 0
    running: int = 0
    waiting: int = 0
    queued_prefill_tokens: int = 0
    prefill_tokens: int = 0
    sampled_tokens: int = 0
    busy_s: float = 0.0
    prefix_hashes: tuple[int, ...] = ()


class WorkerService(abc.ABC):
    """The shell of one worker; subclasses supply the role's core and subjects."""

    zmq_address = ""  # where this worker's KV receiver listens ("" when it has none)

    def __init__(self, cfg: WorkerConfig, runtime: Runtime | None = None) -> None:
        """``runtime``: the weights and KV cache of this worker's previous role (a switch)."""
        self.cfg, self.role = cfg, cfg.role
        self.worker_id = cfg.id or new_worker_id(cfg.role)
        self.subjects = cfg.service.subjects
        self.next_role: Role | None = None  # set by a RoleRequest: run() returns to switch
        self._drain_s: float | None = None  # its drain bound (None: --drain-timeout-s)
        if runtime is None:
            started = time.monotonic()
            runtime = build_runtime(cfg.runtime, tty_progress("loading weights"))
            log.info("weights_loaded", worker_id=self.worker_id, model=str(cfg.runtime.model),
                     seconds=_since(started))  # fmt: skip
        self.runtime: Runtime = runtime
        runtime.engine.on_layer = None  # a prefill core installs its own
        self._hashes_at = -math.inf
        self.stats = Stats()
        self._refresh_stats()
        self.draining = False
        self.gateways: dict[str, str] = {}  # request id -> gateway id (event loop only)
        self.leases: Leases | None = None  # of the gateways with requests here
        self.core = self.build_core()
        self.loop = ComputeLoop(
            self._step, self.core.has_work, self._on_outputs, on_idle=self._refresh_stats
        )
        self._publish: asyncio.Queue[tuple[str, Message]] = asyncio.Queue(maxsize=PUBLISH_QUEUE)
        self.nc = None

    # -- what a role supplies -----------------------------------------------------------------

    @abc.abstractmethod
    def build_core(self) -> Any:
        """The role's core (it has ``step``, ``has_work`` and ``abort``)."""

    @abc.abstractmethod
    async def subscribe(self) -> None:
        """Subscribe to the role's own subjects (``self.nc`` is connected)."""

    @abc.abstractmethod
    def messages_of(self, output: Any) -> list[tuple[str, Message]]:
        """The (subject, message)s an output of the core is published as, in order."""

    def collect(self) -> list:
        """One step of the core: its outputs (compute thread)."""
        return self.core.step()

    def background(self, stop: asyncio.Event) -> list[Coroutine[Any, Any, None]]:
        """The role's own tasks (each ends when ``stop`` is set)."""
        return []

    @abc.abstractmethod
    def close_endpoints(self) -> None:
        """Close the role's KV endpoint."""

    # -- compute thread -----------------------------------------------------------------------

    def _step(self) -> list:
        started = time.perf_counter()
        outputs = self.collect()
        self._refresh_stats(time.perf_counter() - started)
        return outputs

    def _refresh_stats(self, step_s: float = 0.0) -> None:
        """Publish a new immutable Stats (compute thread only: it reads the engine and pool);
        after every step, and every idle wait (an abort or an admit changes the pool too)."""
        scheduler, pool, old = self.runtime.engine.scheduler, self.runtime.pool, self.stats
        now = time.monotonic()
        hashes = old.prefix_hashes
        if now - self._hashes_at >= HEARTBEAT_S:  # O(cached blocks): once a heartbeat at most
            hashes, self._hashes_at = tuple(pool.cached_hashes(MAX_REPORTED_HASHES)), now
        self.stats = Stats(
            free_blocks=pool.num_free,
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            queued_prefill_tokens=scheduler.num_queued_prefill_tokens,
            prefill_tokens=scheduler.num_prefill_tokens_computed,
            sampled_tokens=scheduler.num_tokens_sampled,
            busy_s=old.busy_s + step_s,
            prefix_hashes=hashes,
        )

    # -- event loop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self.nc = await connect_nats(self.cfg.service.nats, self.worker_id)
        timeout_s = HEARTBEAT_S * self.cfg.service.missed_heartbeats
        self.leases = Leases(lambda: self.nc.is_connected, timeout_s)
        await self.nc.subscribe(self.subjects.gateway_heartbeat, cb=self._on_gateway_beat)
        await self.subscribe()
        abort = guarded(self._on_abort, "abort")
        await self.nc.subscribe(self.subjects.abort(self.worker_id), cb=abort)
        await self.nc.subscribe(
            self.subjects.role(self.worker_id), cb=guarded(self._on_role, "role")
        )
        self.loop.start()
        self._log_start()
        done = asyncio.Event()  # ends this shell's tasks: SIGTERM, or a role switch
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._heartbeats(done))
            tasks.create_task(self._publisher(done))
            tasks.create_task(self._watch_gateways(done))
            for work in self.background(done):
                tasks.create_task(work)
            await self._until_stopped(stop)
            await self._drain()
            if self.next_role is not None and not stop.is_set():
                await self._abort_leftovers()
            done.set()
        await self._close()

    def refusal(self) -> bytes | None:
        """The 503 a draining worker answers new work with; None while it takes work."""
        if self.draining:
            return error_reply(f"worker {self.worker_id} is draining", 503)
        return None

    async def _until_stopped(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and self.next_role is None:
            if self.loop.failed is not None:
                raise SystemExit(f"compute loop failed: {self.loop.failed!r}")
            await sleep_unless(stop, 0.5)

    def track(self, request_ids, gateway_id: str) -> None:
        """Requests of ``gateway_id`` held here: their chunks go to it, and they end with its
        lease (which sending them renews)."""
        for request_id in request_ids:
            self.gateways[request_id] = gateway_id
        self.leases.renew(gateway_id, time.monotonic())

    async def _on_gateway_beat(self, msg: Msg) -> None:
        try:
            beat = decode(GatewayHeartbeat, msg.data)
        except MessageError:
            return
        self.leases.renew(beat.gateway_id, time.monotonic())

    async def _watch_gateways(self, stop: asyncio.Event) -> None:
        """Abort the requests of gateways whose heartbeats stopped: nobody reads their tokens."""
        while not stop.is_set():
            for gateway_id in self.leases.expire(time.monotonic()):
                orphans = [r for r, g in self.gateways.items() if g == gateway_id]
                for request_id in orphans:
                    await self.loop.call(self.core.abort, request_id)
                    self.gateways.pop(request_id, None)
                if orphans:
                    log.warning("gateway_lost", gateway_id=gateway_id, aborted=len(orphans))
            await sleep_unless(stop, 0.5)

    async def _on_role(self, msg: Msg) -> bytes:
        req = decode(RoleRequest, msg.data)
        if req.role == self.role:
            return encode(RoleReply(worker_id=self.worker_id, role=self.role, switching=False))
        if (refused := self.refusal()) is not None:
            return refused
        self.next_role = Role(req.role)
        self._drain_s = req.drain_s
        log.info("role_switch", worker_id=self.worker_id, role=self.role, to=self.next_role,
                 drain_s=req.drain_s)  # fmt: skip
        return encode(RoleReply(worker_id=self.worker_id, role=self.next_role, switching=True))

    async def _abort_leftovers(self) -> None:
        """A switch whose drain timed out: each request still held gets a retryable error (its
        gateway moves it elsewhere with the tokens it has) and is aborted here, so the next
        role starts on an empty engine and a full pool. Its gateway is forgotten first: the
        abort's own output then goes nowhere."""
        leftovers = list(self.gateways.items())
        for request_id, gateway_id in leftovers:
            if self.gateways.pop(request_id, None) is None:
                continue  # it ended (or was aborted) while an earlier one was moved
            chunk = StreamChunk(
                request_id=request_id, worker_id=self.worker_id, index=0, token_ids=[],
                finish_reason=None, num_prompt_tokens=0, num_cached_tokens=0,
                error=ErrorBody(message="the worker is switching role", type="service_unavailable",
                                code=503),
            )  # fmt: skip
            await publish(self.nc, self.subjects.stream(gateway_id, request_id), encode(chunk))
            await self.loop.call(self.core.abort, request_id)
        if leftovers:
            log.warning("switch_moved", worker_id=self.worker_id, requests=len(leftovers))

    async def _on_abort(self, msg: Msg) -> bytes:
        req = decode(AbortRequest, msg.data)
        found = await self.loop.call(self.core.abort, req.request_id)
        self.gateways.pop(req.request_id, None)  # its gateway stopped listening for it
        log.info("abort", request_id=req.request_id, reason=req.reason, found=found)
        return encode(AbortReply(request_id=req.request_id, found=bool(found)))

    def _on_outputs(self, outputs: list) -> None:
        for out in outputs:
            for item in self.messages_of(out):
                try:
                    self._publish.put_nowait(item)
                except asyncio.QueueFull:
                    log.error("publish_queue_full", subject=item[0])

    def stream_subject(self, request_id: str, done: bool) -> str | None:
        """Where a request's chunks go (its gateway's stream); ``done`` forgets the gateway."""
        gateway = self.gateways.pop(request_id, None) if done else self.gateways.get(request_id)
        return None if gateway is None else self.subjects.stream(gateway, request_id)

    async def _publisher(self, stop: asyncio.Event) -> None:
        while not (stop.is_set() and self._publish.empty()):
            try:  # asyncio.timeout: wait_for can lose a cancellation on 3.11
                async with asyncio.timeout(0.2):
                    subject, message = await self._publish.get()
            except TimeoutError:
                continue
            await publish(self.nc, subject, encode(message))

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.nc.is_connected:
                await publish(self.nc, self.subjects.heartbeat, encode(self._heartbeat()))
            await sleep_unless(stop, HEARTBEAT_S)

    def _heartbeat(self) -> Heartbeat:
        rt, s = self.runtime, self.stats  # refreshed by every step, and when idle
        return Heartbeat(
            worker_id=self.worker_id,
            role=self.role,
            zmq_address=self.zmq_address,
            model=str(self.cfg.runtime.model),
            fingerprint=rt.fingerprint,
            block_size=rt.pool.block_size,
            total_blocks=rt.pool.num_blocks,
            free_blocks=s.free_blocks,
            running=s.running,
            waiting=s.waiting,
            queued_prefill_tokens=s.queued_prefill_tokens,
            max_model_len=rt.engine.scheduler.max_model_len,
            prefix_hashes=list(s.prefix_hashes),
            sent_at=time.time(),
            draining=self.draining,
            switching_to=self.next_role if self.draining else None,
            prefill_tokens=s.prefill_tokens,
            sampled_tokens=s.sampled_tokens,
            busy_s=s.busy_s,
        )

    async def _drain(self) -> None:
        """Refuse new work, finish what is held (bounded), then let run() return."""
        self.draining = True
        await publish(self.nc, self.subjects.heartbeat, encode(self._heartbeat()))
        bound = self.cfg.drain_timeout_s if self._drain_s is None else self._drain_s
        deadline = time.monotonic() + bound
        while self.core.has_work() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("drained", worker_id=self.worker_id, leftover=self.core.has_work())

    async def _close(self) -> None:
        await self.loop.stop()
        if self.nc is not None:
            await self.nc.drain()
        self.close_endpoints()

    def _log_start(self) -> None:
        rt = self.runtime
        log.info(
            "worker_ready",
            worker_id=self.worker_id,
            role=self.role,
            model=str(self.cfg.runtime.model),
            params_m=round(sum(p.numel() for p in rt.model.parameters()) / 1e6, 2),
            dtype=str(rt.cache.dtype).removeprefix("torch."),
            kv_blocks=rt.pool.num_blocks,
            kv_capacity_tokens=rt.capacity_tokens,
            kv_address=self.zmq_address or None,
            nats=self.cfg.service.nats.display,
        )


def _since(start: float) -> float:
    return round(time.monotonic() - start, 2)
