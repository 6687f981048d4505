"""One attempt's stream: its chunks from two publishers, reordered by token index and
de-duplicated, and what each failure signal means for the attempt. No I/O.

Tokens come on `disagg.stream.<gateway>.<attempt>` from two publishers (the first token from the
prefill worker, the rest from decode, which repeats the first), so chunks carry the index of their
first token.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from disagg.services.gateway.migration import RETRYABLE_STATUS, BackendError, WorkerLost
from disagg.shared.protocol.messages import StreamChunk
from disagg.shared.protocol.sampling import Logprob

STREAM_QUEUE = 4096  # chunks buffered per request; beyond, the client is too slow: it fails


@dataclass
class TokenEvent:
    """New tokens in order; `finish_reason` set on the last event."""

    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[Logprob] | None = None  # one per token, when the request asked
    prompt_logprobs: list[Logprob] | None = None  # on the first event, when asked


@dataclass(frozen=True)
class WorkerDied:
    worker_id: str


class Resync:
    """This gateway reconnected to NATS: chunks of the outage may be lost."""


@dataclass
class AttemptStream:
    """One attempt: who holds it, and its chunks reordered by token index."""

    holders: list[str] = field(default_factory=list)  # every worker that may hold state
    decode_id: str | None = None
    prefill_id: str | None = None
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=STREAM_QUEUE))
    overflowed: bool = False
    decoding: bool = False  # the decode worker has sent its first chunk
    decode_next: int = 0  # index the decode worker's next chunk must start at
    tokens: dict[int, int] = field(default_factory=dict)
    logprobs: dict[int, Logprob] = field(default_factory=dict)
    # Prompt logprobs still expected (tokens wait for them), and those received.
    expect_prompt: int | None = None
    prompt_logprobs: list[Logprob] = field(default_factory=list)
    next_index: int = 0
    final_len: int | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    def push(self, item: StreamChunk | WorkerDied | Resync) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True

    def absorb(self, chunk: StreamChunk) -> TokenEvent:
        """The tokens `chunk` makes ready; WorkerLost / BackendError for a failed attempt."""
        if chunk.error is not None:
            raise self._chunk_error(chunk)
        if chunk.worker_id == self.decode_id:
            self._check_contiguous(chunk)
        if (
            chunk.prompt_logprobs is not None
            and chunk.prompt_index == len(self.prompt_logprobs) + 1
        ):
            self.prompt_logprobs += chunk.prompt_logprobs
        for i, token in enumerate(chunk.token_ids):
            if chunk.index + i >= self.next_index:
                self.tokens[chunk.index + i] = token
                if chunk.logprobs is not None:
                    self.logprobs[chunk.index + i] = chunk.logprobs[i]
        if chunk.finish_reason is not None:
            self.final_len = chunk.index + len(chunk.token_ids)
            self.finish_reason = chunk.finish_reason
        self.num_prompt_tokens = max(self.num_prompt_tokens, chunk.num_prompt_tokens)
        # Prefill reports its own cache hits, decode the prefix it did not need shipped.
        self.num_cached_tokens = max(self.num_cached_tokens, chunk.num_cached_tokens)
        ready, logprobs = [], []
        waiting = self.expect_prompt is not None and len(self.prompt_logprobs) < self.expect_prompt
        while self.next_index in self.tokens and not waiting:
            ready.append(self.tokens.pop(self.next_index))
            if (logprob := self.logprobs.pop(self.next_index, None)) is not None:
                logprobs.append(logprob)
            self.next_index += 1
        done = self.final_len is not None and self.next_index >= self.final_len
        reason = self.finish_reason if done else None
        aligned = logprobs if ready and len(logprobs) == len(ready) else None
        prompt = None
        if ready and self.expect_prompt is not None:  # released with the first tokens
            prompt, self.expect_prompt = self.prompt_logprobs, None
        return TokenEvent(
            ready, reason, self.num_prompt_tokens, self.num_cached_tokens, aligned, prompt
        )

    def _check_contiguous(self, chunk: StreamChunk) -> None:
        # One publisher's messages arrive in order: a skipped index means lost chunks.
        if chunk.index != self.decode_next:
            lost = chunk.index - self.decode_next
            raise WorkerLost(f"{lost} tokens of the stream from {chunk.worker_id} were lost")
        self.decoding = True
        self.decode_next = chunk.index + len(chunk.token_ids)

    def _chunk_error(self, chunk: StreamChunk) -> WorkerLost | BackendError:
        err = BackendError(chunk.error.code, chunk.error.message, chunk.error.type)
        if err.status not in RETRYABLE_STATUS:
            return err
        # Decode reporting a failed transfer blames its sender (dead, slow or broken); any other
        # report blames its reporter.
        transfer = chunk.worker_id == self.decode_id and not self.decoding
        suspect = self.prefill_id if transfer else chunk.worker_id
        return WorkerLost(f"{chunk.worker_id}: {err.message}", [suspect])

    def lost_holder(self, dead: WorkerDied) -> WorkerLost | None:
        """WorkerLost when a worker this attempt depends on died; None when it no longer does."""
        depends = dead.worker_id == self.decode_id or (
            dead.worker_id == self.prefill_id and not self.decoding
        )
        if not depends:
            return None
        return WorkerLost(f"worker {dead.worker_id} died", [dead.worker_id], dead=True)

    def timed_out(self, timeout: float) -> WorkerLost:
        suspect = self.decode_id if self.decoding or not self.prefill_id else self.prefill_id
        return WorkerLost(f"no token for {timeout:g} s", [suspect])
