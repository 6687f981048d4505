"""`disagg up --autoscale`: the planner switches live workers' roles as the load asks, one at a
time, and no request fails or changes because of a switch (real processes)."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.cluster import wait_until
from tests.test_failures import Streams, prompts
from tests.test_self_healing import events, health, model
from tests.test_services import Up, assert_decode_pools_full

pytestmark = pytest.mark.slow
TOKENS = 200


def planner_events(logs, event: str) -> list[dict]:
    lines = (logs / "planner.log").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r.get("event") == event]


def test_long_outputs_turn_1p_1d_into_two_aggregated_workers_and_fail_nothing(
    checkpoints, tmp_path
):
    """Decode-bound load on 1P + 1D: the planner asks for two aggregated workers; waves of
    streams before, during and after the two switches all complete with the same tokens."""
    # No way back during the test (scale-down 600 s): it checks the way up.
    stack = Up(model(checkpoints), "--prefill", "1", "--decode", "1", "--autoscale",
               "--planner-cooldown-s", "1", "--planner-scale-down-after-s", "600",
               log_dir=tmp_path)  # fmt: skip
    batch = prompts(6, 8, seed=3)  # short prompts, long outputs: decode-bound
    waves: list[Streams] = []
    try:
        assert health(stack)["workers"] == {"decode": 1, "prefill": 1}

        def aggregated() -> bool:  # two waves in flight: decode never idles between them
            waves.append(Streams(stack.base_url, batch, TOKENS))
            for t in waves[-2].threads if len(waves) > 1 else ():
                t.join(120)
            return health(stack)["workers"] == {"both": 2}

        wait_until(aggregated, timeout=120, what="both workers aggregated")
        for t in waves[-1].threads:
            t.join(120)
        settled = Streams(stack.base_url, batch, TOKENS)  # the reference: no switch under way
        for t in settled.threads:
            t.join(120)
        assert settled.errors == [None] * len(batch) and all(
            len(t) == TOKENS for t in settled.tokens
        )
        for wave in waves:  # before, during and after each switch: the same greedy tokens
            assert wave.errors == [None] * len(batch)
            assert wave.tokens == settled.tokens
        asked = planner_events(tmp_path, "role_switch_asked")
        assert [e["role"] for e in asked] == ["both", "both"]  # one worker at a time
        assert health(stack)["status"] == "ok"  # the count of workers is what it expects
        assert_decode_pools_full(stack, "both")
        # The planner is a child like the others: SIGKILLed, it is restarted and the stack
        # serves on meanwhile.
        os.kill(stack.pids["planner"], signal.SIGKILL)
        wait_until(lambda: events(stack, "child_restarted", name="planner"), what="planner back")
        again = Streams(stack.base_url, batch, TOKENS)
        for t in again.threads:
            t.join(120)
        assert again.errors == [None] * len(batch) and again.tokens == settled.tokens
    finally:
        stack.stop()


def test_moving_leftovers_skips_a_request_that_ended_meanwhile():
    """A switch's leftovers are moved one by one, with awaits between: one that ends (or is
    aborted) meanwhile is skipped, not a KeyError that kills the worker mid-switch (seen in
    `disagg bench phased`: the worker exited with SIGABRT and its requests were retried)."""
    import asyncio
    from unittest import mock

    from disagg.services.workers.service import WorkerService

    class Shell(WorkerService):  # no role: only what _abort_leftovers touches
        build_core = close_endpoints = messages_of = subscribe = None

    shell = object.__new__(Shell)
    shell.worker_id, shell.gateways = "decode-x", {"r1": "gw", "r2": "gw", "r3": "gw"}
    shell.subjects = mock.Mock(stream=lambda gateway, request: f"s.{gateway}.{request}")
    published, aborted = [], []

    async def call(fn, request_id):
        aborted.append(request_id)
        shell.gateways.pop("r2", None)  # r2 finished while r1 was being moved

    shell.loop = mock.Mock(call=call)
    shell.core = mock.Mock()
    shell.nc = mock.Mock()

    async def publish(nc, subject, body):
        published.append(subject)

    with mock.patch("disagg.services.workers.service.publish", publish):
        asyncio.run(shell._abort_leftovers())
    assert aborted == ["r1", "r3"] and published == ["s.gw.r1", "s.gw.r3"]
    assert shell.gateways == {}
