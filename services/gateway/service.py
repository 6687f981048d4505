"""`disagg gateway`: validates OpenAI requests, runs them through the backend, and answers over
HTTP (FastAPI, SSE) and over NATS (JSON request/reply on disagg.v1.*)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from disagg.services.common import (
    NatsConfig,
    add_nats_flags,
    connect_nats,
    flag,
    redact_url,
    run_service,
    subjects_for,
)
from disagg.services.gateway import openai as oai
from disagg.services.gateway.backend import Backend, BackendError, Timeouts
from disagg.services.gateway.detok import StreamDetokenizer
from disagg.services.gateway.metrics import GatewayMetrics
from disagg.services.gateway.nats_api import NatsApi
from disagg.shared.log import get_logger
from disagg.shared.messages import (
    MessageError,
    SchedulerStats,
    Subjects,
    check_id,
    decode,
    new_request_id,
)
from disagg.shared.model.args import ModelArgs
from disagg.shared.tokenizer import Tokenizer

log = get_logger("disagg.gateway")


def add_gateway_args(p: argparse.ArgumentParser) -> None:
    add_nats_flags(p)
    flag(p, "--model", type=Path, required=True, help="model folder (tokenizer, chat template)")
    flag(p, "--served-model-name", default=None, help="name clients use (default: folder name)")
    flag(p, "--host", default="127.0.0.1")
    flag(p, "--port", type=int, default=8000)
    flag(p, "--id", default=None, help="gateway id (default: random)")
    flag(p, "--max-model-len", type=int, default=None)
    flag(p, "--max-concurrent-requests", type=int, default=256, help="beyond: 429")
    flag(p, "--max-body-bytes", type=int, default=4 << 20)
    flag(p, "--place-timeout-s", type=float, default=Timeouts.place_s,
         help="keep it above the schedulers' --max-hold-s")  # fmt: skip
    flag(p, "--admit-timeout-s", type=float, default=10.0)
    flag(p, "--job-timeout-s", type=float, default=10.0, help="prefill worker accepting a job")
    flag(p, "--first-token-timeout-s", type=float, default=120.0)
    flag(p, "--inter-token-timeout-s", type=float, default=60.0)
    flag(p, "--resync-timeout-s", type=float, default=5.0, help="stream silence after a NATS "
         "reconnection that means chunks were lost")  # fmt: skip
    flag(p, "--migration-limit", type=int, default=3, help="moves of one request to new workers")
    flag(p, "--drain-timeout-s", type=float, default=30.0, help="SIGTERM: finish requests within")
    flag(p, "--api-key", default=None, help="required Bearer key(s), comma separated "
         "(better: DISAGG_API_KEY)")  # fmt: skip


@dataclass
class Finished:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict[str, Any]


class Slot:
    """One admitted request's place under --max-concurrent-requests; `release` is idempotent
    (whoever ends the request calls it)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self.released = False
        gateway.running += 1
        gateway.metrics.set_num_requests(gateway.running, 0)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._gateway.running -= 1
            self._gateway.metrics.set_num_requests(self._gateway.running, 0)


