"""`disagg up` keeps itself up: every kind of child SIGKILLed under load is restarted while
the stack serves on, and `disagg up` SIGKILLed itself leaves nothing behind (real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from disagg.cli.procs import disagg_command
from tests.cluster import wait_until
from tests.test_failures import Streams, prompts
from tests.test_procs import alive
from tests.test_services import Up, assert_decode_pools_full

pytestmark = pytest.mark.slow
TOKENS = 300  # a stream that outlives a kill and a restart
CONTEXT = 8192
LONGEST = 8000  # tokens: streams that would run for many seconds after their gateway died
SILENT_S = 4.0  # a worker silent this long is dead to everyone (3 heartbeats of 1 s, and margin)


def events(up: Up, event: str, **match) -> list[dict]:
    """`disagg up`'s own log events (JSON lines on its stdout)."""
    found = []
    for line in up.lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event and all(record.get(k) == v for k, v in match.items()):
            found.append(record)
    return found


def child_events(logs, event: str) -> list[dict]:
    """The children's log events of one kind, from the files `--log-dir` gave them."""
    found = []
    for log in logs.glob("*.log"):
        found += [json.loads(x) for x in log.read_text().splitlines() if f'"{event}"' in x]
    return found


def health(up: Up) -> dict:
    with urllib.request.urlopen(up.base_url + "/health", timeout=5) as resp:
        return json.loads(resp.read())


def healthy(up: Up) -> bool:
    try:
        return health(up)["status"] == "ok"
    except OSError:
        return False


def switch_role(up: Up, worker_id: str, role: str):
    """A RoleRequest to one worker of ``up`` (``ask_role``, the CLI's and planner's call)."""
    import asyncio

    import nats

    from disagg.shared.protocol.subjects import Subjects
    from disagg.shared.service import ask_role

    async def ask():
        nc = await nats.connect(up.nats_url)
        try:
            return await ask_role(nc, Subjects("disagg"), worker_id, role)
        finally:
            await nc.close()

    return asyncio.run(ask())


def pid_of(up: Up, name: str) -> int:
    restarts = events(up, "child_restarted", name=name)
    return restarts[-1]["pid"] if restarts else up.pids[name]


