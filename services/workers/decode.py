"""Decode worker core: reserve blocks, receive KV into them, then decode in the continuous batch.

No NATS here: a shell calls `admit`/`abort` and `step()` in a loop and publishes the outputs.

Block ownership, step by step:
1. `admit` takes a reference on the prompt's blocks already in this worker's prefix cache (the
   longest cached prefix), allocates the rest from its pool and registers a transfer of only
   those with the KVReceiver (the descriptor's `first_block` tells the prefill worker which to
   skip). This worker owns them all (`_pending`); the receiver only writes into the new ones.
2. The transfer completes: ownership passes to the engine (`Engine.add_prefilled`), which frees
   them when the request finishes or is aborted.
3. The transfer fails, passes its deadline, its prefill worker is declared dead
   (`fail_transfers_from`, when that worker's heartbeats stop), or the request is aborted first:
   the receiver forgets the transfer (no write can follow) and this worker frees the blocks.

Forks (n sequences of one prompt, `admit(..., forks=...)`): one transfer brings the prompt's KV;
when it completes the forks join the engine as requests of the same prompt, which share its
full blocks through the prefix cache and compute only its last partial block. Until then they
live in the transfer's `_Pending`; if it fails (or their parent is aborted) each fork gets a
retryable error of its own and the gateway serves it alone.

Admission is bounded: no blocks for the prompt, `max_num_seqs` requests already held (pending
transfers included) or, locally, waiting, is a 429 so the gateway tries another worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from disagg.shared.engine.engine import Engine
from disagg.shared.engine.request import RequestError, RequestOutput
from disagg.shared.log import get_logger
from disagg.shared.protocol.descriptor import TransferDescriptor
from disagg.shared.protocol.kv_wire import TransferError
from disagg.shared.protocol.sampling import SamplingParams
from disagg.shared.transfer.receiver import TransferResult

log = get_logger("disagg.decode")


class KVSource(Protocol):
    """Where prefilled KV arrives: ``ReceiverCore`` (fed by ZeroMQ, or by a loopback)."""

    address: str

    def expect(self, desc: TransferDescriptor, kv_cache: torch.Tensor) -> None: ...
    def cancel(self, transfer_id: str) -> bool: ...
    def expire(self, now: float | None = None) -> list[str]: ...
    def poll_completed(self, timeout: float = 0.0) -> list[TransferResult]: ...


class AdmitError(Exception):
    """Admission refused; `status` is HTTP-like: 400 never serveable, 429 no room right now."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FailedTransfer(RequestOutput):
    """A request that ended because its KV never arrived: another pair may serve it (503)."""


@dataclass
class _Pending:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    transfer: TransferDescriptor
    prefill_id: str | None = None
    cached_blocks: tuple[int, ...] = ()  # prefix-cache hits, before transfer.block_ids
    forks: dict[str, SamplingParams] = field(default_factory=dict)  # sequences on its blocks

    @property
    def block_ids(self) -> list[int]:
        """Every block of the prompt, in sequence order: cached, then transferred."""
        return [*self.cached_blocks, *self.transfer.block_ids]


