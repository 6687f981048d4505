"""Worker service shells: `disagg prefill`, `disagg decode` and `disagg worker` (both roles).

The shell owns NATS (job/admit/abort subscriptions, heartbeats, token streams) and the ZeroMQ
endpoint; the core runs on the compute thread (ComputeLoop). On SIGTERM it stops taking work,
says so in its heartbeats, finishes what it holds (bounded by --drain-timeout) and exits 0.

A worker that receives KV watches the prefill workers' heartbeats: when one goes silent, the
transfers it was pushing are failed at once and their blocks freed (rather than at their
deadline). A NATS outage is survived: publishes are buffered or dropped, never fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from disagg.services.common import (
    NatsConfig,
    PeerWatch,
    add_nats_flags,
    connect_nats,
    error_reply,
    flag,
    guarded,
    publish,
    redact_url,
    run_service,
    subjects_for,
)
from disagg.services.scheduler.service import report_of
from disagg.services.workers.decode import AdmitError, DecodeWorker, FailedTransfer
from disagg.services.workers.loop import ComputeLoop
from disagg.services.workers.prefill import (
    PrefillJob,
    PrefillWorker,
    QueueFullError,
    SentTransfer,
)
from disagg.services.workers.runtime import Runtime, RuntimeConfig, build_runtime, tty_progress
from disagg.shared.engine import RequestError, RequestOutput
from disagg.shared.log import get_logger
from disagg.shared.messages import (
    AbortReply,
    AbortRequest,
    AdmitReply,
    AdmitRequest,
    ErrorBody,
    Heartbeat,
    JobReply,
    StreamChunk,
    TransferReport,
    check_id,
    decode,
    encode,
    new_worker_id,
)
from disagg.shared.messages import PrefillJob as PrefillJobMsg
from disagg.shared.transfer import KVReceiver, KVSender

log = get_logger("disagg.worker")
HEARTBEAT_S = 1.0
MAX_REPORTED_HASHES = 4096  # prefix summary in a heartbeat: ~37 KB of msgpack


def add_worker_args(p: argparse.ArgumentParser) -> None:
    add_nats_flags(p)
    flag(p, "--model", type=Path, required=True, help="Hugging Face model folder")
    flag(p, "--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    flag(p, "--device", default="cpu", help="cpu | cuda")
    flag(p, "--kv-memory-gb", type=float, default=1.0, help="memory for the KV cache")
    flag(p, "--block-size", type=int, default=16)
    flag(p, "--max-num-seqs", type=int, default=64)
    flag(p, "--max-num-batched-tokens", type=int, default=512)
    flag(p, "--max-model-len", type=int, default=None)
    flag(p, "--id", default=None, help="worker id (default: role + random suffix)")
    flag(p, "--zmq-host", default="127.0.0.1", help="interface the KV receiver binds")
    flag(p, "--zmq-port", type=int, default=0)
    flag(p, "--advertise-host", default=None, help="host peers dial (default: --zmq-host)")
    flag(p, "--kv-transfer-dtype", default=None, help="wire dtype: the cache's (default) or int8")
    flag(p, "--transfer-deadline-s", type=float, default=30.0)
    flag(p, "--drain-timeout-s", type=float, default=30.0)
    flag(p, "--max-queued-prefill-tokens", type=int, default=65536, help="prefill: beyond, 429")
    flag(p, "--cpus", default=None, help="CPU list to pin to, e.g. 0-3 or 0,2")


def parse_cpus(spec: str) -> set[int]:
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def pin_cpus(spec: str | None) -> None:
    """Own these cores: affinity plus a matching torch thread count."""
    if spec:
        cpus = parse_cpus(spec)
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(len(cpus))


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


class WorkerService:
    def __init__(self, args: argparse.Namespace, role: str) -> None:
        self.args, self.role = args, role
        self.worker_id = check_id("--id", args.id) if args.id else new_worker_id(role)
        self.subjects = subjects_for(args)
        started = time.monotonic()
        self.runtime: Runtime = build_runtime(
            RuntimeConfig.from_args(args), tty_progress("loading weights")
        )
        log.info(
            "weights_loaded", model=str(args.model), seconds=round(time.monotonic() - started, 2)
        )
        self._hashes_at = -math.inf
        self.stats = Stats()
        self._refresh_stats()
        self.draining = False
        self.gateways: dict[str, str] = {}  # request id -> gateway id (event loop only)
        self.receiver: KVReceiver | None = None
        self.sender: KVSender | None = None
        self.core = self._build_core()
        self.loop = ComputeLoop(
            self._step, self.core.has_work, self._on_outputs, on_idle=self._refresh_stats
        )
        self._publish: asyncio.Queue = asyncio.Queue(maxsize=65536)  # (subject, message)
        self.nc = None
        self.peers: PeerWatch | None = None  # prefill workers, by their heartbeats

    def _build_core(self):
        rt = self.runtime
        if self.role == "prefill":
            self.sender = KVSender(rt.fingerprint)
            return PrefillWorker(
                rt.engine, self.sender, max_queued_tokens=self.args.max_queued_prefill_tokens
            )
        args = self.args
        advertise = args.advertise_host or (
            socket.gethostname() if args.zmq_host == "0.0.0.0" else args.zmq_host
        )
        self.receiver = KVReceiver(args.zmq_host, args.zmq_port, advertise_host=advertise)
        return DecodeWorker(
            rt.engine,
            self.receiver,
            fingerprint=rt.fingerprint,
            transfer_deadline_s=args.transfer_deadline_s,
            wire_dtype=args.kv_transfer_dtype,
        )

    # -- compute thread ---------------------------------------------------------------------

    def _step(self) -> list:
        started = time.perf_counter()
        outputs = self.core.step()
        if self.role == "prefill":
            outputs += self.core.poll_sent()
        self._refresh_stats(time.perf_counter() - started)
        return outputs

    def _refresh_stats(self, step_s: float = 0.0) -> None:
        """Publish a new immutable Stats (compute thread only: it reads the engine and pool);
        after every step, and every idle wait (an abort or an admit changes the pool too)."""
        engine, pool, old = self.runtime.engine, self.runtime.pool, self.stats
        now = time.monotonic()
        hashes = old.prefix_hashes
        if now - self._hashes_at >= HEARTBEAT_S:  # O(cached blocks): once a heartbeat at most
            hashes, self._hashes_at = tuple(pool.cached_hashes(MAX_REPORTED_HASHES)), now
        self.stats = Stats(
            free_blocks=pool.num_free,
            running=len(engine.running),
            waiting=len(engine.waiting),
            queued_prefill_tokens=engine.num_queued_prefill_tokens,
            prefill_tokens=engine.num_prefill_tokens_computed,
            sampled_tokens=engine.num_tokens_sampled,
            busy_s=old.busy_s + step_s,
            prefix_hashes=hashes,
        )

    # -- event loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self.nc = await connect_nats(NatsConfig.from_args(self.args), self.worker_id)
        self.peers = PeerWatch(lambda: self.nc.is_connected, self.args.missed_heartbeats)
        await self._subscribe()
        self.loop.start()
        self._log_start()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._heartbeats(stop))
            tasks.create_task(self._publisher(stop))
            if self.receiver is not None:
                tasks.create_task(self._watch_prefill_peers(stop))
            await self._until_stopped(stop)
            await self._drain()
            stop.set()
        await self._close()

    async def _until_stopped(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.loop.failed is not None:
                raise SystemExit(f"compute loop failed: {self.loop.failed!r}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def _subscribe(self) -> None:
        s = self.subjects
        if self.role == "prefill":
            await self.nc.subscribe(s.job(self.worker_id), cb=guarded(self._on_job, "prefill job"))
        else:
            await self.nc.subscribe(s.admit(self.worker_id), cb=guarded(self._on_admit, "admit"))
        if self.receiver is not None:
            await self.nc.subscribe(s.heartbeat, cb=self._on_heartbeat)
        await self.nc.subscribe(s.abort(self.worker_id), cb=guarded(self._on_abort, "abort"))

    async def _on_admit(self, msg) -> bytes:
        req = decode(AdmitRequest, msg.data)
        if self.draining:
            return error_reply(f"worker {self.worker_id} is draining", 503)
        local = req.prefill_id is None  # aggregated, or conditional disaggregation
        self.gateways[req.request_id] = req.gateway_id
        if req.num_generated:
            log.info("migrated_in", request_id=req.request_id, num_generated=req.num_generated)
        try:
            transfer = await self._admit(req, local)
        except AdmitError as err:
            self.gateways.pop(req.request_id, None)
            return error_reply(
                str(err), err.status, kind="rate_limit_error" if err.status == 429 else None
            )
        return encode(AdmitReply(request_id=req.request_id, transfer=None if local else transfer))

    async def _admit(self, req: AdmitRequest, local: bool):
        if local:
            return await self.loop.call(
                self.core.admit_local, req.request_id, req.prompt, req.sampling
            )
        return await self.loop.call(
            self.core.admit, req.request_id, req.prompt, req.sampling, req.prefill_id
        )

    async def _on_heartbeat(self, msg) -> None:
        try:
            report = report_of(decode(Heartbeat, msg.data))
        except ValueError:
            return  # the scheduler logs bad heartbeats; a worker only needs the good ones
        if report.role != "decode":
            self.peers.beat(report)

    async def _watch_prefill_peers(self, stop: asyncio.Event) -> None:
        """Fail the transfers of prefill workers whose heartbeats stopped."""
        while not stop.is_set():
            for worker_id in self.peers.expire():
                failed = await self.loop.call(self.core.fail_transfers_from, worker_id)
                log.warning("prefill_peer_dead", worker_id=worker_id, failed_transfers=failed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def _on_job(self, msg) -> bytes:
        req = decode(PrefillJobMsg, msg.data)
        if self.draining:
            return error_reply(f"worker {self.worker_id} is draining", 503)
        self.gateways[req.request_id] = req.gateway_id
        job = PrefillJob(req.request_id, req.prompt, req.sampling, req.transfer)
        try:
            await self.loop.call(self.core.submit, job)
        except QueueFullError as err:
            self.gateways.pop(req.request_id, None)
            return error_reply(str(err), 429, kind="rate_limit_error")
        except RequestError as err:
            self.gateways.pop(req.request_id, None)
            return error_reply(str(err), 400)
        return encode(JobReply(request_id=req.request_id, accepted=True))

    async def _on_abort(self, msg) -> bytes:
        req = decode(AbortRequest, msg.data)
        found = await self.loop.call(self.core.abort, req.request_id)
        log.info("abort", request_id=req.request_id, reason=req.reason, found=found)
        return encode(AbortReply(request_id=req.request_id, found=bool(found)))

    def _on_outputs(self, outputs: list) -> None:
        for out in outputs:
            chunk = (
                self._transfer_report(out) if isinstance(out, SentTransfer) else self._chunk(out)
            )
            if chunk is not None:
                try:
                    self._publish.put_nowait(chunk)
                except asyncio.QueueFull:
                    log.error("publish_queue_full", request_id=chunk[1].request_id)

    def _transfer_report(self, sent: SentTransfer) -> tuple[str, TransferReport]:
        st = sent.stats
        ok = sent.error is None and st.done_sent_at == st.done_sent_at  # NaN: never sent
        report = TransferReport(
            request_id=sent.request_id,
            worker_id=self.worker_id,
            payload_bytes=st.payload_bytes,
            seconds=max(0.0, st.done_sent_at - st.begun_at) if ok else 0.0,
            exposed_seconds=max(0.0, st.exposed_s) if ok else 0.0,
            ok=ok,
        )
        return self.subjects.transfer_stats, report

    def _chunk(self, out) -> tuple[str, StreamChunk] | None:
        if isinstance(out, RequestOutput):
            chunk = _decode_chunk(self.worker_id, out)
            done = out.finished
        else:  # PrefillResult: the first token, straight to the gateway
            chunk = _prefill_chunk(self.worker_id, out)
            done = True
        gateway = (
            self.gateways.pop(chunk.request_id) if done else self.gateways.get(chunk.request_id)
        )
        if gateway is None:
            return None
        return self.subjects.stream(gateway, chunk.request_id), chunk

    async def _publisher(self, stop: asyncio.Event) -> None:
        while not (stop.is_set() and self._publish.empty()):
            try:
                subject, chunk = await asyncio.wait_for(self._publish.get(), 0.2)
            except TimeoutError:
                continue
            await publish(self.nc, subject, encode(chunk))

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.nc.is_connected:
                await publish(self.nc, self.subjects.heartbeat, encode(self._heartbeat()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT_S)

    def _heartbeat(self) -> Heartbeat:
        rt, s = self.runtime, self.stats  # refreshed by every step, and when idle
        return Heartbeat(
            worker_id=self.worker_id,
            role=self.role,
            zmq_address=self.receiver.address if self.receiver else "",
            model=str(self.args.model),
            fingerprint=rt.fingerprint,
            block_size=rt.pool.block_size,
            total_blocks=rt.pool.num_blocks,
            free_blocks=s.free_blocks,
            running=s.running,
            waiting=s.waiting,
            queued_prefill_tokens=s.queued_prefill_tokens,
            max_model_len=rt.engine.max_model_len,
            prefix_hashes=list(s.prefix_hashes),
            sent_at=time.time(),
            draining=self.draining,
            prefill_tokens=s.prefill_tokens,
            sampled_tokens=s.sampled_tokens,
            busy_s=s.busy_s,
        )

    async def _drain(self) -> None:
        """Refuse new work, finish what is held (bounded), then let run() return."""
        self.draining = True
        await publish(self.nc, self.subjects.heartbeat, encode(self._heartbeat()))
        deadline = time.monotonic() + self.args.drain_timeout_s
        while self.core.has_work() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("drained", worker_id=self.worker_id, leftover=self.core.has_work())

    async def _close(self) -> None:
        await self.loop.stop()
        if self.nc is not None:
            await self.nc.drain()
        for endpoint in (self.receiver, self.sender):
            if endpoint is not None:
                endpoint.close()

    def _log_start(self) -> None:
        rt = self.runtime
        log.info(
            "worker_ready",
            worker_id=self.worker_id,
            role=self.role,
            model=str(self.args.model),
            params_m=round(sum(p.numel() for p in rt.model.parameters()) / 1e6, 2),
            dtype=str(rt.cache.dtype).removeprefix("torch."),
            kv_blocks=rt.pool.num_blocks,
            kv_capacity_tokens=rt.capacity_tokens,
            kv_address=self.receiver.address if self.receiver else None,
            nats=redact_url(self.args.nats),
        )


def _decode_chunk(worker_id: str, out: RequestOutput) -> StreamChunk:
    error = None
    if isinstance(out, FailedTransfer):  # the KV never came: another pair may serve it
        error = ErrorBody(message=out.error, type="service_unavailable", code=503, param=None)
    elif out.error is not None:
        error = ErrorBody(message=out.error, type="server_error", code=500, param=None)
    return StreamChunk(
        request_id=out.request_id,
        worker_id=worker_id,
        index=out.index,
        token_ids=list(out.new_token_ids),
        finish_reason=out.finish_reason if out.finished else None,
        num_prompt_tokens=out.num_prompt_tokens,
        num_cached_tokens=out.num_cached_tokens,
        error=error,
    )


def _prefill_chunk(worker_id: str, result) -> StreamChunk:
    if result.first_token is None:
        # Nearly always the transfer (decode unreachable or gone): another pair may serve it.
        message = result.error or "prefill failed"
        error = ErrorBody(message=message, type="service_unavailable", code=503, param=None)
        return StreamChunk(
            request_id=result.request_id, worker_id=worker_id, index=0, token_ids=[],
            finish_reason="error", num_prompt_tokens=0, num_cached_tokens=0, error=error,
        )  # fmt: skip
    return StreamChunk(
        request_id=result.request_id, worker_id=worker_id, index=0,
        token_ids=[result.first_token], finish_reason=None, num_prompt_tokens=0,
        num_cached_tokens=result.num_cached_tokens, error=None,
    )  # fmt: skip


def main(args: argparse.Namespace, role: str) -> int:
    pin_cpus(args.cpus)
    service = WorkerService(args, role)
    return run_service(args, service.run)