class Gateway:
    """One request end to end: parse, admit, generate, detokenize, assemble OpenAI bodies."""

    def __init__(
        self,
        backend: Backend,
        ctx: oai.ParseContext,
        metrics: GatewayMetrics,
        eos_ids: frozenset[int],
        max_concurrent: int,
    ) -> None:
        self.backend, self.ctx, self.metrics = backend, ctx, metrics
        self.eos_ids = eos_ids
        self.max_concurrent = max_concurrent
        self.running = 0
        self.draining = False
        self.created = int(time.time())

    def parse(self, kind: str, body: Any) -> oai.GenerationRequest:
        return (
            oai.parse_completion(body, self.ctx)
            if kind == "completion"
            else oai.parse_chat(body, self.ctx)
        )

    def admit(self) -> Slot:
        """Take a slot; 429 beyond the bound, 503 while draining or with no worker of a role."""
        if self.draining:
            raise oai.service_unavailable("the gateway is shutting down", 1)
        if self.running >= self.max_concurrent:
            self.metrics.observe_rejected("queue_full")
            raise oai.queue_full(retry_after_s=1)
        if not self.backend.can_serve():
            self.metrics.observe_rejected("no_worker")
            raise oai.service_unavailable("no worker can serve this request right now", 1)
        return Slot(self)

    async def chunks(self, req: oai.GenerationRequest, slot: Slot) -> AsyncIterator[dict[str, Any]]:
        """The OpenAI chunk dicts of a streamed request (errors after the first become chunks)."""
        assembler = oai.StreamAssembler(req)
        events = self._events(req, slot)
        try:
            async for item in events:
                if isinstance(item, Finished):
                    for chunk in assembler.finish(
                        item.finish_reason, item.usage, item.text, item.token_ids
                    ):
                        yield chunk
                else:
                    for chunk in assembler.delta(*item):
                        yield chunk
        finally:
            await events.aclose()

    async def complete(self, req: oai.GenerationRequest, slot: Slot) -> dict[str, Any]:
        text, ids = [], []
        async for item in self._events(req, slot):
            if isinstance(item, Finished):
                build = oai.completion_response if req.kind == "completion" else oai.chat_response
                return build(
                    req,
                    "".join(text) + item.text,
                    item.finish_reason,
                    item.usage,
                    ids + item.token_ids,
                )
            text.append(item[0])
            ids.extend(item[1])
        raise oai.internal_error("the stream ended without a finish")

    async def _events(
        self, req: oai.GenerationRequest, slot: Slot
    ) -> AsyncIterator[tuple[str, list[int]] | Finished]:
        """(text, ids) deltas, then one Finished; BackendError -> APIError. Releases `slot`."""
        start = last = time.monotonic()
        detok = StreamDetokenizer(self.ctx.tokenizer, req.stop, req.prompt_token_ids)
        ids: list[int] = []
        reason, cached, served = "error", 0, False
        try:
            async for event in self.backend.generate(
                req.request_id, req.prompt_token_ids, req.params
            ):
                # After a migration a worker may have cached generated tokens too: cap.
                cached, served = min(req.prompt_len, max(cached, event.num_cached_tokens)), True
                now = time.monotonic()
                self._observe_tokens(len(ids), len(event.token_ids), now - start, now - last)
                last = now
                final_stop = self._ends_on_stop_token(req, event)
                delta = detok.push(event.token_ids, final_token_is_stop=final_stop)
                ids += delta.token_ids
                if delta.stopped or event.finish_reason is not None:
                    reason = "stop" if delta.stopped else event.finish_reason
                    tail = detok.flush()
                    usage = oai.usage(req.prompt_len, len(ids), cached)
                    yield Finished(
                        delta.text + tail.text, delta.token_ids + tail.token_ids, reason, usage
                    )
                    return
                if delta.text or delta.token_ids:
                    yield delta.text, delta.token_ids
        except BackendError as err:
            raise _api_error(err) from None
        finally:
            slot.release()
            if served:
                self.metrics.observe_prefix_cache(req.prompt_len, cached)
            self.metrics.observe_request_finished(
                prompt_tokens=req.prompt_len,
                generation_tokens=len(ids),
                e2e_s=time.monotonic() - start,
                finished_reason=reason,
            )

    def _observe_tokens(self, before: int, new: int, since_start: float, gap: float) -> None:
        if before == 0 and new:
            self.metrics.observe_first_token(since_start)
        elif new:
            for _ in range(new):
                self.metrics.observe_inter_token(gap / new)

    def _ends_on_stop_token(self, req: oai.GenerationRequest, event) -> bool:
        if event.finish_reason != "stop" or not event.token_ids:
            return False
        last = event.token_ids[-1]
        eos = last in self.eos_ids and not req.params.ignore_eos
        return eos or last in req.params.stop_token_ids

    def models(self) -> dict[str, Any]:
        return oai.models_response(
            self.ctx.served_models, self.created, max_model_len=self.ctx.max_model_len
        )


def _api_error(err: BackendError) -> oai.APIError:
    if err.status == 429:
        return oai.queue_full(retry_after_s=1)
    if err.status == 503:
        return oai.service_unavailable(err.message, 1)
    if err.status == 504:
        return oai.gateway_timeout(err.message)
    if 400 <= err.status < 500:
        return oai.invalid_request(err.message)
    return oai.internal_error(err.message)


def build_context(args: argparse.Namespace) -> tuple[oai.ParseContext, frozenset[int]]:
    tokenizer = Tokenizer(args.model)
    model_args = ModelArgs.from_folder(args.model)
    name = args.served_model_name or Path(args.model).resolve().name
    max_len = min(args.max_model_len or model_args.max_model_len, model_args.max_model_len)
    ctx = oai.ParseContext(
        served_models=(name,),
        tokenizer=tokenizer,
        max_model_len=max_len,
        vocab_size=min(tokenizer.vocab_size, model_args.vocab_size),
    )
    return ctx, frozenset(model_args.eos_token_ids)


def api_keys(spec: str | None) -> list[str]:
    """`--api-key a,b` -> ["a", "b"]."""
    return [k.strip() for k in (spec or "").split(",") if k.strip()]


def timeouts_of(args: argparse.Namespace) -> Timeouts:
    return Timeouts(
        place_s=args.place_timeout_s,
        admit_s=args.admit_timeout_s,
        job_s=args.job_timeout_s,
        first_token_s=args.first_token_timeout_s,
        inter_token_s=args.inter_token_timeout_s,
        resync_s=args.resync_timeout_s,
    )


