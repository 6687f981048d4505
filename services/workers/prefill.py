"""Prefill worker core: run prompts through the engine and ship each layer's KV as it is written.

No NATS here: a shell feeds `submit`/`abort` and calls `step()` in a loop. The engine runs the
prompt with `max_tokens=1`; its per-layer callback packs the layer's blocks into the transfer's
send buffer (one copy) and queues it for the KVSender thread, so layer i goes on the wire while
layer i+1 computes. The sampled token is the request's first token: it is returned at once (the
gateway streams it without waiting for the transfer) and rides in the transfer's done frame.

Block ownership: the prefill engine owns its own blocks, as for any request, and frees them when
the one-token request finishes — safe, because every layer was copied out by `send_layer` before
sampling. The decode worker's blocks are never touched here except through the KV frames.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from disagg.shared.engine.engine import Engine
from disagg.shared.engine.request import Request, RequestError
from disagg.shared.log import get_logger
from disagg.shared.protocol.descriptor import TransferDescriptor
from disagg.shared.protocol.kv_wire import TransferError
from disagg.shared.protocol.sampling import Logprob, SamplingParams
from disagg.shared.transfer.sender import SendHandle, TransferStats

log = get_logger("disagg.prefill")


class KVSink(Protocol):
    """Where this worker's KV goes: ``SenderCore`` (over ZeroMQ, or a loopback)."""

    def begin(
        self, desc: TransferDescriptor, local_block_ids: Sequence[int], kv_cache: torch.Tensor
    ) -> SendHandle: ...


class QueueFullError(RuntimeError):
    """More prefill work is queued than this worker accepts; the caller should retry elsewhere."""


@dataclass(frozen=True)
class PrefillJob:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    transfer: TransferDescriptor


@dataclass(frozen=True)
class PrefillResult:
    """The first token of a request, or why it has none."""

    request_id: str
    first_token: int | None
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens this worker found in its prefix cache
    logprob: Logprob | None = None  # of the first token, when the request asks
    prompt_logprobs: tuple[Logprob, ...] | None = None  # when the request asks


@dataclass(frozen=True)
class SentTransfer:
    """A transfer whose last frame left this worker (or failed to), with its timeline."""

    request_id: str
    stats: TransferStats
    error: str | None


class PrefillWorker:
    def __init__(self, engine: Engine, sender: KVSink, *, max_queued_tokens: int = 65536) -> None:
        self.engine = engine
        self.sender = sender
        self.max_queued_tokens = max_queued_tokens
        self._jobs: dict[str, PrefillJob] = {}
        self._handles: dict[str, SendHandle] = {}  # transfers begun, until their done frame left
        self._sent: deque[SentTransfer] = deque(maxlen=4096)  # finished, until poll_sent
        self._failed: dict[str, str] = {}  # request id -> why its transfer broke during compute
        engine.on_layer = self._ship_layer

    @property
    def queued_prefill_tokens(self) -> int:
        return self.engine.scheduler.num_queued_prefill_tokens

    def submit(self, job: PrefillJob) -> None:
        """Queue a prompt; raises QueueFullError or RequestError (never serveable)."""
        if job.request_id in self._jobs:
            raise RequestError(f"request id {job.request_id!r} is already in use")
        t = job.transfer
        if t.first_block + len(t.block_ids) != -(-len(job.prompt) // t.block_size):
            raise RequestError(
                f"the transfer's blocks {t.first_block}..{t.first_block + len(t.block_ids) - 1} "
                f"do not end with the prompt's last block ({len(job.prompt)} tokens)"
            )
        if self.queued_prefill_tokens + len(job.prompt) > self.max_queued_tokens:
            raise QueueFullError(f"{self.queued_prefill_tokens} prefill tokens already queued")
        # One token here; the decode worker generates the rest and judges every stop, the first
        # token's included. The sampling fields stay whole: min_tokens masks EOS here too.
        params = job.params.replace(max_tokens=1)
        self.engine.add_request(job.request_id, job.prompt, params)
        self._jobs[job.request_id] = job

    def abort(self, request_id: str) -> bool:
        """Drop a request and fail its transfer (decode then frees its reserved blocks)."""
        job = self._jobs.pop(request_id, None)
        if job is None:
            return False
        self.engine.abort(request_id)
        handle = self._handles.pop(request_id, None)
        if handle is not None:
            handle.fail("aborted")
        return True

    def has_work(self) -> bool:
        """Prompts to run, or transfers whose last frames have not left yet."""
        # Finished transfers count until step() retires them, so a loop that runs step() while
        # has_work() also reports every transfer's end.
        return self.engine.has_unfinished() or bool(self._handles)

    def step(self) -> list[PrefillResult]:
        """One engine iteration; returns the first tokens sampled (and failures)."""
        results = []
        for out in self.engine.step():
            job = self._jobs.pop(out.request_id, None)
            if job is None:  # aborted by us: nothing to report
                continue
            logprob = out.logprobs[0] if out.logprobs else None
            result = self._complete(job, out.new_token_ids, out.finish_reason, logprob)
            results.append(
                replace(
                    result,
                    num_cached_tokens=out.num_cached_tokens,
                    prompt_logprobs=out.prompt_logprobs if result.error is None else None,
                )
            )
        self._retire_finished()
        return results

    def _complete(
        self, job: PrefillJob, tokens: list[int], reason: str | None, logprob: Logprob | None
    ) -> PrefillResult:
        error = self._failed.pop(job.request_id, None)
        handle = self._handles.get(job.request_id)
        if error is None and (not tokens or handle is None):
            error = f"prefill ended without a token ({reason})"
        if error is not None:
            self._drop_handle(job.request_id, error)
            return PrefillResult(job.request_id, None, error)
        try:
            handle.finish(tokens[0], logprob)
        except TransferError as err:
            self._drop_handle(job.request_id, str(err))
            return PrefillResult(job.request_id, None, str(err))
        return PrefillResult(job.request_id, tokens[0], logprob=logprob)

    def _drop_handle(self, request_id: str, error: str) -> None:
        handle = self._handles.pop(request_id, None)
        if handle is not None:
            handle.fail(error)

    def _ship_layer(self, layer: int, completing: list[Request]) -> None:
        for req in completing:
            if req.request_id in self._failed:
                continue
            try:
                self._handle_for(req).send_layer(layer)
            except TransferError as err:
                # Compute goes on for the batch; this request reports the error when it samples.
                self._failed[req.request_id] = str(err)

    def _handle_for(self, req: Request) -> SendHandle:
        handle = self._handles.get(req.request_id)
        if handle is None:
            job = self._jobs[req.request_id]
            # Blocks before `first_block` are in the decode worker's prefix cache: not shipped.
            blocks = req.block_table[job.transfer.first_block :]
            handle = self.sender.begin(job.transfer, blocks, self.engine.kv_cache.data)
            self._handles[req.request_id] = handle
        return handle

    def poll_sent(self) -> list[SentTransfer]:
        """Transfers whose done frame has left (or that failed) since the last call, for metrics;
        the newest 4096 are kept for a caller that polls late or never."""
        self._retire_finished()
        sent, self._sent = list(self._sent), deque(maxlen=self._sent.maxlen)
        return sent

    def _retire_finished(self) -> None:
        for request_id, handle in list(self._handles.items()):
            if handle.finished:
                del self._handles[request_id]
                self._sent.append(SentTransfer(request_id, handle.stats, handle.error))
