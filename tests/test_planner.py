"""The planner's core on synthetic signals: needs from rates and SLOs, the budget, damping."""

from __future__ import annotations

import pytest

from disagg.services.planner.core import Planner, PlannerPolicy, Signals
from disagg.shared.rates import PhaseRates

POLICY = PlannerPolicy(max_workers=4, target_utilization=0.7, scale_down_after_s=30,
                       cooldown_s=10, ttft_slo_ms=2000, itl_slo_ms=200)  # fmt: skip


def load(busy_p: float, busy_d: float, *, p: int = 1, d: int = 1, now: float = 0.0, **kw):
    """`busy_*`: busy workers' worth of demand (a worker does 1000 prefill tokens or 100
    sampled tokens per busy second); `p`, `d`: workers live."""
    prefill = PhaseRates(workers=p, tokens=1000.0, busy_s=1.0, demand_tps=1000.0 * busy_p)
    decode = PhaseRates(workers=d, tokens=100.0, busy_s=1.0, demand_tps=100.0 * busy_d)
    return Signals(now=now, prefill=prefill, decode=decode, prefill_workers=p,
                   decode_workers=d, **kw)  # fmt: skip


def test_needs_follow_utilization_queue_itl_and_held():
    planner = Planner(POLICY)
    assert (planner.need(load(0.5, 0.5)).prefill, planner.need(load(0.5, 0.5)).decode) == (1, 1)
    assert planner.need(load(1.3, 0.5)).prefill == 2  # 1.3 busy at 0.7 each
    # 3000 queued tokens at 1000/s per worker drain in 1 s (TTFT/2) only with 3 workers.
    queued = planner.need(load(0.2, 0.2, queued_prefill_tokens=3000))
    assert queued.prefill == 3 and "queued" in queued.why
    # 60 sequences on one decode worker at 100 tokens/s: 0.6 s per token, over 0.2 s * 0.7.
    itl = planner.need(load(0.2, 0.6, decode_running=60))  # 5 needed, prefill light
    assert itl.counts == (0, 0, 4) and "ITL 600 ms" in itl.why  # every worker decodes
    assert planner.need(load(0.2, 0.2, held=2)).decode == 2
    assert planner.need(load(0.2, 0.2, decode_kv_usage=0.9)).decode == 2
    unmeasured = PhaseRates(workers=0, tokens=0.0, busy_s=0.0, demand_tps=0.0)
    quiet = Signals(0.0, unmeasured, unmeasured, prefill_workers=2, decode_workers=1)
    assert (planner.need(quiet).prefill, planner.need(quiet).decode) == (2, 1)  # keep what runs


def test_the_budget_is_shared_in_proportion_and_leaves_one_each():
    planner = Planner(POLICY)
    heavy = planner.need(load(6.0, 2.0))  # wants 9 + 3 of 4
    assert (heavy.prefill, heavy.decode) == (3, 1)
    # A light prefill: every worker aggregated (each prefills what it decodes).
    assert planner.need(load(0.1, 20.0)).counts == (0, 0, 4)
    assert planner.need(load(20.0, 0.3)).counts == (3, 0, 1)
    assert planner.need(load(3.0, 3.0)).counts == (2, 2, 0)  # both heavy: shared


def test_up_at_once_down_slowly_one_at_a_time_and_never_within_the_cooldown():
    planner = Planner(POLICY)
    assert planner.observe(load(0.5, 0.5, now=0)).action == "hold"
    up = planner.observe(load(1.8, 0.5, now=1))  # 3 prefill workers needed
    assert (up.prefill, up.decode, up.action) == (3, 1, "scale_up")
    assert planner.observe(load(0.5, 1.9, p=3, now=5)).action == "hold"  # cooldown
    moved = planner.observe(load(0.5, 1.9, p=3, now=12))  # decode needs 3 too: over budget
    assert (moved.prefill, moved.decode, moved.action) == (1, 3, "rebalance")
    quiet = [planner.observe(load(0.1, 0.1, p=1, d=3, now=t)) for t in range(23, 53)]
    assert all(d.action == "hold" for d in quiet)  # not 30 s below the need yet
    first = planner.observe(load(0.1, 0.1, p=1, d=3, now=54))
    assert (first.prefill, first.decode, first.action) == (1, 2, "scale_down")
    again = planner.observe(load(0.1, 0.1, p=1, d=2, now=60))
    assert again.action == "hold"  # a new 30 s wait (and the cooldown)


