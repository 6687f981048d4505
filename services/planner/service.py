"""`disagg planner`: every ``--interval-s`` it turns what the workers' heartbeats and the
schedulers' stats say into desired prefill and decode worker counts (``core.Planner``),
publishes them as a ``PlannerDecision`` and exports them on its own Prometheus endpoint:
``disagg:planner_desired_workers{role}``, ``disagg:workers{role}`` (live, by heartbeat) and
``disagg:planner_decisions_total{action}``. Two actuators: ``--k8s-namespace`` sets the prefill
and decode Deployments' replicas (``k8s``); ``--act-roles`` switches live workers' roles, one
at a time (``roles``; a fixed budget, as `disagg up --autoscale` runs). Other actuators can
follow the published decisions.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client import Counter as PromCounter

from disagg.services.planner.config import PlannerConfig
from disagg.services.planner.core import Decision, Planner, Signals
from disagg.services.planner.k8s import KubernetesScaler, Targets, actuate
from disagg.services.planner.roles import RoleActuator, WorkerView
from disagg.shared.cluster import PeerWatch
from disagg.shared.log import get_logger
from disagg.shared.protocol.codec import ErrorReply, decode, encode
from disagg.shared.protocol.messages import Heartbeat, PlannerDecision, SchedulerStats
from disagg.shared.protocol.types import MessageError, Role, new_request_id
from disagg.shared.rates import RateEstimator
from disagg.shared.service import ask_role, connect_nats, publish, run_service, sleep_unless

log = get_logger("disagg.planner")


class PlannerMetrics:
    def __init__(self) -> None:
        self.registry = reg = CollectorRegistry()
        by_role = ("role",)
        self.desired = Gauge("disagg:planner_desired_workers", "Workers the planner wants.",
                             by_role, registry=reg)  # fmt: skip
        self.live = Gauge("disagg:workers", "Live workers, by heartbeat.", by_role, registry=reg)
        self.decisions = PromCounter(
            "disagg:planner_decisions", "Planner decisions (hold included).", ("action",),
            registry=reg,
        )  # fmt: skip
        self.switches = PromCounter(
            "disagg:planner_role_switches", "Role switches asked of workers.", ("role",),
            registry=reg,
        )  # fmt: skip

    def observe(self, decision: Decision, live: Counter) -> None:
        self.desired.labels("prefill").set(decision.prefill)
        self.desired.labels("decode").set(decision.decode)
        self.desired.labels("both").set(decision.both)
        for role in Role:
            self.live.labels(str(role)).set(live.get(str(role), 0))
        self.decisions.labels(decision.action).inc()


class PlannerService:
    def __init__(self, cfg: PlannerConfig) -> None:
        self.cfg, self.subjects = cfg, cfg.service.subjects
        self.planner_id = cfg.id or "planner-" + new_request_id()[:10]
        self.planner = Planner(cfg.policy)
        self.rates = RateEstimator(cfg.rate_window_s)
        self.stats: dict[str, SchedulerStats] = {}  # scheduler id -> latest
        self.metrics = PlannerMetrics()
        self.watch: PeerWatch | None = None
        self.scaler = None
        if cfg.k8s_namespace is not None:
            self.scaler = KubernetesScaler(cfg.k8s_namespace)
            self.targets = Targets(cfg.k8s_prefill, cfg.k8s_decode)
        # a switch is over within its drain, a shell restart and a few heartbeats
        self.roles = RoleActuator(cfg.role_drain_s + 30.0) if cfg.act_roles else None

    async def run(self, stop) -> None:
        service = self.cfg.service
        nc = await connect_nats(service.nats, "planner")
        self.watch = PeerWatch(lambda: nc.is_connected, service.missed_heartbeats)
        await nc.subscribe(self.subjects.heartbeat, cb=self._on_heartbeat)
        await nc.subscribe(self.subjects.scheduler_stats, cb=self._on_stats)
        if self.cfg.metrics_port:
            start_http_server(self.cfg.metrics_port, self.cfg.metrics_host, self.metrics.registry)
        log.info("planner_ready", planner_id=self.planner_id, nats=service.nats.display,
                 policy=str(self.cfg.policy), metrics_port=self.cfg.metrics_port)  # fmt: skip
        while not stop.is_set():
            decision = self.tick(time.monotonic())
            message = PlannerDecision(
                planner_id=self.planner_id, prefill=decision.prefill, decode=decision.decode,
                both=decision.both, action=decision.action, reason=decision.reason[:1024],
                sent_at=time.time(),
            )  # fmt: skip
            await publish(nc, self.subjects.planner_decision, encode(message))
            if self.scaler is not None:
                await self._actuate(decision)
            if self.roles is not None:
                await self._switch_roles(nc, decision)
            await sleep_unless(stop, self.cfg.interval_s)
        await nc.drain()

    def tick(self, now: float) -> Decision:
        for worker_id in self.watch.expire(now):
            self.rates.forget(worker_id)
        workers = [w for w in self.watch.table.workers() if not w.report.draining]
        live = Counter(str(w.report.role) for w in workers)
        decodes = [w for w in workers if w.report.role == Role.DECODE]
        stats = list(self.stats.values())
        signals = Signals(
            now=now,
            prefill=self.rates.phase("prefill", now),
            decode=self.rates.phase("decode", now),
            prefill_workers=live.get(str(Role.PREFILL), 0),
            decode_workers=live.get(str(Role.DECODE), 0),
            both_workers=live.get(str(Role.BOTH), 0),
            queued_prefill_tokens=sum(
                w.report.queued_prefill_tokens for w in workers if w.report.role == Role.PREFILL
            ),
            decode_running=sum(w.report.running for w in decodes),
            decode_kv_usage=max((s.decode_kv_usage for s in stats), default=0.0),
            held=sum(s.held for s in stats),
        )
        if not workers and self.planner.desired is None:  # nothing heard yet: nothing to keep
            decision = Decision(0, 0, "hold", "no live worker yet")
        else:
            decision = self.planner.observe(signals)
        self.metrics.observe(decision, live)
        if decision.action != "hold":
            d = decision
            log.info("planner_decision", prefill=d.prefill, decode=d.decode, both=d.both,
                     action=d.action, reason=d.reason)  # fmt: skip
        return decision

    async def _actuate(self, decision: Decision) -> None:
        """Deployments follow the decision (in a thread: the client blocks); an API error is
        logged and retried next tick."""
        try:
            await asyncio.to_thread(
                actuate, self.scaler, self.targets, decision.prefill, decision.decode
            )
        except Exception as err:  # the API server down or RBAC missing: keep planning
            log.warning("k8s_scale_failed", error=f"{type(err).__name__}: {err}"[:300])

    async def _switch_roles(self, nc, decision: Decision) -> None:
        """Ask one worker to switch, when the live roles differ from the decision's."""
        workers = [
            WorkerView(w.worker_id, w.report.role, w.report.draining, w.report.running)
            for w in self.watch.table.workers()
        ]
        switch = self.roles.plan(decision.counts, workers, time.monotonic())
        if switch is None:
            return
        try:
            reply = await ask_role(nc, self.subjects, switch.worker_id, switch.role,
                                   drain_s=self.cfg.role_drain_s, timeout=5.0)  # fmt: skip
        except Exception as err:  # gone, or no answer: the next tick sees the table again
            log.warning("role_switch_failed", worker_id=switch.worker_id, error=repr(err)[:300])
            return
        if isinstance(reply, ErrorReply):
            log.warning("role_switch_refused", worker_id=switch.worker_id,
                        error=reply.error.message)  # fmt: skip
            return
        self.roles.sent(switch, time.monotonic())
        self.metrics.switches.labels(str(switch.role)).inc()
        log.info("role_switch_asked", worker_id=switch.worker_id, role=switch.role,
                 counts=decision.counts)  # fmt: skip

    async def _on_heartbeat(self, msg) -> None:
        try:
            report = decode(Heartbeat, msg.data)
        except MessageError:
            return  # the scheduler logs bad heartbeats
        self.watch.beat(report, time.monotonic())
        self.rates.observe(report, time.monotonic())

    async def _on_stats(self, msg) -> None:
        try:
            stats = decode(SchedulerStats, msg.data)
        except MessageError:
            return
        self.stats[stats.scheduler_id] = stats


def main(cfg: PlannerConfig) -> int:
    return run_service(cfg.service, PlannerService(cfg).run)
