"""The gateway's Prometheus metrics, in a registry of its own (no global state: several
gateways in one process, as in tests, do not clash).

Names follow vLLM's `vllm:` metrics with a `disagg:` prefix, plus the KV-transfer ones that only
a disaggregated system has.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from disagg.shared.protocol.messages import SchedulerStats

# Seconds; CPU serving spans milliseconds (a decode step) to tens of seconds (a long prefill).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
TTFT_BUCKETS += (7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)
ITL_BUCKETS += (0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
TRANSFER_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)
TRANSFER_SECONDS_BUCKETS += (1.0, 2.5, 5.0, 10.0)
# 4 KiB .. 4 GiB in powers of 4.
TRANSFER_BYTES_BUCKETS = tuple(float(4096 * 4**k) for k in range(11))
HOLD_REFUSALS = ("timeout", "full")


@dataclass(frozen=True)
class _SchedulerSeen:
    """One scheduler's last stats: when they came, and its cumulative counts then."""

    at: float
    holds: int
    hold_timeouts: int
    hold_overflows: int
    hold_seconds: float


class GatewayMetrics:
    """Every metric the gateway exports, registered in `self.registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._worker_roles: dict[str, set[str]] = {}
        self._schedulers: dict[str, _SchedulerSeen] = {}
        self._latency_histograms()
        self._transfer_histograms()
        self._gauges()
        self._counters()
        self._scheduler_metrics()

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, doc, buckets=buckets, registry=self.registry)

    def _latency_histograms(self) -> None:
        self.ttft = self._histogram(
            "disagg:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS
        )
        self.itl = self._histogram(
            "disagg:inter_token_latency_seconds", "Time between streamed tokens.", ITL_BUCKETS
        )
        self.e2e = self._histogram(
            "disagg:e2e_request_latency_seconds", "Request latency, end to end.", E2E_BUCKETS
        )

    def _transfer_histograms(self) -> None:
        self.kv_bytes = self._histogram(
            "disagg:kv_transfer_bytes", "KV bytes moved per request.", TRANSFER_BYTES_BUCKETS
        )
        self.kv_seconds = self._histogram(
            "disagg:kv_transfer_seconds", "KV transfer duration.", TRANSFER_SECONDS_BUCKETS
        )
        self.kv_exposed = self._histogram(
            "disagg:kv_transfer_exposed_seconds",
            "KV transfer time not hidden behind prefill compute.",
            TRANSFER_SECONDS_BUCKETS,
        )

    def _gauges(self) -> None:
        reg = self.registry
        self.running = Gauge("disagg:num_requests_running", "Requests generating.", registry=reg)
        self.waiting = Gauge(
            "disagg:num_requests_waiting", "Requests not placed yet.", registry=reg
        )
        labels = ("worker", "role")
        self.blocks_free = Gauge(
            "disagg:kv_blocks_free", "Free KV blocks per worker.", labels, registry=reg
        )
        self.blocks_total = Gauge(
            "disagg:kv_blocks_total", "KV blocks per worker.", labels, registry=reg
        )

    def _counters(self) -> None:
        # prometheus_client appends `_total` to a counter's samples: these names expose
        # exactly `disagg:prompt_tokens_total` and so on.
        reg = self.registry
        self.prompt_tokens = Counter("disagg:prompt_tokens", "Prompt tokens.", registry=reg)
        self.generation_tokens = Counter(
            "disagg:generation_tokens", "Generated tokens.", registry=reg
        )
        self.request_success = Counter(
            "disagg:request_success", "Finished requests.", ("finished_reason",), registry=reg
        )
        self.prefix_queries = Counter(
            "disagg:prefix_cache_queries",
            "Prompt tokens looked up in a prefix cache.",
            registry=reg,
        )
        self.prefix_hits = Counter(
            "disagg:prefix_cache_hits", "Prompt tokens found in a prefix cache.", registry=reg
        )
        self.migrations = Counter(
            "disagg:request_migrations", "Requests moved to other workers.", registry=reg
        )
        self.rejected = Counter(
            "disagg:requests_rejected", "Requests refused at admission.", ("reason",), registry=reg
        )

    def _scheduler_metrics(self) -> None:
        """Rate matching, per scheduler (several may run): sum over `scheduler` for totals."""
        reg, by = self.registry, ("scheduler",)
        self.sched_held = Gauge(
            "disagg:scheduler_held_requests",
            "Placements waiting for decode KV room.",
            by,
            registry=reg,
        )
        self.sched_holds = Counter(
            "disagg:scheduler_holds", "Placements held for decode KV room.", by, registry=reg
        )
        self.sched_hold_refusals = Counter(
            "disagg:scheduler_hold_refusals",
            "Placements refused (429) after waiting --max-hold-s, or with the hold queue full.",
            ("scheduler", "reason"),
            registry=reg,
        )
        self.sched_hold_seconds = Counter(
            "disagg:scheduler_hold_seconds", "Seconds placements spent held.", by, registry=reg
        )
        self.decode_kv_usage = Gauge(
            "disagg:decode_kv_usage",
            "Decode KV usage (0-1) a scheduler sees, its placements in flight included.",
            by,
            registry=reg,
        )
        self.prefill_bound = Gauge(
            "disagg:prefill_bound",
            "1 while prefill queues grow and decode has room.",
            by,
            registry=reg,
        )
        self.prefill_decode_ratio = Gauge(
            "disagg:recommended_prefill_decode_ratio",
            "Prefill workers per decode worker the measured per-phase rates call for.",
            by,
            registry=reg,
        )

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its HTTP content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def observe_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def observe_inter_token(self, gap_s: float) -> None:
        """The gap between two consecutive token arrivals of a request (tokens of one decode
        step arrive together: one gap per step, as vLLM observes)."""
        self.itl.observe(gap_s)

    def observe_request_finished(
        self, *, prompt_tokens: int, generation_tokens: int, e2e_s: float, finished_reason: str
    ) -> None:
        """A request ended (any reason: stop, length, abort, error) after `e2e_s` seconds."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        self.request_success.labels(finished_reason=finished_reason).inc()
        self.e2e.observe(e2e_s)

    def observe_migration(self) -> None:
        """A request moved to other workers (a worker died, timed out or refused it)."""
        self.migrations.inc()

    def observe_rejected(self, reason: str) -> None:
        """A request refused before it started (`queue_full`: 429, `no_worker`: 503)."""
        self.rejected.labels(reason=reason).inc()

    def observe_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        """Prompt tokens looked up in a prefix cache, and how many of them were found."""
        self.prefix_queries.inc(queried_tokens)
        self.prefix_hits.inc(hit_tokens)

    def observe_kv_transfer(self, nbytes: int, seconds: float, exposed_s: float) -> None:
        """One request's KV hand-off: size, duration, and the part not overlapped by compute."""
        self.kv_bytes.observe(nbytes)
        self.kv_seconds.observe(seconds)
        self.kv_exposed.observe(exposed_s)

    def set_num_requests(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def set_worker_blocks(self, worker: str, role: str, free: int, total: int) -> None:
        """Latest block counts from a worker's heartbeat (a worker that switched role loses
        its series under the old one)."""
        for old in self._worker_roles.get(worker, set()) - {role}:
            self.blocks_free.remove(worker, old)
            self.blocks_total.remove(worker, old)
        self._worker_roles[worker] = {role}
        self.blocks_free.labels(worker=worker, role=role).set(free)
        self.blocks_total.labels(worker=worker, role=role).set(total)

    def forget_worker(self, worker: str) -> None:
        """Drop a dead worker's series so that dashboards stop showing stale capacity."""
        for role in self._worker_roles.pop(worker, set()):
            self.blocks_free.remove(worker, role)
            self.blocks_total.remove(worker, role)

    def observe_scheduler_stats(self, stats: SchedulerStats, now: float) -> None:
        """A scheduler's stats (every second): gauges take its values; its cumulative counts
        are added as increments since its previous stats, so lost messages lose nothing and
        schedulers add up. A count that went back means it restarted: all of it is new."""
        sid = stats.scheduler_id
        seen = _SchedulerSeen(
            now, stats.holds, stats.hold_timeouts, stats.hold_overflows, stats.hold_seconds
        )
        before = self._schedulers.get(sid, _SchedulerSeen(now, 0, 0, 0, 0.0))
        self._schedulers[sid] = seen
        self.sched_holds.labels(scheduler=sid).inc(_increment(before.holds, seen.holds))
        timeouts = _increment(before.hold_timeouts, seen.hold_timeouts)
        overflows = _increment(before.hold_overflows, seen.hold_overflows)
        self.sched_hold_refusals.labels(scheduler=sid, reason="timeout").inc(timeouts)
        self.sched_hold_refusals.labels(scheduler=sid, reason="full").inc(overflows)
        held_s = _increment(before.hold_seconds, seen.hold_seconds)
        self.sched_hold_seconds.labels(scheduler=sid).inc(held_s)
        self.sched_held.labels(scheduler=sid).set(stats.held)
        self.decode_kv_usage.labels(scheduler=sid).set(stats.decode_kv_usage)
        self.prefill_bound.labels(scheduler=sid).set(int(stats.prefill_bound))
        if stats.prefill_decode_ratio is None:
            self.prefill_decode_ratio.remove(sid)  # no data: absent, not a made-up number
        else:
            self.prefill_decode_ratio.labels(scheduler=sid).set(stats.prefill_decode_ratio)

    def forget_silent_schedulers(self, now: float, silent_s: float) -> list[str]:
        """Drop the series of schedulers with no stats for `silent_s` (stopped or dead)."""
        gone = sorted(s for s, seen in self._schedulers.items() if now - seen.at > silent_s)
        for sid in gone:
            del self._schedulers[sid]
            for metric in (
                self.sched_held,
                self.sched_holds,
                self.sched_hold_seconds,
                self.decode_kv_usage,
                self.prefill_bound,
                self.prefill_decode_ratio,
            ):
                metric.remove(sid)
            for reason in HOLD_REFUSALS:
                self.sched_hold_refusals.remove(sid, reason)
        return gone


def _increment(before: float, now: float) -> float:
    return now - before if now >= before else now