def test_steady_load_near_a_boundary_keeps_steady_counts():
    planner = Planner(POLICY)
    decisions = []
    for t in range(0, 300):  # 1.35 or 1.45 busy workers: 2 or 3 of them at 0.7 each
        busy = 1.4 + (0.05 if t % 2 else -0.05)
        decisions.append(planner.observe(load(busy, 0.3, p=2, now=float(t))))
    changes = [d for d in decisions if d.action != "hold"]
    assert len(changes) == 1 and changes[0].prefill == 3  # the peaks' need, once
    assert all(d.prefill == 3 for d in decisions[2:])  # the band keeps it: no flapping


def test_two_workers_follow_the_phases_through_both_workers():
    """The 2-core budget: long outputs make both workers aggregated, long prompts 1P + 1both;
    "both" workers' work counts (as shared demand) with no dedicated worker left to measure."""
    policy = PlannerPolicy(max_workers=2, scale_down_after_s=30, cooldown_s=10)
    planner = Planner(policy)

    def phase(dedicated: int, busy: float, per_s: float, shared: float = 0.0) -> PhaseRates:
        if not dedicated:  # nothing measured: only what "both" workers did
            return PhaseRates(0, 0.0, 0.0, 0.0, shared_demand_tps=shared * per_s)
        return PhaseRates(dedicated, per_s, 1.0, busy * per_s, shared_demand_tps=shared * per_s)

    def tick(now, p, d, b, prefill, decode):
        return planner.observe(Signals(now, prefill, decode, p, d, b))

    assert tick(0, 1, 1, 0, phase(1, 0.5, 1000), phase(1, 0.5, 100)).counts == (1, 1, 0)
    # Long outputs: decode needs 1.5 workers, prefill 0.2: both workers aggregated, at once.
    out = tick(1, 1, 1, 0, phase(1, 0.2, 1000), phase(1, 1.5, 100))
    assert (out.counts, out.action) == ((0, 0, 2), "rebalance")
    # Steady in that shape, measured only through the both workers' shares: no change.
    steady = [tick(t, 0, 0, 2, phase(0, 0, 1000, shared=0.2), phase(0, 0, 100, shared=1.5))
              for t in range(2, 60)]  # fmt: skip
    assert all(d.counts == (0, 0, 2) for d in steady)
    # Long prompts: 1.6 workers of prefill, decode light. Two workers already prefill, so
    # nothing is short: the move to 1P + 1both waits out --scale-down-after-s.
    long = [tick(t, 0, 0, 2, phase(0, 0, 1000, shared=1.6), phase(0, 0, 100, shared=0.1))
            for t in range(60, 100)]  # fmt: skip
    moved = [d for d in long if d.action != "hold"]
    assert [d.counts for d in moved] == [(1, 0, 1)] and long[-1].counts == (1, 0, 1)


def test_policy_bounds():
    with pytest.raises(ValueError, match="max-workers"):
        PlannerPolicy(max_workers=1)
    with pytest.raises(ValueError, match="target-utilization"):
        PlannerPolicy(target_utilization=1.5)
    with pytest.raises(ValueError, match="positive"):
        PlannerPolicy(cooldown_s=0)


# --- the service, on a real nats-server with synthetic heartbeats ----------------------------


def heartbeat(worker_id: str, role: str, t: float, busy: float, rate: float):
    from disagg.shared.protocol.messages import Heartbeat

    return Heartbeat(
        worker_id=worker_id, role=role, zmq_address="tcp://127.0.0.1:1", model="m",
        fingerprint="f", block_size=16, total_blocks=100, free_blocks=90, running=2, waiting=0,
        queued_prefill_tokens=0, max_model_len=1024, busy_s=busy * t,
        prefill_tokens=int(rate * t) if role == "prefill" else 0,
        sampled_tokens=int(rate * t) if role == "decode" else 0,
    )  # fmt: skip


