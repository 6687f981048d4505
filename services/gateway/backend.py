"""The gateway's NATS side: place a request, admit it on decode, hand the prompt to prefill, and
yield its tokens in order; move it to other workers when one fails (see `migration`).

Tokens come on `disagg.stream.<gateway>.<attempt>` from two publishers (the first token from the
prefill worker, the rest from decode, which repeats the first), so chunks carry the index of their
first token and are reordered and de-duplicated here.

Failure detection, per attempt:
- a holder's heartbeats stop (`PeerWatch`, about 3 s): decode death always moves the request,
  prefill death only while decode has not started (afterwards prefill holds nothing of it);
- a worker refuses (429/503), does not answer (admit, job) or reports a failed KV transfer;
- the decode worker's chunks skip an index (chunks were lost, e.g. across a NATS restart);
- no token within --first-token-timeout-s / --inter-token-timeout-s (the backstop), or within
  `resync_s` after this gateway reconnected to NATS while decode was streaming.
Every attempt that ends early is aborted on the workers holding it, which frees their blocks.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

import nats.errors
from nats.aio.client import Client as NATS

from disagg.services.gateway.config import Timeouts
from disagg.services.gateway.fork import JOIN_S, ForkGroup
from disagg.services.gateway.migration import BackendError, Progress, WorkerLost, retryable
from disagg.services.gateway.stream import AttemptStream, Resync, TokenEvent, WorkerDied
from disagg.shared.cluster import PeerWatch, WorkerState
from disagg.shared.engine.block_pool import prefix_block_hashes
from disagg.shared.log import get_logger
from disagg.shared.protocol.codec import ErrorReply, Message, decode, decode_reply, encode
from disagg.shared.protocol.messages import (
    AbortRequest,
    AdmitReply,
    AdmitRequest,
    Fork,
    Heartbeat,
    JobReply,
    PlaceReply,
    PlaceRequest,
    PrefillJob,
    StreamChunk,
    TransferReport,
)
from disagg.shared.protocol.sampling import SamplingParams
from disagg.shared.protocol.subjects import Subjects
from disagg.shared.protocol.types import DEFAULT_BLOCK_SIZE, MessageError, Role
from disagg.shared.service import Interrupted, request, sleep_unless, unless

__all__ = ["Backend", "BackendError", "TokenEvent"]

log = get_logger("disagg.gateway")
WATCH_PERIOD_S = 0.25
ABORT_TIMEOUT_S = 2.0
PLACE_RETRY_S = 0.1  # first wait before asking again when no scheduler listens


class Backend:
    """Runs requests on the workers over NATS. `run()` must be running (it watches worker
    liveness and owns the abort tasks)."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        gateway_id: str,
        *,
        timeouts: Timeouts = Timeouts(),
        migration_limit: int = 3,
        missed_heartbeats: int = 3,
        default_block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        self.nc, self.subjects, self.gateway_id = nc, subjects, gateway_id
        self.timeouts, self.migration_limit = timeouts, migration_limit
        self.peers = PeerWatch(lambda: nc.is_connected, missed_heartbeats)
        self._streams: dict[str, AttemptStream] = {}  # attempt id -> stream
        self._deaths: dict[str, asyncio.Event] = {}  # worker id -> set when declared dead
        self._default_block_size = default_block_size
        self._tasks: asyncio.TaskGroup | None = None
        self.on_heartbeat: Callable[[Heartbeat], None] | None = None
        self.on_transfer: Callable[[TransferReport], None] | None = None
        self.on_worker_dead: Callable[[str], None] | None = None
        self.on_migration: Callable[[str], None] | None = None

    async def start(self) -> None:
        await self.nc.subscribe(self.subjects.stream_wildcard(self.gateway_id), cb=self._on_chunk)
        await self.nc.subscribe(self.subjects.heartbeat, cb=self._on_heartbeat)
        await self.nc.subscribe(self.subjects.transfer_stats, cb=self._on_transfer)

    async def run(self, until: asyncio.Event) -> None:
        """Watch worker liveness until `until` is set, then let pending aborts finish."""
        async with asyncio.TaskGroup() as self._tasks:
            while not until.is_set():
                self.expire()
                await sleep_unless(until, WATCH_PERIOD_S)
        self._tasks = None

    def expire(self) -> list[str]:
        """Declare silent workers dead and tell the attempts that depend on them."""
        dead = self.peers.expire(time.monotonic())
        for worker_id in dead:
            log.warning("worker_dead", worker_id=worker_id, silent_s=self.peers.table.timeout_s)
            if self.on_worker_dead is not None:
                self.on_worker_dead(worker_id)
            if (death := self._deaths.pop(worker_id, None)) is not None:
                death.set()
            for stream in self._streams.values():
                if worker_id in (stream.decode_id, stream.prefill_id):
                    stream.push(WorkerDied(worker_id))
        return dead

    async def resync(self) -> None:
        """After a NATS reconnection: chunks published meanwhile may be lost."""
        for stream in self._streams.values():
            stream.push(Resync())

    # -- inbound ----------------------------------------------------------------------------

    async def _on_transfer(self, msg) -> None:
        report = _decoded(TransferReport, msg.data, "bad_transfer_report")
        if report is not None and report.ok and self.on_transfer is not None:
            self.on_transfer(report)

    async def _on_chunk(self, msg) -> None:
        chunk = _decoded(StreamChunk, msg.data, "bad_stream_chunk")
        stream = None if chunk is None else self._streams.get(chunk.request_id)
        if stream is not None:  # else: a late chunk of an attempt that already ended
            stream.push(chunk)

    async def _on_heartbeat(self, msg) -> None:
        if (report := _decoded(Heartbeat, msg.data, "bad_heartbeat")) is None:
            return
        if self.peers.beat(report, time.monotonic()):
            log.info("worker_joined", worker_id=report.worker_id, role=report.role)
        if self.on_heartbeat is not None:
            self.on_heartbeat(report)

    def _hash_block_size(self) -> int:
        """The block size most decode workers use (their prefix caches are what placement
        matches the prompt's hashes against); the default before any heartbeat."""
        sizes = Counter(w.report.block_size for w in self.peers.table.alive(Role.DECODE))
        return sizes.most_common(1)[0][0] if sizes else self._default_block_size

    def alive_workers(self) -> list[WorkerState]:
        self.expire()
        return self.peers.table.workers()

    def can_serve(self) -> bool:
        """At least one worker can prefill and one can decode (a "both" worker does both)."""
        self.expire()
        table = self.peers.table  # a worker switching role counts as its next one
        return all(table.alive(r) or table.coming(r) for r in (Role.PREFILL, Role.DECODE))

    # -- one request ------------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        group: ForkGroup[PlaceReply] | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """Yield the request's tokens in order, moving it when a worker fails it; raises
        BackendError when it cannot be served. In a `group` (n sequences of one prompt) the
        first attempt is shared (see `fork`)."""
        progress = Progress(request_id, list(prompt), params)
        while True:
            if progress.remaining_tokens <= 0:  # only the finish chunk was lost
                yield TokenEvent([], "length")
                return
            try:
                async for event in self._attempt(progress, None if progress.moves else group):
                    progress.generated += event.token_ids
                    yield event
                    if event.finish_reason is not None:
                        return
            except WorkerLost as lost:
                progress.move(lost, self.migration_limit)
                log.warning(
                    "migrating",
                    request_id=request_id,
                    migration=progress.moves,
                    generated=len(progress.generated),
                    reason=lost.reason,
                    excluded=sorted(progress.excluded),
                )
                if self.on_migration is not None:
                    self.on_migration(lost.reason)

    async def _attempt(
        self, progress: Progress, group: ForkGroup[PlaceReply] | None
    ) -> AsyncIterator[TokenEvent]:
        """One attempt on one pair; ends after the finish, or raises."""
        attempt_id, started = progress.attempt_id, time.monotonic()
        stream = self._streams[attempt_id] = AttemptStream()
        finished = False
        try:
            if group is None:
                await self._start(attempt_id, progress, stream)
            elif attempt_id == group.leader:
                try:
                    forks = await group.gather()
                    await self._start(attempt_id, progress, stream, forks, group.attach)
                finally:
                    group.attach(None)  # no admit: every sequence goes alone
            else:
                await self._join(attempt_id, progress, stream, group)
            timeout, first = self.timeouts.first_token_s, True
            while not finished:
                event = stream.absorb(await self._next_chunk(stream, timeout))
                finished = event.finish_reason is not None
                if event.token_ids or finished:
                    if first and progress.moves:  # how long the move took, start to token
                        log.info("migrated", request_id=attempt_id, seconds=_since(started))
                    timeout, first = self.timeouts.inter_token_s, False
                    yield event
        finally:
            del self._streams[attempt_id]
            if not finished:
                self._abort_later(attempt_id, stream.holders)

    async def _next_chunk(self, stream: AttemptStream, timeout: float) -> StreamChunk:
        """The next chunk within `timeout`; raises WorkerLost for a dead holder, a timeout, a
        lost stream end, and BackendError when the client reads too slowly."""
        deadline = time.monotonic() + timeout
        while True:
            if stream.overflowed:
                raise BackendError(503, "the client did not read the stream fast enough")
            try:  # asyncio.timeout, not wait_for: on 3.11 wait_for can lose a cancellation (an
                # abort) that lands as the chunk arrives; this runs once per token
                async with asyncio.timeout(deadline - time.monotonic()):
                    item = await stream.queue.get()
            except TimeoutError:
                raise stream.timed_out(timeout) from None
            if isinstance(item, StreamChunk):
                return item
            if isinstance(item, WorkerDied) and (lost := stream.lost_holder(item)) is not None:
                raise lost
            if isinstance(item, Resync) and stream.decoding:
                deadline = min(deadline, time.monotonic() + self.timeouts.resync_s)

    async def _join(
        self, attempt_id: str, progress: Progress, stream: AttemptStream, group: ForkGroup
    ) -> None:
        """A sequence of a group: on its leader's workers once admitted there, else alone."""
        bound = JOIN_S + self.timeouts.place_s + self.timeouts.admit_s  # the leader's own bounds
        if (placed := await group.placement(attempt_id, bound)) is None:
            return await self._start(attempt_id, progress, stream)
        stream.decode_id, stream.prefill_id = placed.decode_id, placed.prefill_id
        stream.holders.append(placed.decode_id)

    async def _start(
        self, attempt_id: str, progress: Progress, stream: AttemptStream,
        forks: dict[str, SamplingParams] | None = None, on_admitted: Callable | None = None,
    ) -> None:  # fmt: skip
        """Place, admit on decode (with `forks`: more sequences of the prompt), hand the prompt
        to prefill."""
        prompt, params = progress.attempt_prompt(), progress.attempt_params()
        placed = await self._place(attempt_id, prompt, progress)
        stream.decode_id, stream.prefill_id = placed.decode_id, placed.prefill_id
        if params.prompt_logprobs is not None:
            stream.expect_prompt = len(prompt) - 1
        admit = AdmitRequest(
            request_id=attempt_id,
            gateway_id=self.gateway_id,
            prompt=prompt,
            sampling=params,
            prefill_id=placed.prefill_id,
            wire_dtype="float32",
            num_generated=len(progress.generated),
            forks=[Fork(request_id=rid, sampling=p) for rid, p in (forks or {}).items()],
        )
        stream.holders.append(placed.decode_id)
        admitted = await self._call_worker(
            placed.decode_id, self.subjects.admit(placed.decode_id), admit, AdmitReply,
            self.timeouts.admit_s,
        )  # fmt: skip
        if on_admitted is not None:
            on_admitted(placed)
        if placed.prefill_id is None:
            return
        job = PrefillJob(
            request_id=attempt_id,
            gateway_id=self.gateway_id,
            prompt=prompt,
            sampling=params,
            transfer=admitted.transfer,
            decode_id=placed.decode_id,
        )
        stream.holders.append(placed.prefill_id)
        await self._call_worker(
            placed.prefill_id, self.subjects.job(placed.prefill_id), job, JobReply,
            self.timeouts.job_s,
        )  # fmt: skip

    async def _place(self, attempt_id: str, prompt: list[int], progress: Progress) -> PlaceReply:
        """Placement away from every worker that failed the request; if that leaves no worker
        of a role (503), away from the dead ones only."""
        try:
            return await self._place_excluding(attempt_id, prompt, progress.excluded)
        except BackendError as err:
            if err.status != 503 or not progress.suspect - progress.dead:
                raise
        return await self._place_excluding(attempt_id, prompt, progress.dead)

    async def _place_excluding(
        self, attempt_id: str, prompt: list[int], excluded: set[str]
    ) -> PlaceReply:
        block_size = self._hash_block_size()
        request = PlaceRequest(
            request_id=attempt_id,
            prompt_len=len(prompt),
            prefix_hashes=prefix_block_hashes(prompt, block_size),
            exclude=sorted(excluded),
            hash_block_size=block_size,
        )
        # No scheduler listening (one restarting, or resubscribing after a NATS outage) is
        # retried until the placement timeout; any other answer is final.
        deadline = time.monotonic() + self.timeouts.place_s
        backoff = PLACE_RETRY_S
        while True:
            left = deadline - time.monotonic()
            try:
                return await self._call(self.subjects.place, request, PlaceReply, left, "scheduler")
            except BackendError as err:
                if not err.gone or left <= backoff:
                    raise
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, 1.0)

    async def _call_worker(self, worker_id: str, subject: str, msg, reply_cls, timeout: float):
        """A request to one worker: a refusal, silence or its death meanwhile is a WorkerLost
        (try another)."""
        death = self._deaths.setdefault(worker_id, asyncio.Event())
        call = self._call(subject, msg, reply_cls, timeout, f"worker {worker_id}")
        try:
            return await unless(death.wait, call)
        except Interrupted:
            raise WorkerLost(f"worker {worker_id} died", [worker_id], dead=True) from None
        except BackendError as err:
            raise retryable(err, worker_id) from None

    async def _call(self, subject: str, msg: Message, reply_cls, timeout: float, what: str):
        try:
            resp = await request(self.nc, subject, encode(msg), timeout)
            reply = decode_reply(reply_cls, resp.data)
        except nats.errors.NoRespondersError:
            message = f"no {what} is available"
            raise BackendError(503, message, "service_unavailable", gone=True) from None
        except nats.errors.TimeoutError:
            message = f"the {what} did not answer within {timeout:g} s"
            raise BackendError(504, message, "timeout") from None
        except nats.errors.Error as err:  # e.g. NATS reconnecting with a full buffer
            message = f"NATS is unavailable ({type(err).__name__})"
            raise BackendError(503, message, "service_unavailable") from None
        except MessageError as err:
            raise BackendError(502, f"bad reply from the {what}: {err}") from None
        if isinstance(reply, ErrorReply):
            raise BackendError(reply.error.code, reply.error.message, reply.error.type)
        return reply

    # -- aborts -----------------------------------------------------------------------------

    def _abort_later(self, attempt_id: str, holders: list[str]) -> None:
        """Abort in a task of its own: the caller may be mid-cancellation (client gone)."""
        if not holders:
            return
        if self._tasks is None:
            log.warning("abort_skipped", request_id=attempt_id, reason="backend not running")
            return
        self._tasks.create_task(self._abort(attempt_id, holders))

    async def _abort(self, attempt_id: str, holders: list[str]) -> None:
        body = encode(AbortRequest(request_id=attempt_id, reason="client gone or request ended"))
        for worker_id in holders:
            try:
                await request(self.nc, self.subjects.abort(worker_id), body, ABORT_TIMEOUT_S)
            except (nats.errors.Error, TimeoutError) as err:
                log.info("abort_failed", request_id=attempt_id, worker_id=worker_id,
                         error=type(err).__name__)  # fmt: skip


def _decoded(cls, data: bytes, event: str):
    """``data`` decoded as ``cls``, or None (logged as ``event``): a bad message is dropped."""
    try:
        return decode(cls, data)
    except MessageError as err:
        log.warning(event, error=str(err))
        return None


def _since(start: float) -> float:
    return round(time.monotonic() - start, 3)