async def run_gateway(args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Serve until `stop`; then refuse new requests, let in-flight ones finish within
    --drain-timeout-s (cancelling the rest, which aborts them on the workers) and exit."""
    gateway_id = check_id("--id", args.id) if args.id else "gw-" + new_request_id()[:10]
    ctx, eos_ids = build_context(args)
    backend: Backend | None = None

    async def resync() -> None:
        if backend is not None:
            await backend.resync()

    nc = await connect_nats(NatsConfig.from_args(args), gateway_id, on_reconnect=resync)
    subjects = subjects_for(args)
    backend = Backend(
        nc,
        subjects,
        gateway_id,
        timeouts=timeouts_of(args),
        migration_limit=args.migration_limit,
        missed_heartbeats=args.missed_heartbeats,
    )
    metrics = GatewayMetrics()
    _wire_metrics(backend, metrics)
    await _watch_schedulers(nc, subjects, backend, metrics)
    await backend.start()
    gateway = Gateway(backend, ctx, metrics, eos_ids, args.max_concurrent_requests)
    await _serve(args, nc, gateway, subjects, stop)
    await nc.drain()


def _wire_metrics(backend: Backend, metrics: GatewayMetrics) -> None:
    silent_s = backend.peers.table.timeout_s

    def on_heartbeat(r) -> None:
        metrics.set_worker_blocks(r.worker_id, r.role, r.free_blocks, r.total_blocks)
        metrics.forget_silent_schedulers(time.monotonic(), silent_s)  # even if all are gone

    backend.on_heartbeat = on_heartbeat
    backend.on_transfer = lambda r: metrics.observe_kv_transfer(
        r.payload_bytes, r.seconds, r.exposed_seconds
    )
    backend.on_worker_dead = metrics.forget_worker
    backend.on_migration = lambda _reason: metrics.observe_migration()


async def _watch_schedulers(
    nc, subjects: Subjects, backend: Backend, metrics: GatewayMetrics
) -> None:
    """Turn the schedulers' SchedulerStats into metrics. Warn once per scheduler that may hold
    a placement as long as this gateway waits for it: the gateway would give up first (a 504
    instead of the 429 the scheduler answers after --max-hold-s)."""
    silent_s, place_s = backend.peers.table.timeout_s, backend.timeouts.place_s
    warned: set[str] = set()

    async def on_stats(msg) -> None:
        try:
            stats = decode(SchedulerStats, msg.data)
        except MessageError as err:
            log.warning("bad_scheduler_stats", error=str(err))
            return
        now = time.monotonic()
        metrics.observe_scheduler_stats(stats, now)
        metrics.forget_silent_schedulers(now, silent_s)
        if stats.max_hold_s >= place_s and stats.scheduler_id not in warned:
            warned.add(stats.scheduler_id)
            log.warning("place_timeout_too_short", scheduler_id=stats.scheduler_id,
                        max_hold_s=stats.max_hold_s, place_timeout_s=place_s)  # fmt: skip

    await nc.subscribe(subjects.scheduler_stats, cb=on_stats)


async def _serve(args, nc, gateway: Gateway, subjects, stop: asyncio.Event) -> None:
    from disagg.services.gateway.app import create_app

    keys, limit = api_keys(args.api_key), args.max_body_bytes
    app = create_app(gateway, gateway.metrics, api_keys=keys, max_body_bytes=limit)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=max(1, round(args.drain_timeout_s)),
    )
    server, api = _Server(config), NatsApi(nc, gateway, subjects)
    backend_done, api_done = asyncio.Event(), asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(gateway.backend.run(backend_done))
        api_serving = tasks.create_task(api.serve(api_done, args.drain_timeout_s))
        serving = tasks.create_task(server.serve())
        _log_ready(args, gateway)
        await stop.wait()
        log.info("draining", running=gateway.running, timeout_s=args.drain_timeout_s)
        gateway.draining, server.should_exit = True, True
        api_done.set()
        await asyncio.gather(serving, api_serving)
        backend_done.set()
    log.info("drained", running=gateway.running)


def _log_ready(args: argparse.Namespace, gateway: Gateway) -> None:
    log.info(
        "gateway_ready",
        gateway_id=gateway.backend.gateway_id,
        url=f"http://{args.host}:{args.port}/v1",
        model=gateway.ctx.served_models[0],
        nats=redact_url(args.nats),
        api_keys=len(api_keys(args.api_key)),
    )


class _Server(uvicorn.Server):
    """Uvicorn without its own signal handlers: the service's stop event owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def main(args: argparse.Namespace) -> int:
    return run_service(args, lambda stop: run_gateway(args, stop))
