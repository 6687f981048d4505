"""`disagg scheduler`: the worker table from heartbeats and placement on `disagg.sched.place`.

It holds no state but heartbeats, so several can run in the queue group: each sees every
heartbeat, any one answers a placement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import fields

from disagg.services.common import (
    NatsConfig,
    add_nats_flags,
    connect_nats,
    error_reply,
    flag,
    guarded,
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
    WorkerTable,
    place,
)
from disagg.shared.log import get_logger
from disagg.shared.messages import Heartbeat, PlaceReply, PlaceRequest, decode, encode

log = get_logger("disagg.scheduler")


def add_scheduler_args(p: argparse.ArgumentParser) -> None:
    add_nats_flags(p)
    flag(p, "--missed-heartbeats", type=int, default=3, help="silent beats before a worker is dead")
    flag(p, "--local-prefill-threshold", type=int, default=0, help="tokens; 0 = always ship KV")


def report_of(hb: Heartbeat) -> WorkerReport:
    return WorkerReport(**{f.name: getattr(hb, f.name) for f in fields(WorkerReport)})


class SchedulerService:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.subjects = subjects_for(args)
        self.table = WorkerTable(missed_beats=args.missed_heartbeats)
        self.policy = PlacementPolicy(local_prefill_threshold_tokens=args.local_prefill_threshold)

    async def run(self, stop: asyncio.Event) -> None:
        nc = await connect_nats(NatsConfig.from_args(self.args), "scheduler")
        await nc.subscribe(self.subjects.heartbeat, cb=self._on_heartbeat)
        queue = self.subjects.scheduler_queue
        await nc.subscribe(self.subjects.place, queue=queue, cb=guarded(self._on_place, "place"))
        log.info("scheduler_ready", nats=self.args.nats, queue=queue)
        while not stop.is_set():
            for worker_id in self.table.expire(time.monotonic()):
                log.warning("worker_dead", worker_id=worker_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        await nc.drain()

    async def _on_heartbeat(self, msg) -> None:
        try:
            report = report_of(decode(Heartbeat, msg.data))
        except ValueError as err:  # MessageError, or a report the table refuses
            log.warning("bad_heartbeat", error=str(err))
            return
        if report.worker_id not in self.table:
            log.info("worker_joined", worker_id=report.worker_id, role=report.role)
        self.table.update(report, time.monotonic())

    async def _on_place(self, msg) -> bytes:
        req = decode(PlaceRequest, msg.data)
        self.table.expire(time.monotonic())
        request = PlaceInput(req.prompt_len, tuple(req.prefix_hashes), frozenset(req.exclude))
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
