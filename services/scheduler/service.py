"""`disagg scheduler`: the worker table from heartbeats and placement on `disagg.sched.place`.

It holds no state but heartbeats, so several can run in the queue group: each sees every
heartbeat, any one answers a placement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from dataclasses import fields

from disagg.services.common import (
    NatsConfig,
    PeerWatch,
    add_nats_flags,
    connect_nats,
    error_reply,
    flag,
    guarded,
    redact_url,
    run_service,
    subjects_for,
)
from disagg.services.scheduler.placement import (
    NoCapacityError,
    NoWorkerError,
    PlaceInput,
    PlacementError,
    PlacementPolicy,
    PromptTooLongError,
    WorkerReport,
    place,
)
from disagg.shared.log import get_logger
from disagg.shared.messages import Heartbeat, PlaceReply, PlaceRequest, decode, encode

log = get_logger("disagg.scheduler")


def add_scheduler_args(p: argparse.ArgumentParser) -> None:
    add_nats_flags(p)
    flag(
        p,
        "--local-prefill-threshold",
        type=int,
        default=0,
        help="uncached prompt tokens below which the decode worker prefills itself; 0 = never",
    )
    flag(
        p,
        "--prefix-weight",
        type=float,
        default=PlacementPolicy.prefix_weight,
        help="weight of cached-prefix overlap in decode placement",
    )
    flag(
        p,
        "--no-prefix-routing",
        action="store_true",
        help="place as if no worker had anything cached (for comparisons)",
    )


def report_of(hb: Heartbeat) -> WorkerReport:
    return WorkerReport(**{f.name: getattr(hb, f.name) for f in fields(WorkerReport)})


class SchedulerService:
    """Placement over NATS. Worker liveness pauses while this scheduler's own NATS link is down
    (see PeerWatch); on SIGTERM it drains its subscriptions and exits 0."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.subjects = subjects_for(args)
        self.policy = PlacementPolicy(
            local_prefill_threshold_tokens=args.local_prefill_threshold,
            prefix_weight=args.prefix_weight,
            prefix_routing=not args.no_prefix_routing,
        )
        self.watch: PeerWatch | None = None

    @property
    def table(self):
        return self.watch.table

    async def run(self, stop: asyncio.Event) -> None:
        nc = await connect_nats(NatsConfig.from_args(self.args), "scheduler")
        self.watch = PeerWatch(lambda: nc.is_connected, self.args.missed_heartbeats)
        await nc.subscribe(self.subjects.heartbeat, cb=self._on_heartbeat)
        queue = self.subjects.scheduler_queue
        await nc.subscribe(self.subjects.place, queue=queue, cb=guarded(self._on_place, "place"))
        log.info("scheduler_ready", nats=redact_url(self.args.nats), queue=queue)
        while not stop.is_set():
            for worker_id in self.watch.expire():
                log.warning("worker_dead", worker_id=worker_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        await nc.drain()
        log.info("scheduler_stopped")

    async def _on_heartbeat(self, msg) -> None:
        try:
            report = report_of(decode(Heartbeat, msg.data))
        except ValueError as err:  # MessageError, or a report the table refuses
            log.warning("bad_heartbeat", error=str(err))
            return
        if self.watch.beat(report):
            log.info("worker_joined", worker_id=report.worker_id, role=report.role)

    async def _on_place(self, msg) -> bytes:
        req = decode(PlaceRequest, msg.data)
        for worker_id in self.watch.expire():
            log.warning("worker_dead", worker_id=worker_id)
        request = PlaceInput(
            req.prompt_len,
            tuple(req.prefix_hashes),
            frozenset(req.exclude),
            hash_block_size=req.hash_block_size,
        )
        try:
            decision = place(self.table, request, self.policy)
        except PlacementError as err:
            return _placement_error(err)
        self.table.note_placed(decision, req.prompt_len)
        log.info(
            "placed",
            request_id=req.request_id,
            decode=decision.decode_id,
            prefill=decision.prefill_id,
            excluded=req.exclude or None,
        )
        return encode(
            PlaceReply(
                request_id=req.request_id,
                decode_id=decision.decode_id,
                prefill_id=decision.prefill_id,
            )
        )


def _placement_error(err: PlacementError) -> bytes:
    if isinstance(err, NoWorkerError):
        return error_reply(str(err), 503)
    if isinstance(err, NoCapacityError):
        return error_reply(str(err), 429, kind="rate_limit_error")
    if isinstance(err, PromptTooLongError):
        return error_reply(str(err), 400)
    return error_reply(str(err), 500, kind="server_error")


def main(args: argparse.Namespace) -> int:
    return run_service(args, SchedulerService(args).run)