def model(checkpoints):
    return checkpoints(arch="llama", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def up(checkpoints, tmp_path_factory):
    logs = tmp_path_factory.mktemp("up-logs")
    stack = Up(model(checkpoints), "--prefill", "1", "--decode", "2", "--restart-initial-s", "0.5",
               log_dir=logs)  # fmt: skip
    stack.logs = logs
    yield stack
    stack.stop()


def test_each_child_sigkilled_under_load_is_restarted_and_streams_complete(up):
    ps = prompts(3, 8, 21)
    reference = Streams(up.base_url, ps, TOKENS).results()
    assert health(up) == {"status": "ok", "workers": {"decode": 2, "prefill": 1}}
    for name in ("prefill-0", "scheduler", "decode-1", "nats-server"):
        restarts = len(events(up, "child_restarted", name=name))
        streams = Streams(up.base_url, ps, TOKENS)
        streams.wait_started(5)
        os.kill(pid_of(up, name), signal.SIGKILL)
        # Past this the killed worker is declared dead (3 missed beats): whoever the gateway
        # counts from then on is alive. Until a restarted worker is back, new requests that
        # need its role get a 503 with Retry-After.
        settled = time.monotonic() + SILENT_S
        assert streams.results() == reference, name  # greedy: as if nothing happened
        wait_until(lambda n=name, r=restarts: len(events(up, "child_restarted", name=n)) > r,
                   what=f"{name} restarted")  # fmt: skip
        (exited,) = events(up, "child_exited", name=name)[-1:]
        assert exited["code"] == -signal.SIGKILL and exited["restart_in_s"] <= 0.5
        wait_until(lambda t=settled: time.monotonic() > t and healthy(up)
                   and health(up)["workers"] == {"decode": 2, "prefill": 1},
                   what=f"every worker back after {name}")  # fmt: skip
        assert_decode_pools_full(up)
    assert up.proc.poll() is None  # the stack stayed up throughout


def test_a_killed_gateway_is_restarted_and_workers_free_its_requests(up):
    streams = Streams(up.base_url, prompts(3, 8, 22), LONGEST)
    streams.wait_started(5)
    os.kill(pid_of(up, "gateway"), signal.SIGKILL)
    for thread in streams.threads:  # their connections drop: the clients see it
        thread.join(60)
    assert all(len(t) < LONGEST for t in streams.tokens)
    wait_until(lambda: healthy(up), what="the gateway back")
    assert all(e and "closed" in e["message"] for e in streams.errors), streams.errors

    def aborted() -> int:  # the workers heard the old gateway go silent: its requests end
        return sum(e["aborted"] for e in child_events(up.logs, "gateway_lost"))

    wait_until(lambda: aborted() >= 3, what="the dead gateway's requests aborted")
    assert_decode_pools_full(up)
    ok = up.client().completions.create(model=up.client().models.list().data[0].id,
                                        prompt=[5, 6, 7], max_tokens=3)  # fmt: skip
    assert ok.choices[0].finish_reason == "length"


def test_disagg_up_sigkilled_leaves_no_child_and_starts_again_on_its_ports(up, checkpoints):
    children = [pid_of(up, name) for name in up.pids]
    up.proc.send_signal(signal.SIGKILL)
    up.proc.wait(10)
    # PR_SET_PDEATHSIG: the kernel kills them with their parent; the bound is 5 s.
    wait_until(lambda: not any(alive(pid) for pid in children), timeout=5,
               what="every child gone")  # fmt: skip
    again = Up(model(checkpoints), "--prefill", "1", "--decode", "2", ports=(up.port, up.nats_port))
    try:
        assert healthy(again)
    finally:
        again.stop()


def test_one_of_three_nats_nodes_killed_under_load_loses_nothing(checkpoints, tmp_path):
    # The children log to files: on a shared pipe a child's long line (a traceback) can
    # interleave with one of up's own, and that event is lost to the reader.
    stack = Up(model(checkpoints), "--prefill", "1", "--decode", "2", "--nats-cluster", "3",
               "--restart-initial-s", "0.5", log_dir=tmp_path)  # fmt: skip
    try:
        assert {"nats-0", "nats-1", "nats-2"} <= set(stack.pids)
        ps = prompts(4, 8, 31)
        reference = Streams(stack.base_url, ps, TOKENS).results()
        nodes = ["nats-0", "nats-1", "nats-2"]
        for node in nodes:  # in turn: every service is on one of them, so each loses its node
            streams = Streams(stack.base_url, ps, TOKENS)
            streams.wait_started(5)
            os.kill(stack.pids[node], signal.SIGKILL)
            assert streams.results() == reference, node  # all complete, as if unbroken
            wait_until(lambda n=node: events(stack, "child_restarted", name=n),
                       what=f"{node} back")  # fmt: skip
        exited = [e["name"] for e in events(stack, "child_exited")]
        assert exited == nodes  # no service exited: each moved to another node
        cut_off = child_events(tmp_path, "nats_disconnected")
        assert len(cut_off) >= 5  # all five services were cut off
        again = Streams(stack.base_url, ps[:1], 8).results()
        assert again == [reference[0][:8]]
        assert_decode_pools_full(stack)
    finally:
        stack.stop()


def test_a_live_decode_worker_switches_to_prefill_without_reloading_or_losing_a_request(
    checkpoints,
):

    from tests.test_services import blocks

    stack = Up(model(checkpoints), "--prefill", "1", "--decode", "2")
    try:
        decodes = sorted(blocks(stack.metrics(), "total", "decode"))
        assert len(decodes) == 2
        ps = prompts(4, 8, 41)
        reference = Streams(stack.base_url, ps, TOKENS).results()
        streams = Streams(stack.base_url, ps, TOKENS)
        streams.wait_started(5)

        reply = switch_role(stack, decodes[0], "prefill")
        assert (reply.worker_id, reply.role, reply.switching) == (decodes[0], "prefill", True)
        assert streams.results() == reference  # it drained: its streams finished there
        wait_until(lambda: decodes[0] in blocks(stack.metrics(), "total", "prefill"),
                   what="the worker heard as a prefill worker")  # fmt: skip
        wait_until(lambda: health(stack)["workers"] == {"decode": 1, "prefill": 2},
                   timeout=10, what="one decode and two prefill workers")  # fmt: skip
        again = Streams(stack.base_url, ps, 8).results()
        assert again == [r[:8] for r in reference]
        loaded = events(stack, "weights_loaded", worker_id=decodes[0])
        assert len(loaded) == 1 and events(stack, "role_switched", worker_id=decodes[0])
        command = [*disagg_command(), "role", decodes[0], "prefill", "--nats", stack.nats_url]
        again_role = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert again_role.stdout.strip() == f"{decodes[0]}: already prefill", again_role
        missing = subprocess.run([*command[:2], "nobody-1", "decode", *command[4:]],
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
        assert missing.returncode == 1 and "no worker 'nobody-1'" in missing.stdout
        assert_decode_pools_full(stack)
        assert_decode_pools_full(stack, "prefill")
    finally:
        stack.stop()


def test_switching_the_only_prefill_worker_to_both_fails_no_request(checkpoints):
    import threading

    import httpx

    from tests.test_services import blocks

    stack = Up(model(checkpoints), "--prefill", "1", "--decode", "1")
    try:
        (prefill,) = blocks(stack.metrics(), "total", "prefill")
        statuses: list[int] = []

        def load() -> None:  # requests before, during and after the switch
            for i in range(30):
                body = {"prompt": [5 + i, 6, 7, 8], "max_tokens": 4, "ignore_eos": True}
                r = httpx.post(stack.base_url + "/v1/completions", json=body, timeout=60)
                statuses.append(r.status_code)
                time.sleep(0.05)

        sender = threading.Thread(target=load)
        sender.start()
        time.sleep(0.3)

        assert switch_role(stack, prefill, "both").switching
        sender.join(120)
        assert statuses == [200] * 30  # held while no prefill worker was there, never refused
        wait_until(lambda: health(stack)["workers"] == {"both": 1, "decode": 1}, timeout=10,
                   what="one aggregated and one decode worker")  # fmt: skip
        assert_decode_pools_full(stack)
    finally:
        stack.stop()


def test_a_switch_whose_drain_times_out_moves_what_it_holds(checkpoints, monkeypatch):

    from tests.test_services import blocks

    monkeypatch.setenv("DISAGG_DRAIN_TIMEOUT_S", "0.5")  # every service: drains cut short
    stack = Up(model(checkpoints), "--prefill", "1", "--decode", "2")
    try:
        decodes = sorted(blocks(stack.metrics(), "total", "decode"))
        ps = prompts(4, 8, 51)
        reference = Streams(stack.base_url, ps, 2000).results()
        streams = Streams(stack.base_url, ps, 2000)
        streams.wait_started(5)

        assert switch_role(stack, decodes[0], "prefill").switching
        assert streams.results() == reference  # moved mid-stream, tokens unchanged
        assert events(stack, "switch_moved", worker_id=decodes[0])
        wait_until(lambda: health(stack)["workers"] == {"decode": 1, "prefill": 2},
                   timeout=10, what="the switched worker back as prefill")  # fmt: skip
        assert_decode_pools_full(stack)
        assert_decode_pools_full(stack, "prefill")
    finally:
        stack.stop()
