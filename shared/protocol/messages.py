"""Every internal NATS message of disagg, one frozen struct each, with its bounds declared.

Encode and decode them with ``disagg.shared.protocol.codec``. Nested values travel as maps:
``SamplingParams``, ``TransferDescriptor`` and ``ErrorBody``. The public API (``disagg.v1.*``)
is JSON and lives in the gateway; only its subject names are in ``subjects``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from disagg.shared.protocol.codec import ErrorBody, Message
from disagg.shared.protocol.descriptor import Fingerprint, TransferDescriptor
from disagg.shared.protocol.sampling import Logprob, SamplingParams
from disagg.shared.protocol.types import (
    MAX_EXCLUDED,
    MAX_TOKENS,
    BlockSize,
    Count,
    FinishReason,
    Hashes,
    Id,
    Prompt,
    Role,
    Seconds,
    Text,
    TokenIds,
    WireDtype,
)


class Heartbeat(Message):
    """A worker's state, published every second on ``Subjects.heartbeat``; the cluster table
    (``disagg.shared.cluster``) keeps the latest one of every worker.

    ``zmq_address`` is where the worker's KV receiver listens ("" when it has none).
    ``prefix_hashes`` is a bounded summary of cached block hashes and may be empty.
    ``prefill_tokens`` (prompt tokens computed), ``sampled_tokens`` and ``busy_s`` (seconds
    spent in compute steps) are cumulative since the worker started: rates come from deltas.
    """

    worker_id: Id
    role: Role
    zmq_address: Annotated[str, Meta(max_length=256)]
    model: Annotated[str, Meta(min_length=1, max_length=1024)]
    fingerprint: Fingerprint
    block_size: BlockSize
    total_blocks: Count
    free_blocks: Count
    running: Count
    waiting: Count
    queued_prefill_tokens: Count
    max_model_len: Annotated[int, Meta(ge=1, le=MAX_TOKENS)]
    prefix_hashes: Hashes = []
    sent_at: Seconds = 0.0  # unix time
    draining: bool = False
    # Set while draining to switch role (a RoleRequest): the role it comes back as; new work
    # for that role can wait for it rather than fail.
    switching_to: Role | None = None
    prefill_tokens: Count = 0
    sampled_tokens: Count = 0
    busy_s: Seconds = 0.0

    def __post_init__(self) -> None:
        if self.free_blocks > self.total_blocks:
            raise ValueError(
                f"Heartbeat.free_blocks {self.free_blocks} > total_blocks {self.total_blocks}"
            )


class GatewayHeartbeat(Message):
    """A gateway is alive, published every second on ``Subjects.gateway_heartbeat``: its
    lease on the requests it placed. Workers abort a silent gateway's requests (nobody would
    read their tokens) and free their KV; ``running`` is how many it has in flight."""

    gateway_id: Id
    running: Count = 0
    sent_at: Seconds = 0.0  # unix time


class TransferReport(Message):
    """A prefill worker's account of one KV transfer, published on ``Subjects.transfer_stats``.

    Times are the sender's: ``seconds`` from the transfer's start to its done frame leaving,
    ``exposed_seconds`` the part of that after the prompt's compute ended (not hidden by it).
    """

    request_id: Id
    worker_id: Id
    payload_bytes: Count
    seconds: Seconds
    exposed_seconds: Seconds
    ok: bool


class SchedulerStats(Message):
    """A scheduler's rate matching, published every second on ``Subjects.scheduler_stats``.

    ``held`` placements wait for decode KV room now. ``holds`` (placements ever held),
    ``hold_timeouts`` (refused after ``max_hold_s``), ``hold_overflows`` (refused with the hold
    queue full) and ``hold_seconds`` (time spent held, summed) are cumulative since this
    scheduler started: several run in the queue group, so readers keep them per
    ``scheduler_id``. ``decode_kv_usage`` counts placements not yet in the heartbeats (1.0 with
    no decode worker). ``prefill_decode_ratio`` is the recommended number of prefill workers
    per decode worker, None until both phases were measured.
    """

    scheduler_id: Id
    held: Count
    holds: Count
    hold_timeouts: Count
    hold_overflows: Count
    hold_seconds: Seconds
    max_hold_s: Seconds
    decode_kv_usage: Annotated[float, Meta(ge=0.0, le=1.0)]
    prefill_bound: bool
    prefill_decode_ratio: Seconds | None = None


class PlannerDecision(Message):
    """The planner's desired worker counts by role, published every tick on
    ``Subjects.planner_decision``; ``action`` says what this tick changed ("hold": nothing)."""

    planner_id: Id
    prefill: Annotated[int, Meta(ge=0, le=4096)]
    decode: Annotated[int, Meta(ge=0, le=4096)]
    action: Annotated[str, Meta(pattern="^(hold|scale_up|scale_down|rebalance)$")]
    reason: Text
    sent_at: Seconds = 0.0  # unix time
    both: Annotated[int, Meta(ge=0, le=4096)] = 0  # aggregated workers


class PlaceRequest(Message):
    """Gateway -> scheduler: where should this request run? ``exclude``: workers to avoid.
    ``prefix_hashes`` are the prompt's chained block hashes at ``hash_block_size`` tokens per
    block; only workers with that block size can match them."""

    request_id: Id
    prompt_len: Annotated[int, Meta(ge=1, le=MAX_TOKENS)]
    prefix_hashes: Hashes
    exclude: Annotated[list[Id], Meta(max_length=MAX_EXCLUDED)]
    hash_block_size: BlockSize


class PlaceReply(Message):
    """Scheduler -> gateway. ``prefill_id`` None: the decode worker prefills locally."""

    request_id: Id
    decode_id: Id
    prefill_id: Id | None


MAX_FORKS = 63  # more sequences of one admitted prompt (n - 1)


class Fork(msgspec.Struct, frozen=True, kw_only=True):
    """One more sequence of an admitted prompt (n > 1): its own request id (and stream), its
    own sampling (a seed of its own); it runs on the prompt's blocks, shipped once."""

    request_id: Id
    sampling: SamplingParams