class DecodeWorker:
    def __init__(
        self,
        engine: Engine,
        receiver: KVSource,
        *,
        fingerprint: str,
        transfer_deadline_s: float = 30.0,
        wire_dtype: str | None = None,
    ) -> None:
        """`wire_dtype` None sends KV in the cache's own dtype; "int8" quantizes on the wire."""
        self.engine = engine
        self.receiver = receiver
        self.fingerprint = fingerprint
        self.transfer_deadline_s = transfer_deadline_s
        self.wire_dtype = wire_dtype or str(engine.kv_cache.dtype).removeprefix("torch.")
        self._pending: dict[str, _Pending] = {}  # transfer id -> reserved request
        self._by_request: dict[str, str] = {}  # request id -> transfer id
        self._outbox: list[RequestOutput] = []  # failures found outside step()

    @property
    def pool(self):
        return self.engine.pool

    @property
    def num_held(self) -> int:
        """Requests this worker holds: pending transfers (their forks too) and the engine's."""
        return len(self._by_request) + len(self.engine.scheduler.requests)

    def admit(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        prefill_id: str | None = None,
        forks: dict[str, SamplingParams] | None = None,
    ) -> TransferDescriptor:
        """Reserve blocks for `prompt` and return the descriptor a prefill worker (`prefill_id`,
        when known) fills them by. `forks` (request id -> sampling) are more sequences of the
        same prompt: they join the batch on its blocks when the transfer completes."""
        forks = forks or {}
        self._check_new([request_id, *forks], prompt, [params, *forks.values()])
        if self.num_held + len(forks) >= self.engine.scheduler.config.max_num_seqs:
            raise AdmitError(f"busy: {self.num_held} requests held", 429)
        cached = self.engine.scheduler.cached_prefix(prompt)
        self.pool.incref(cached)  # before allocating: the hits must not be evicted for it
        blocks_needed = -(-len(prompt) // self.pool.block_size) - len(cached)
        if not self.pool.can_allocate(blocks_needed):
            self.pool.free(cached)
            raise AdmitError(
                f"no room: {blocks_needed} blocks needed, {self.pool.num_free} free", 429
            )
        block_ids = self.pool.allocate(blocks_needed)
        transfer = TransferDescriptor.new(
            address=self.receiver.address,
            block_ids=block_ids,
            num_layers=self.engine.kv_cache.num_layers,
            block_size=self.pool.block_size,
            wire_dtype=self.wire_dtype,
            model_fingerprint=self.fingerprint,
            deadline_s=self.transfer_deadline_s,
            first_block=len(cached),
        )
        try:
            self.receiver.expect(transfer, self.engine.kv_cache.data)
        except TransferError as err:  # the receiver's own bound (transfers in flight)
            self.pool.free([*cached, *block_ids])
            raise AdmitError(str(err), 429) from None
        except Exception:
            self.pool.free([*cached, *block_ids])
            raise
        pending = _Pending(
            request_id, list(prompt), params, transfer, prefill_id, tuple(cached), dict(forks)
        )
        self._pending[transfer.transfer_id] = pending
        for rid in (request_id, *forks):
            self._by_request[rid] = transfer.transfer_id
        return transfer

    def admit_local(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        forks: dict[str, SamplingParams] | None = None,
    ) -> None:
        """Serve a request whole here (aggregated mode, or a prompt too short to ship); its
        `forks` start once its prompt is computed, on its blocks."""
        forks = forks or {}
        self._check_new([request_id, *forks], prompt)
        waiting = len(self.engine.scheduler.waiting)
        if waiting + len(forks) >= self.engine.scheduler.config.max_num_seqs:
            raise AdmitError(f"busy: {waiting} requests waiting", 429)
        try:
            self.engine.add_request(request_id, prompt, params)
        except RequestError as err:
            raise AdmitError(str(err), 400) from None
        for fork, fork_params in forks.items():  # same prompt, unused ids: cannot be refused
            self.engine.add_request(fork, prompt, fork_params, after=request_id)

    def _check_new(
        self, request_ids: list[str], prompt: list[int], params: list[SamplingParams] = ()
    ) -> None:
        for request_id in request_ids:
            if request_id in self._by_request or request_id in self.engine.scheduler.requests:
                raise AdmitError(f"request id {request_id!r} is already in use", 400)
        if len(set(request_ids)) < len(request_ids):
            raise AdmitError("a fork repeats a request id", 400)
        try:
            self.engine.scheduler.check_prompt(prompt)
            for p in params:  # a structured one's grammar compiles now, or it is refused
                self.engine.prepare(p)
        except RequestError as err:
            raise AdmitError(str(err), 400) from None

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is; its blocks return to the pool."""
        transfer_id = self._by_request.get(request_id)
        if transfer_id is None:
            return self.engine.abort(request_id)
        pending = self._pending[transfer_id]
        if request_id != pending.request_id:  # a fork: the transfer goes on for the others
            del pending.forks[request_id], self._by_request[request_id]
            return True
        self.receiver.cancel(transfer_id)
        self._release(transfer_id)
        # Its forks lose the prompt they were to share: they fail over (another pair, alone).
        error = "the request this sequence was forked from was aborted"
        self._outbox += [_error_output(pending, f, error, FailedTransfer) for f in pending.forks]
        return True

    def fail_transfers_from(self, prefill_id: str) -> int:
        """Fail (and free) every pending transfer from `prefill_id`, which is dead; returns how
        many. Their error outputs come out of the next `step()`."""
        doomed = [t for t, p in self._pending.items() if p.prefill_id == prefill_id]
        for transfer_id in doomed:
            self.receiver.cancel(transfer_id)
            self._outbox += self._fail(transfer_id, f"prefill worker {prefill_id} died")
        return len(doomed)

    def has_work(self) -> bool:
        return bool(self._pending or self._outbox) or self.engine.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Adopt finished transfers, expire late ones, then run one decode iteration."""
        outputs, self._outbox = self._outbox, []
        for result in self.receiver.poll_completed(0.0):
            outputs += self._adopt(result)
        for transfer_id in self.receiver.expire():
            outputs += self._fail(transfer_id, "KV transfer deadline passed")
        return outputs + self.engine.step()

    def _adopt(self, result: TransferResult) -> list[RequestOutput]:
        pending = self._pending.get(result.transfer_id)
        if pending is None:  # aborted in the meantime
            return []
        if not result.ok:
            return self._fail(result.transfer_id, f"KV transfer failed: {result.error}")
        self._release(result.transfer_id, keep_blocks=True)
        try:
            self.engine.scheduler.add_prefilled(
                pending.request_id,
                pending.prompt,
                result.first_token,
                pending.block_ids,
                pending.params,
                num_cached_tokens=len(pending.cached_blocks) * self.pool.block_size,
                first_logprob=result.first_logprob,
            )
        except RequestError as err:
            self.pool.free(pending.block_ids)
            return [
                _error_output(pending, rid, str(err))
                for rid in (pending.request_id, *pending.forks)
            ]
        for fork, params in pending.forks.items():  # prompt computed: they queue at once
            self.engine.add_request(fork, pending.prompt, params, after=pending.request_id)
        return []  # the engine reports the first tokens in its next steps (below)

    def _fail(self, transfer_id: str, error: str) -> list[RequestOutput]:
        """Outputs for a pending request (and its forks) whose KV will never come: the
        gateway places them again (503)."""
        pending = self._release(transfer_id)
        if pending is None:
            return []
        log.warning("transfer_failed", request_id=pending.request_id, error=error)
        ids = (pending.request_id, *pending.forks)
        return [_error_output(pending, rid, error, FailedTransfer) for rid in ids]

    def _release(self, transfer_id: str, *, keep_blocks: bool = False) -> _Pending | None:
        pending = self._pending.pop(transfer_id, None)
        if pending is None:
            return None
        for rid in (pending.request_id, *pending.forks):
            self._by_request.pop(rid, None)
        if not keep_blocks:
            self.pool.free(pending.block_ids)
        return pending


def _error_output(
    pending: _Pending, request_id: str, error: str, cls=RequestOutput
) -> RequestOutput:
    return cls(
        request_id=request_id,
        new_token_ids=[],
        finished=True,
        finish_reason="error",
        num_prompt_tokens=len(pending.prompt),
        num_output_tokens=0,
        error=error,
    )
