"""The gateway's NATS side: place a request, admit it on decode, hand the prompt to prefill, and
yield its tokens in order.

Tokens come on `disagg.stream.<gateway>.<request>` from two publishers (the first token from the
prefill worker, the rest from decode, which repeats the first), so chunks carry the index of their
first token and are reordered and de-duplicated here. Every wait is bounded; a request that ends
early (client gone, stop string, error) is aborted on the workers holding it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields

import nats.errors
from nats.aio.client import Client as NATS

from disagg.services.scheduler.placement import WorkerReport, WorkerTable
from disagg.shared.kv import prefix_block_hashes
from disagg.shared.log import get_logger
from disagg.shared.messages import (
    AbortRequest,
    AdmitReply,
    AdmitRequest,
    ErrorReply,
    Heartbeat,
    JobReply,
    MessageError,
    PlaceReply,
    PlaceRequest,
    PrefillJob,
    StreamChunk,
    Subjects,
    TransferReport,
    decode,
    decode_reply,
    encode,
)
from disagg.shared.sampling import SamplingParams

log = get_logger("disagg.gateway")


class BackendError(Exception):
    """A request the workers could not serve; `status` is HTTP-like."""

    def __init__(self, status: int, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


@dataclass(frozen=True)
class Timeouts:
    place_s: float = 5.0
    admit_s: float = 10.0
    first_token_s: float = 120.0
    inter_token_s: float = 60.0


@dataclass
class TokenEvent:
    """New tokens in order; `finish_reason` set on the last event."""

    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class _Stream:
    """Reorders one request's chunks by token index."""

    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=4096))
    tokens: dict[int, int] = field(default_factory=dict)
    next_index: int = 0
    final_len: int | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0

    def absorb(self, chunk: StreamChunk) -> TokenEvent:
        for i, token in enumerate(chunk.token_ids):
            if chunk.index + i >= self.next_index:
                self.tokens[chunk.index + i] = token
        if chunk.finish_reason is not None:
            self.final_len = chunk.index + len(chunk.token_ids)
            self.finish_reason = chunk.finish_reason
        self.num_prompt_tokens = max(self.num_prompt_tokens, chunk.num_prompt_tokens)
        ready = []
        while self.next_index in self.tokens:
            ready.append(self.tokens.pop(self.next_index))
            self.next_index += 1
        done = self.final_len is not None and self.next_index >= self.final_len
        return TokenEvent(ready, self.finish_reason if done else None, self.num_prompt_tokens)


