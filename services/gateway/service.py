"""`disagg gateway`: validates OpenAI requests, runs them through the backend, and answers over
HTTP (FastAPI, SSE) and over NATS (JSON request/reply on disagg.v1.*)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import uvicorn

from disagg.services.gateway.backend import Backend
from disagg.services.gateway.config import GatewayConfig
from disagg.services.gateway.core import Gateway
from disagg.services.gateway.metrics import GatewayMetrics
from disagg.services.gateway.nats_api import NatsApi
from disagg.services.gateway.openai.request import ParseContext
from disagg.services.gateway.openai.tools import parser_for
from disagg.shared.cluster import HEARTBEAT_INTERVAL_S
from disagg.shared.log import get_logger
from disagg.shared.model.args import ModelArgs
from disagg.shared.protocol.codec import decode, encode
from disagg.shared.protocol.messages import GatewayHeartbeat, SchedulerStats
from disagg.shared.protocol.subjects import Subjects
from disagg.shared.protocol.types import MessageError, new_request_id
from disagg.shared.service import connect_nats, publish, run_service, sleep_unless
from disagg.shared.tokenizer import Tokenizer

log = get_logger("disagg.gateway")


def build_context(cfg: GatewayConfig) -> tuple[ParseContext, frozenset[int]]:
    tokenizer = Tokenizer(cfg.model)
    model_args = ModelArgs.from_folder(cfg.model)
    max_len = min(cfg.max_model_len or model_args.max_model_len, model_args.max_model_len)
    ctx = ParseContext(
        served_models=cfg.served_models,
        tokenizer=tokenizer,
        max_model_len=max_len,
        vocab_size=min(tokenizer.vocab_size, model_args.vocab_size),
        max_stop_strings=cfg.max_stop_strings,
        max_choices=cfg.max_choices,
        tool_parser=parser_for(cfg.tool_call_parser, tokenizer.chat_template),
    )
    return ctx, frozenset(model_args.eos_token_ids)


async def run_gateway(cfg: GatewayConfig, stop: asyncio.Event) -> None:
    """Serve until `stop`; then refuse new requests, let in-flight ones finish within
    --drain-timeout-s (cancelling the rest, which aborts them on the workers) and exit."""
    gateway_id = cfg.id or "gw-" + new_request_id()[:10]
    ctx, eos_ids = build_context(cfg)
    backend: Backend | None = None

    async def resync() -> None:
        if backend is not None:
            await backend.resync()

    nc = await connect_nats(cfg.service.nats, gateway_id, on_reconnect=resync)
    subjects = cfg.service.subjects
    backend = Backend(
        nc,
        subjects,
        gateway_id,
        timeouts=cfg.timeouts,
        migration_limit=cfg.migration_limit,
        missed_heartbeats=cfg.service.missed_heartbeats,
    )
    metrics = GatewayMetrics()
    _wire_metrics(backend, metrics)
    await _watch_schedulers(nc, subjects, backend, metrics)
    await backend.start()
    gateway = Gateway(backend, ctx, metrics, eos_ids, cfg.max_concurrent_requests)
    gateway.expected_workers = cfg.expected_workers()
    await _serve(cfg, nc, gateway, subjects, stop)
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


async def _serve(cfg: GatewayConfig, nc, gateway: Gateway, subjects, stop: asyncio.Event) -> None:
    from disagg.services.gateway.app import create_app

    app = create_app(
        gateway, gateway.metrics, api_keys=cfg.api_key, max_body_bytes=cfg.max_body_bytes
    )
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=max(1, round(cfg.drain_timeout_s)),
    )
    server, api = _Server(config), NatsApi(nc, gateway, subjects, cfg.nats_probe_s)
    backend_done, api_done = asyncio.Event(), asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(gateway.backend.run(backend_done))
        tasks.create_task(_heartbeats(nc, subjects, gateway, backend_done))
        api_serving = tasks.create_task(api.serve(api_done, cfg.drain_timeout_s))
        serving = tasks.create_task(server.serve())
        _log_ready(cfg, gateway)
        await stop.wait()
        log.info("draining", running=gateway.running, timeout_s=cfg.drain_timeout_s)
        gateway.draining, server.should_exit = True, True
        api_done.set()
        await asyncio.gather(serving, api_serving)
        backend_done.set()
    log.info("drained", running=gateway.running)


async def _heartbeats(nc, subjects: Subjects, gateway: Gateway, until: asyncio.Event) -> None:
    """This gateway's lease on its requests: workers abort those of a silent gateway."""
    while not until.is_set():
        if nc.is_connected:
            beat = GatewayHeartbeat(
                gateway_id=gateway.backend.gateway_id, running=gateway.running, sent_at=time.time()
            )
            await publish(nc, subjects.gateway_heartbeat, encode(beat))
        await sleep_unless(until, HEARTBEAT_INTERVAL_S)


def _log_ready(cfg: GatewayConfig, gateway: Gateway) -> None:
    log.info(
        "gateway_ready",
        gateway_id=gateway.backend.gateway_id,
        url=f"http://{cfg.host}:{cfg.port}/v1",
        model=gateway.ctx.served_models[0],
        nats=cfg.service.nats.display,
        api_keys=len(cfg.api_key),
    )


class _Server(uvicorn.Server):
    """Uvicorn without its own signal handlers: the service's stop event owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def main(cfg: GatewayConfig) -> int:
    return run_service(cfg.service, lambda stop: run_gateway(cfg, stop))