def test_the_service_publishes_decisions_and_metrics_from_heartbeats(tmp_path):
    import asyncio
    import json
    import re
    import time
    import urllib.request

    import nats

    from disagg.cli.procs import Child, NatsServer, disagg_command, free_port
    from disagg.shared.protocol.codec import decode, encode
    from disagg.shared.protocol.messages import PlannerDecision
    from tests.cluster import wait_until

    server, port = NatsServer().start(), free_port()
    argv = [*disagg_command(), "planner", "--nats", server.url, "--metrics-port", str(port),
            "--interval-s", "0.2", "--cooldown-s", "0.5", "--max-workers", "4",
            "--rate-window-s", "3"]  # fmt: skip
    planner = Child("planner", argv, log=open(tmp_path / "planner.log", "ab"))  # noqa: SIM115

    async def drive() -> list[PlannerDecision]:
        nc = await nats.connect(server.url)
        decisions: list[PlannerDecision] = []

        async def on_decision(msg) -> None:
            decisions.append(decode(PlannerDecision, msg.data))

        await nc.subscribe("disagg.planner.decision", cb=on_decision)
        start = time.monotonic()
        while time.monotonic() - start < 30 and not any(d.prefill >= 2 for d in decisions):
            t = time.monotonic() - start
            # prefill fully busy (1.0 busy s per s: 1.4 workers needed at 0.7), decode at 20%
            await nc.publish(
                "disagg.worker.heartbeat", encode(heartbeat("prefill-x", "prefill", t, 1.0, 1000.0))
            )
            await nc.publish("disagg.worker.heartbeat",
                             encode(heartbeat("decode-x", "decode", t, 0.2, 50.0)))  # fmt: skip
            await asyncio.sleep(0.2)
        await nc.close()
        return decisions

    try:
        decisions = asyncio.run(drive())
        up = [d for d in decisions if d.action == "scale_up"]
        assert up and (up[0].prefill, up[0].decode) == (2, 1), decisions[-3:]

        def metrics() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.read().decode()

        wait_until(lambda: "disagg:planner_desired_workers" in metrics(), what="metrics")
        text = metrics()
        assert re.search(r'disagg:planner_desired_workers\{role="prefill"\} 2\.0', text)
        assert re.search(r'disagg:workers\{role="prefill"\} 1\.0', text)
        assert re.search(r'disagg:planner_decisions_total\{action="scale_up"\} 1\.0', text)
        logged = [json.loads(x) for x in (tmp_path / "planner.log").read_text().splitlines()
                  if '"planner_decision"' in x]  # fmt: skip
        assert logged and logged[0]["action"] == "scale_up"
    finally:
        planner.stop()
        server.stop()


def test_nothing_measured_keeps_the_shape_that_runs():
    """Idle (no rates in the window): two aggregated workers stay aggregated, past the
    scale-down delay, instead of being reshaped by a guess."""
    planner = Planner(PlannerPolicy(max_workers=2, scale_down_after_s=5, cooldown_s=1))
    idle = PhaseRates(0, 0.0, 0.0, 0.0)
    out = [planner.observe(Signals(t, idle, idle, 0, 0, 2)) for t in range(30)]
    assert {d.counts for d in out} == {(0, 0, 2)} and {d.action for d in out} == {"hold"}


def views(*roles: str, draining: str = "", running: dict | None = None):
    from disagg.services.planner.roles import WorkerView
    from disagg.shared.protocol.types import Role

    running = running or {}
    return [WorkerView(f"w{i}", Role(r), f"w{i}" in draining.split(), running.get(f"w{i}", 0))
            for i, r in enumerate(roles)]  # fmt: skip


def test_the_role_actuator_switches_one_worker_at_a_time_keeping_service():
    from disagg.services.planner.roles import RoleActuator, Switch, serves
    from disagg.shared.protocol.types import Role

    act = RoleActuator(timeout_s=30)
    assert act.plan((1, 1, 0), views("prefill", "decode"), 0) is None  # already there
    # 1P + 1D -> two aggregated: neither alone serves while the other switches, so the less
    # loaded worker goes first.
    first = act.plan((0, 0, 2), views("prefill", "decode", running={"w0": 9, "w1": 0}), 0)
    assert first == Switch("w1", Role.BOTH)
    act.sent(first, 0)
    # Under way (draining, then back under the old role's last heartbeat): nothing more.
    assert act.plan((0, 0, 2), views("prefill", "decode", draining="w1"), 1) is None
    assert act.plan((0, 0, 2), views("prefill", "decode"), 2) is None
    assert act.plan((0, 0, 2), views("prefill"), 3) is None  # its heartbeat missed
    # Done once it shows the new role: the next switch.
    assert act.plan((0, 0, 2), views("prefill", "both"), 4) == Switch("w0", Role.BOTH)
    # Of three, the switch that leaves the others serving goes first, loaded or not.
    three = views("prefill", "decode", "decode", running={"w0": 0, "w1": 5, "w2": 7})
    assert RoleActuator(30).plan((0, 1, 2), three, 0) == Switch("w1", Role.BOTH)
    # Two both workers -> 1P + 1both: the less loaded one prefills.
    act = RoleActuator(timeout_s=30)
    two = views("both", "both", running={"w0": 5, "w1": 2})
    assert act.plan((1, 0, 1), two, 0) == Switch("w1", Role.PREFILL)
    # Another worker draining (SIGTERM): wait. A switch not seen within the timeout: go on.
    assert act.plan((1, 0, 1), views("both", "both", draining="w0"), 0) is None
    act.sent(Switch("w1", Role.PREFILL), 0)
    assert act.plan((1, 0, 1), two, 10) is None
    assert act.plan((1, 0, 1), two, 31) == Switch("w1", Role.PREFILL)
    # Fewer desired than live: the extra workers keep their roles.
    assert RoleActuator(30).plan((1, 1, 0), views("prefill", "decode", "decode"), 0) is None
    assert serves(views("both")) and serves(views("prefill", "decode"))
    assert not serves(views("prefill")) and not serves(views("decode", "both", draining="w1"))