class Backend:
    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        gateway_id: str,
        *,
        timeouts: Timeouts = Timeouts(),
        wire_block_size: int = 16,
    ) -> None:
        self.nc, self.subjects, self.gateway_id = nc, subjects, gateway_id
        self.timeouts = timeouts
        self.workers = WorkerTable()
        self._streams: dict[str, _Stream] = {}
        self._hash_block_size = wire_block_size
        self._background: set[asyncio.Task] = set()  # aborts outliving their request
        self.on_heartbeat = None  # optional callback(report) for metrics
        self.on_transfer = None  # optional callback(TransferReport) for metrics

    async def start(self) -> None:
        await self.nc.subscribe(self.subjects.stream_wildcard(self.gateway_id), cb=self._on_chunk)
        await self.nc.subscribe(self.subjects.heartbeat, cb=self._on_heartbeat)
        await self.nc.subscribe(self.subjects.transfer_stats, cb=self._on_transfer)

    async def _on_transfer(self, msg) -> None:
        try:
            report = decode(TransferReport, msg.data)
        except MessageError as err:
            log.warning("bad_transfer_report", error=str(err))
            return
        if self.on_transfer is not None and report.ok:
            self.on_transfer(report)

    # -- inbound ----------------------------------------------------------------------------

    async def _on_chunk(self, msg) -> None:
        try:
            chunk = decode(StreamChunk, msg.data)
        except MessageError as err:
            log.warning("bad_stream_chunk", error=str(err))
            return
        stream = self._streams.get(chunk.request_id)
        if stream is None:
            return  # late chunk of a request that already ended
        try:
            stream.queue.put_nowait(chunk)
        except asyncio.QueueFull:
            log.error("stream_overflow", request_id=chunk.request_id)

    async def _on_heartbeat(self, msg) -> None:
        try:
            hb = decode(Heartbeat, msg.data)
            report = WorkerReport(**{f.name: getattr(hb, f.name) for f in fields(WorkerReport)})
        except ValueError as err:
            log.warning("bad_heartbeat", error=str(err))
            return
        self.workers.update(report, time.monotonic())
        if self.on_heartbeat is not None:
            self.on_heartbeat(report)

    def alive_workers(self) -> list:
        self.workers.expire(time.monotonic())
        return self.workers.workers()

    def can_serve(self) -> bool:
        """At least one worker can prefill and one can decode (a "both" worker does both)."""
        alive = [w for w in self.alive_workers() if not w.report.draining]
        return any(w.can_prefill for w in alive) and any(w.can_decode for w in alive)

    # -- one request ------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        """Yield the request's tokens in order; raises BackendError when it cannot be served."""
        stream = self._streams[request_id] = _Stream()
        holders: list[str] = []
        finished = False
        try:
            holders = await self._start(request_id, prompt, params)
            timeout = self.timeouts.first_token_s
            while not finished:
                event = stream.absorb(await self._next_chunk(stream, timeout, request_id))
                finished = event.finish_reason is not None
                if event.token_ids or finished:
                    timeout = self.timeouts.inter_token_s
                    yield event
        finally:
            del self._streams[request_id]
            if not finished and holders:
                # In a task of its own: this request may be mid-cancellation (client gone).
                task = asyncio.get_running_loop().create_task(self._abort(request_id, holders))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Let pending aborts finish (bounded), then cancel what is left."""
        if self._background:
            await asyncio.wait(self._background, timeout=5.0)
        for task in self._background:
            task.cancel()

    async def _next_chunk(self, stream: _Stream, timeout: float, request_id: str) -> StreamChunk:
        try:
            chunk = await asyncio.wait_for(stream.queue.get(), timeout)
        except TimeoutError:
            raise BackendError(504, f"no token for {timeout:.0f} s", "timeout") from None
        if chunk.error is not None:
            raise BackendError(chunk.error.code, chunk.error.message, chunk.error.type)
        return chunk

    async def _start(self, request_id: str, prompt: list[int], params: SamplingParams) -> list[str]:
        placed = await self._request(
            self.subjects.place,
            PlaceRequest(
                request_id=request_id,
                prompt_len=len(prompt),
                prefix_hashes=prefix_block_hashes(prompt, self._hash_block_size),
                exclude=[],
            ),
            PlaceReply,
            self.timeouts.place_s,
            "scheduler",
        )
        admit = AdmitRequest(
            request_id=request_id,
            gateway_id=self.gateway_id,
            prompt=prompt,
            sampling=params,
            prefill_id=placed.prefill_id,
            wire_dtype="float32",
        )
        admitted = await self._request(
            self.subjects.admit(placed.decode_id),
            admit,
            AdmitReply,
            self.timeouts.admit_s,
            "decode worker",
        )
        holders = [placed.decode_id]
        if placed.prefill_id is not None:
            job = PrefillJob(
                request_id=request_id,
                gateway_id=self.gateway_id,
                prompt=prompt,
                sampling=params,
                transfer=admitted.transfer,
                decode_id=placed.decode_id,
            )
            try:
                await self._request(
                    self.subjects.job(placed.prefill_id),
                    job,
                    JobReply,
                    self.timeouts.admit_s,
                    "prefill worker",
                )
            except BackendError:
                await self._abort(request_id, holders)
                raise
            holders.append(placed.prefill_id)
        return holders

    async def _request(self, subject: str, msg, reply_cls, timeout: float, what: str):
        try:
            resp = await self.nc.request(subject, encode(msg), timeout=timeout)
        except nats.errors.NoRespondersError:
            raise BackendError(503, f"no {what} is available", "service_unavailable") from None
        except nats.errors.TimeoutError:
            raise BackendError(
                504, f"the {what} did not answer within {timeout} s", "timeout"
            ) from None
        reply = decode_reply(reply_cls, resp.data)
        if isinstance(reply, ErrorReply):
            raise BackendError(reply.error.code, reply.error.message, reply.error.type)
        return reply

    async def _abort(self, request_id: str, holders: list[str]) -> None:
        body = encode(AbortRequest(request_id=request_id, reason="client gone or request ended"))
        for worker_id in holders:
            try:
                await self.nc.request(self.subjects.abort(worker_id), body, timeout=2.0)
            except (nats.errors.Error, TimeoutError) as err:
                log.warning(
                    "abort_failed", request_id=request_id, worker_id=worker_id, error=str(err)
                )
