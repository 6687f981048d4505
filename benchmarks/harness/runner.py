"""Send a trace to an OpenAI-compatible server: warm-up, then the requests at their arrival
times (or as fast as `max_concurrency` allows), each recorded as a RequestRecord.

Every wait is bounded: no request is started after `duration_s`, and each one is cut off after
`request_timeout_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from disagg.benchmarks.harness.client import (
    ENDPOINTS,
    Detokenize,
    build_payload,
    first_model,
    send_request,
)
from disagg.benchmarks.harness.metrics import RequestRecord
from disagg.benchmarks.harness.workload import TraceRequest


@dataclass(frozen=True)
class RunConfig:
    """Where and how to send a trace."""

    base_url: str
    endpoint: str = "completions"
    model: str | None = None  # None: the server's first model
    max_concurrency: int | None = None
    duration_s: float | None = None
    request_timeout_s: float = 600.0
    api_key: str | None = None
    extra_body: tuple[tuple[str, Any], ...] = ()  # fields added to every request body

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {tuple(ENDPOINTS)}, got {self.endpoint!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + ENDPOINTS[self.endpoint]


@dataclass
class RunResult:
    """The records of one run (in trace order, only requests that were sent) and its model."""

    records: list[RequestRecord]
    model: str
    started_at: float
    other_cpu_share: float | None = None  # set by callers that know which processes are theirs
    server_stats: dict[str, float] = field(default_factory=dict)  # from the server's /metrics


async def run_trace(
    cfg: RunConfig,
    trace: Sequence[TraceRequest],
    *,
    warmup: Sequence[TraceRequest] = (),
    detokenize: Detokenize | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> RunResult:
    """Warm up (all at once; an error there aborts), then send `trace` and record it."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.max_concurrency or len(trace) + len(warmup) + 1)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model = cfg.model or await first_model(client, cfg.base_url)
        send = _Sender(client, cfg, model, detokenize)
        await _warm_up(send, warmup)
        started = time.perf_counter()
        records = await _send_all(send, cfg, trace, started, on_done)
    return RunResult(records, model, started)


class _Sender:
    """Sends one TraceRequest and returns its record."""

    def __init__(self, client, cfg: RunConfig, model: str, detokenize: Detokenize | None):
        self.client, self.cfg, self.model, self.detokenize = client, cfg, model, detokenize

    async def __call__(self, req: TraceRequest) -> RequestRecord:
        body = build_payload(req, self.model, self.cfg.endpoint, self.detokenize)
        body |= dict(self.cfg.extra_body)
        rec = RequestRecord(kind=req.kind, sent_at=0.0, prompt_len=req.prompt_len)
        return await send_request(self.client, self.cfg.url, body, rec, self.cfg.request_timeout_s)


async def _warm_up(send: _Sender, warmup: Sequence[TraceRequest]) -> None:
    records = await asyncio.gather(*(send(req) for req in warmup))
    failed = [r.error for r in records if not r.success]
    if failed:
        raise RuntimeError(f"{len(failed)}/{len(records)} warm-up requests failed: {failed[0]}")


async def _send_all(
    send: _Sender,
    cfg: RunConfig,
    trace: Sequence[TraceRequest],
    started: float,
    on_done: Callable[[RequestRecord], None] | None,
) -> list[RequestRecord]:
    slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    tasks: list[asyncio.Task] = []

    async def one(req: TraceRequest) -> RequestRecord:
        try:
            rec = await send(req)
        finally:
            if slots is not None:
                slots.release()
        if on_done is not None:
            on_done(rec)
        return rec

    async with asyncio.TaskGroup() as group:
        for req in trace:
            if not await _wait_turn(req, started, cfg.duration_s, slots):
                break
            tasks.append(group.create_task(one(req)))
    return [t.result() for t in tasks]


async def _wait_turn(
    req: TraceRequest, started: float, duration_s: float | None, slots: asyncio.Semaphore | None
) -> bool:
    """Sleep until `req` arrives and a slot is free; False once the run's time is up."""
    delay = started + req.arrival_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    if slots is not None:
        await slots.acquire()
    if duration_s is not None and time.perf_counter() - started >= duration_s:
        if slots is not None:
            slots.release()
        return False
    return True