def test_disagg_up_hands_the_planner_its_policy_as_flags():
    """`disagg up --autoscale` passes the planner the flags that differ from its defaults and
    its own worker count as the budget; --both adds aggregated workers to a disagg stack."""
    import argparse

    from disagg.cli.up import UpConfig, worker_roles
    from disagg.services.planner.config import PlannerConfig
    from disagg.shared.config import add_flags, from_args, to_flags

    policy = PlannerPolicy(max_workers=3, cooldown_s=2.5, itl_slo_ms=80)
    parser = argparse.ArgumentParser()
    add_flags(parser, PlannerConfig)
    argv = to_flags(policy) + ["--act-roles"]
    assert argv[:2] == ["--itl-slo-ms", "80"] and "--ttft-slo-ms" not in argv
    cfg = from_args(PlannerConfig, parser.parse_args(argv))
    assert cfg.policy == policy and cfg.act_roles
    assert worker_roles(UpConfig(prefill=1, decode=0, both=1)) == ["prefill", "worker"]
    with pytest.raises(ValueError, match="--decode \\+ --both"):
        UpConfig(prefill=1, decode=0)
    with pytest.raises(ValueError, match="two or more"):
        UpConfig(mode="agg", decode=1, autoscale=True)


def test_role_switches_that_fail_are_asked_again_and_only_one_is_under_way():
    """The planner's shell around the actuator, on a fake NATS: no responder or a refusal
    (the worker is draining already) leaves nothing pending, so the next tick asks again; an
    accepted switch is pending (no second one) and counted."""
    import asyncio
    import time

    import nats.errors

    from disagg.services.planner.config import PlannerConfig
    from disagg.services.planner.core import Decision
    from disagg.services.planner.service import PlannerService
    from disagg.shared.cluster import PeerWatch
    from disagg.shared.protocol.codec import encode, error_reply
    from disagg.shared.protocol.messages import RoleReply, RoleRequest

    svc = PlannerService(PlannerConfig(act_roles=True, metrics_port=0))
    svc.watch = PeerWatch(lambda: True, 3)
    for worker, role in (("p1", "prefill"), ("d1", "decode")):
        svc.watch.beat(heartbeat(worker, role, 1.0, 0.5, 100.0), time.monotonic())
    answers = [nats.errors.NoRespondersError(), error_reply("worker d1 is draining", 503)]
    asked: list[tuple[str, RoleRequest]] = []

    class FakeNats:
        async def request(self, subject, body, timeout):
            from disagg.shared.protocol.codec import decode

            asked.append((subject, decode(RoleRequest, body)))
            answer = answers.pop(0) if answers else None
            if isinstance(answer, Exception):
                raise answer
            reply = answer or encode(RoleReply(worker_id="d1", role="both", switching=True))
            return type("Msg", (), {"data": reply})()

    both = Decision(1, 0, "rebalance", "long prompts", both=1)
    for _ in range(4):
        asyncio.run(svc._switch_roles(FakeNats(), both))
    subjects = [s for s, _ in asked]
    assert subjects == ["disagg.worker.d1.role"] * 3  # failed, refused, accepted; then waits
    assert {(r.role, r.drain_s) for _, r in asked} == {("both", 2.0)}
    assert svc.roles.pending is not None
    switches = svc.metrics.registry.get_sample_value(
        "disagg:planner_role_switches_total", {"role": "both"}
    )
    assert switches == 1.0
