"""`disagg scheduler`: the worker table from heartbeats and placement on `disagg.sched.place`.

It holds no state but heartbeats (and the placements it is holding), so several can run in the
queue group: each sees every heartbeat, any one answers a placement. Placements that would
overrun decode memory wait here (see `rates`); every second a SchedulerStats message tells the
gateways what is held, how full decode is, and the recommended P:D ratio.

Several schedulers do not see each other's placements: between heartbeats two of them may
count the same free blocks, and a decode worker then refuses one admit (the gateway retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import nats.errors
from nats.aio.msg import Msg

from disagg.services.scheduler.config import SchedulerConfig
from disagg.services.scheduler.hold import Answer, HoldRefusedError, PlacementGate
from disagg.services.scheduler.placement import (
    NoCapacityError,
    NoWorkerError,
    PlaceDecision,
    PlaceInput,
    PlacementError,
    PromptTooLongError,
    decode_pressure,
)
from disagg.services.scheduler.rates import (
    QueueTrend,
    RateEstimator,
    is_prefill_bound,
    queued_prefill_tokens,
)
from disagg.shared.cluster import PeerWatch
from disagg.shared.log import get_logger
from disagg.shared.protocol.codec import decode, encode, error_reply
from disagg.shared.protocol.messages import Heartbeat, PlaceReply, PlaceRequest, SchedulerStats
from disagg.shared.protocol.types import MessageError, new_request_id
from disagg.shared.service import (
    connect_nats,
    publish,
    publish_reply,
    run_service,
    sleep_unless,
)

log = get_logger("disagg.scheduler")
TICK_S = 0.25  # held placements time out within this of --max-hold-s
STATS_INTERVAL_S = 1.0
DRAIN_S = 5.0  # bound on finishing the placement requests already received at shutdown


class SchedulerStopping(PlacementError):
    """The scheduler stopped while the request was held (HTTP 503)."""


# What the gate carries per request: the message to answer and its request id.
Held = tuple[Msg, str]


class SchedulerService:
    """Placement over NATS. Worker liveness pauses while this scheduler's own NATS link is down
    (see PeerWatch); on SIGTERM it stops taking placements, answers the held ones with 503,
    drains its subscriptions and exits 0."""

    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.subjects = cfg.service.subjects
        self.scheduler_id = cfg.id or "sched-" + new_request_id()[:10]
        self.policy, self.hold = cfg.policy, cfg.hold
        self.gate: PlacementGate[Held] = PlacementGate(self.policy, self.hold)
        self.rates = RateEstimator(cfg.rate_window_s)
        self.trend = QueueTrend(cfg.rate_window_s)
        self.watch: PeerWatch | None = None
        self.nc = None

    @property
    def table(self):
        return self.watch.table

    async def run(self, stop: asyncio.Event) -> None:
        service = self.cfg.service
        self.nc = nc = await connect_nats(service.nats, "scheduler")
        self.watch = PeerWatch(lambda: nc.is_connected, service.missed_heartbeats)
        await nc.subscribe(self.subjects.heartbeat, cb=self._on_heartbeat)
        queue = self.subjects.scheduler_queue
        placing = await nc.subscribe(self.subjects.place, queue=queue, cb=self._on_place)
        log.info(
            "scheduler_ready",
            scheduler_id=self.scheduler_id,
            nats=service.nats.display,
            queue=queue,
            kv_watermark=self.hold.watermark,
            max_held=self.hold.max_held,
            max_hold_s=self.hold.max_hold_s,
        )
        next_stats = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            self._expire(now)
            await self._answer(self.gate.release(self.table, now))
            if now >= next_stats:
                next_stats = now + STATS_INTERVAL_S
                await self._publish_stats(now)
            await sleep_unless(stop, TICK_S)
        await self._stop_placing(placing)
        await nc.drain()
        log.info("scheduler_stopped")

    async def _stop_placing(self, placing) -> None:
        """Take no new placement, finish those received, answer the held ones with 503."""
        with contextlib.suppress(nats.errors.Error, TimeoutError):  # NATS may be down
            await asyncio.wait_for(placing.drain(), DRAIN_S)
        stopping = SchedulerStopping("the scheduler is shutting down")
        await self._answer(self.gate.cancel_all(stopping, time.monotonic()))

    def _expire(self, now: float) -> None:
        for worker_id in self.watch.expire(now):
            log.warning("worker_dead", worker_id=worker_id)
            self.rates.forget(worker_id)

    async def _on_heartbeat(self, msg) -> None:
        try:
            report = decode(Heartbeat, msg.data)
        except MessageError as err:
            log.warning("bad_heartbeat", error=str(err))
            return
        now = time.monotonic()
        if self.watch.beat(report, now):
            log.info("worker_joined", worker_id=report.worker_id, role=report.role)
        self.gate.after_heartbeat(self.table, report.worker_id, now)
        self.rates.observe(report, now)
        await self._answer(self.gate.release(self.table, now))

    async def _on_place(self, msg: Msg) -> None:
        """Answer now, or hold the request (answered later by `_answer`); never raises."""
        try:
            req = decode(PlaceRequest, msg.data)
        except MessageError as err:
            await _reply(msg, error_reply(f"malformed place: {err}", 400))
            return
        try:
            await self._place(msg, req)
        except Exception as err:  # a bug in one request must not take the service down
            log.exception("handler_failed", handler="place", request_id=req.request_id)
            await _reply(msg, error_reply(f"place failed: {err}", 500, kind="server_error"))

    async def _place(self, msg: Msg, req: PlaceRequest) -> None:
        now = time.monotonic()
        self._expire(now)
        request = PlaceInput(
            req.prompt_len,
            tuple(req.prefix_hashes),
            frozenset(req.exclude),
            hash_block_size=req.hash_block_size,
        )
        submitted = self.gate.submit(self.table, (msg, req.request_id), request, now)
        if submitted.held_reason is not None:
            log.info(
                "placement_held",
                request_id=req.request_id,
                reason=submitted.held_reason,
                held=self.gate.held,
                decode_kv_usage=round(decode_pressure(self.table), 3),
            )
        await self._answer(submitted.answers)

    async def _answer(self, answers: list[Answer[Held]]) -> None:
        for answer in answers:
            msg, request_id = answer.item
            outcome = answer.outcome
            if answer.held_s is not None:
                log.info(
                    "placement_released",
                    request_id=request_id,
                    held_s=round(answer.held_s, 3),
                    outcome="placed" if isinstance(outcome, PlaceDecision) else "refused",
                    error=None if isinstance(outcome, PlaceDecision) else str(outcome),
                )
            if isinstance(outcome, PlaceDecision):
                await _reply(msg, self._placed(request_id, outcome, answer.request))
            else:
                await _reply(msg, _placement_error(outcome))

    def _placed(self, request_id: str, decision: PlaceDecision, request: PlaceInput) -> bytes:
        log.info(
            "placed",
            request_id=request_id,
            decode=decision.decode_id,
            prefill=decision.prefill_id,
            excluded=sorted(request.exclude) or None,
        )
        return encode(
            PlaceReply(
                request_id=request_id,
                decode_id=decision.decode_id,
                prefill_id=decision.prefill_id,
            )
        )

    async def _publish_stats(self, now: float) -> None:
        self.trend.add(now, queued_prefill_tokens(self.table))
        if self.nc.is_connected:  # else: these stats are stale by the reconnection
            await publish(self.nc, self.subjects.scheduler_stats, encode(self.stats(now)))

    def stats(self, now: float) -> SchedulerStats:
        """This scheduler's rate-matching state now."""
        table, counters = self.table, self.gate.counters
        return SchedulerStats(
            scheduler_id=self.scheduler_id,
            held=self.gate.held,
            holds=counters.holds,
            hold_timeouts=counters.timeouts,
            hold_overflows=counters.overflows,
            hold_seconds=counters.hold_seconds,
            max_hold_s=self.hold.max_hold_s,
            decode_kv_usage=min(1.0, max(0.0, decode_pressure(table))),
            prefill_bound=is_prefill_bound(table, self.trend, self.gate.held, self.hold.watermark),
            prefill_decode_ratio=self.rates.ratio(now),
        )


async def _reply(msg: Msg, reply: bytes) -> None:
    """Answer a request; a gateway that gave up meanwhile (its inbox is gone) gets nothing and
    loses nothing."""
    if msg.reply:
        await publish_reply(msg, reply)


def _placement_error(err: PlacementError) -> bytes:
    if isinstance(err, NoWorkerError | SchedulerStopping):
        return error_reply(str(err), 503)
    if isinstance(err, NoCapacityError | HoldRefusedError):
        return error_reply(str(err), 429, kind="rate_limit_error")
    if isinstance(err, PromptTooLongError):
        return error_reply(str(err), 400)
    return error_reply(str(err), 500, kind="server_error")


def main(cfg: SchedulerConfig) -> int:
    return run_service(cfg.service, SchedulerService(cfg).run)