class AdmitRequest(Message):
    """Gateway -> decode worker: reserve blocks for a request (``prefill_id`` None: prefill
    locally). ``num_generated`` counts tokens already generated before a migration; they are
    the tail of ``prompt``. ``forks`` start on the prompt's blocks once its KV is here; the
    prefill worker never hears of them."""

    request_id: Id
    gateway_id: Id
    prompt: Prompt
    sampling: SamplingParams
    prefill_id: Id | None
    wire_dtype: WireDtype
    num_generated: Count = 0
    forks: Annotated[list[Fork], Meta(max_length=MAX_FORKS)] = []


class AdmitReply(Message):
    """Decode worker -> gateway: where prefill pushes the KV (None when prefilling locally)."""

    request_id: Id
    transfer: TransferDescriptor | None


class PrefillJob(Message):
    """Gateway -> prefill worker: compute ``prompt`` and push its KV per ``transfer``."""

    request_id: Id
    gateway_id: Id
    prompt: Prompt
    sampling: SamplingParams
    transfer: TransferDescriptor
    decode_id: Id


class JobReply(Message):
    """Prefill worker -> gateway: the job was queued (False: refused, place it elsewhere)."""

    request_id: Id
    accepted: bool


class RoleRequest(Message):
    """Anyone -> worker: drain and go on as ``role``, on the weights and KV cache already
    loaded (how a fixed core budget moves between the phases). ``drain_s`` bounds the drain
    (default: the worker's ``--drain-timeout-s``); what is still running then moves to other
    workers with the tokens it has (an autoscaler asks for a short drain)."""

    role: Role
    drain_s: Seconds | None = None


class RoleReply(Message):
    """Worker -> requester: ``switching`` False when it already had that role."""

    worker_id: Id
    role: Role
    switching: bool


class AbortRequest(Message):
    """Gateway -> worker: stop a request and free what it holds."""

    request_id: Id
    reason: Text


class AbortReply(Message):
    """Worker -> gateway: whether the worker knew the request."""

    request_id: Id
    found: bool


PROMPT_LOGPROBS_PER_CHUNK = 1024  # with 20 top logprobs each, ~300 KB: under NATS's 1 MB


class StreamChunk(Message):
    """Worker -> gateway on ``Subjects.stream``: output tokens from position ``index`` on.

    Chunks from prefill and decode may arrive out of order; the gateway reorders by ``index``.
    A chunk with ``finish_reason`` set is the request's last from that worker.
    """

    request_id: Id
    worker_id: Id
    index: Count
    token_ids: TokenIds
    finish_reason: FinishReason | None
    num_prompt_tokens: Count
    num_cached_tokens: Count
    error: ErrorBody | None = None
    logprobs: Annotated[tuple[Logprob, ...], Meta(max_length=MAX_TOKENS)] | None = None
    # Prompt logprobs (a request that asked), from prompt token ``prompt_index`` on, in chunks
    # of at most PROMPT_LOGPROBS_PER_CHUNK, before the chunk of token 0 (no token ids).
    prompt_logprobs: Annotated[tuple[Logprob, ...], Meta(max_length=MAX_TOKENS)] | None = None
    prompt_index: Annotated[int, Meta(ge=1, le=MAX_TOKENS)] = 1

    def __post_init__(self) -> None:
        if self.logprobs is not None and len(self.logprobs) != len(self.token_ids):
            raise ValueError("logprobs: one entry per token id")


def prompt_logprob_chunks(
    request_id: str, worker_id: str, logprobs: tuple[Logprob, ...]
) -> list[StreamChunk]:
    """A request's prompt logprobs as StreamChunks (sent before its first token)."""
    step = PROMPT_LOGPROBS_PER_CHUNK
    return [
        StreamChunk(
            request_id=request_id,
            worker_id=worker_id,
            index=0,
            token_ids=[],
            finish_reason=None,
            num_prompt_tokens=0,
            num_cached_tokens=0,
            prompt_logprobs=logprobs[start : start + step],
            prompt_index=1 + start,
        )  # fmt: skip
        for start in range(0, len(logprobs), step)
    ]
