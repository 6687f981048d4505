"""Failures with real processes: worker deaths mid-stream, a NATS restart, client disconnects,
overload, a SIGTERM drain. Every test ends with every decode worker's pool full.

One cluster serves the module: nats-server, a scheduler, prefill-a/b, decode-a/b and a gateway,
each its own `disagg` process (child of this test, killed by PID) logging JSON to its own file.

Windows are opened with signals, not sleeps: SIGSTOP freezes a worker (its heartbeats stop, so
the others soon see it as gone) and SIGCONT brings it back. To put four streams on decode-a,
decode-b is frozen until the others have dropped it; to kill decode-a *while* it holds them,
it is frozen mid-stream, decode-b thawed, then decode-a SIGKILLed. From the outside a frozen
worker is exactly a dead one, so failure detection is the same as for a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import msgspec
import nats
import pytest

from disagg.cli.procs import NatsServer, disagg_command, free_port
from disagg.services.gateway.migration import BackendError, Progress, WorkerLost
from disagg.services.gateway.stream import AttemptStream, WorkerDied
from disagg.services.workers.decode import AdmitError, DecodeWorker, FailedTransfer
from disagg.shared.cluster import Leases, PeerWatch
from disagg.shared.engine.runtime import RuntimeConfig, build_runtime
from disagg.shared.engine.scheduler import EngineConfig
from disagg.shared.protocol.codec import ErrorBody, decode_reply
from disagg.shared.protocol.messages import AbortReply, Heartbeat, StreamChunk
from disagg.shared.protocol.sampling import Logprob, SamplingParams
from disagg.shared.protocol.types import MAX_ID_LEN, check_id
from disagg.shared.service import NatsAuth, NatsConfig, NatsRefused, connect_nats, request
from disagg.shared.transfer.loopback import Loopback
from tests.cluster import (
    STARTUP_S,
    WAIT_S,
    Cluster,
    assert_decode_pools_full,
    decode_pools,
    wait_until,
)
from tests.conftest import assert_pool_full, hf_greedy, hf_logprobs

pytestmark = pytest.mark.slow
LONG = 900  # tokens: a stream that lasts seconds on the tiny model
WORKER_FLAGS = ("--kv-memory-gb", "0.05", "--block-size", "4", "--transfer-deadline-s", "30")
# A small prefill budget chunks a long prompt into many steps: a window to act mid-prefill.
PREFILL_FLAGS = ("--max-num-batched-tokens", "64")


class Streams:
    """Streamed greedy completions, one thread each; token ids are recorded as they arrive."""

    def __init__(
        self, base: str, prompts: list[list[int]], max_tokens: int, bodies=None, **extra
    ) -> None:
        """``bodies``: per-stream fields over the greedy defaults; ``extra``: for every stream."""
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.logprobs: list[list[float]] = [[] for _ in prompts]  # of streams that ask
        self.errors: list[dict | None] = [None] * len(prompts)
        self.ids: list[str | None] = [None] * len(prompts)
        self.more: list[dict[int, list[int]]] = [{} for _ in prompts]  # choices 1.. (n > 1)
        bodies = bodies or [{}] * len(prompts)
        self.threads = [
            threading.Thread(
                target=self._run, args=(base, i, p, max_tokens, extra | b), daemon=True
            )
            for i, (p, b) in enumerate(zip(prompts, bodies, strict=True))
        ]
        for t in self.threads:
            t.start()

    def _run(self, base: str, i: int, prompt: list[int], max_tokens: int, extra: dict) -> None:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "return_token_ids": True} | extra  # fmt: skip
        try:
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as resp:
                self._read(i, resp)
        except httpx.HTTPError as err:  # e.g. the gateway died: the connection closed
            self.errors[i] = {"message": f"{type(err).__name__}: connection closed: {err}"}

    def _read(self, i: int, resp: httpx.Response) -> None:
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                self.errors[i] = chunk["error"]
                return
            self.ids[i] = chunk["id"]
            for choice in chunk["choices"]:
                if choice["index"]:
                    more = self.more[i].setdefault(choice["index"], [])
                    more += choice.get("token_ids") or []
                    continue
                self.tokens[i] += choice.get("token_ids") or []
                if block := choice.get("logprobs"):
                    self.logprobs[i] += block["token_logprobs"]

    def wait_started(self, n: int = 1) -> None:
        wait_until(lambda: all(len(t) >= n for t in self.tokens), what="every stream started")

    def results(self) -> list[list[int]]:
        for t in self.threads:
            t.join(120)
            assert not t.is_alive(), "a stream hung"
        assert self.errors == [None] * len(self.tokens), self.errors
        return self.tokens


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(5, 380) for _ in range(length)] for _ in range(n)]


def iso_time(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="module")
def cluster(checkpoints, tmp_path_factory):
    workers = {
        "prefill-a": ("prefill", *WORKER_FLAGS, *PREFILL_FLAGS),
        "prefill-b": ("prefill", *WORKER_FLAGS, *PREFILL_FLAGS),
        "decode-a": ("decode", *WORKER_FLAGS),
        "decode-b": ("decode", *WORKER_FLAGS),
    }
    logs = tmp_path_factory.mktemp("failure-logs")
    # Every prompt takes the disaggregated path (prefill worker, KV transfer) under test here.
    no_local = ("--local-prefill-threshold", "0")
    c = Cluster(checkpoints(arch="llama"), logs, workers, scheduler_flags=no_local)
    yield c
    c.stop()


def completion(base: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(base + "/v1/completions", json=body, timeout=timeout)


# --- the pure cores: migration policy, stream bookkeeping, liveness ------------------------


def chunk(worker: str, index: int, tokens: list[int], finish=None, error=None) -> StreamChunk:
    return StreamChunk(request_id="r1", worker_id=worker, index=index, token_ids=tokens,
                       finish_reason=finish, num_prompt_tokens=3, num_cached_tokens=0,
                       error=error)  # fmt: skip


def test_progress_moves_prompt_plus_generated_and_gives_up_past_the_limit():
    p = Progress("cmpl-1", [1, 2, 3], SamplingParams(max_tokens=10))
    p.generated += [7, 8]
    p.move(WorkerLost("worker d1 died", ["d1"], dead=True), limit=2)
    p.move(WorkerLost("p1: busy", ["p1"]), limit=2)
    assert p.attempt_id == "cmpl-1-m2" and p.attempt_prompt() == [1, 2, 3, 7, 8]
    assert p.attempt_params().max_tokens == 8
    assert p.dead == {"d1"} and p.excluded == {"d1", "p1"}
    with pytest.raises(BackendError, match="after 2 migrations: p9 gone") as err:
        p.move(WorkerLost("p9 gone", ["p9"]), limit=2)
    assert err.value.status == 503
    long_id = Progress("x" * MAX_ID_LEN, [1], SamplingParams())
    long_id.moves = 3
    assert len(long_id.attempt_id) == MAX_ID_LEN and check_id("id", long_id.attempt_id)


def test_stream_reorders_dedups_and_notices_lost_chunks():
    s = AttemptStream(decode_id="d1", prefill_id="p1")
    assert s.absorb(chunk("d1", 0, [5, 6])).token_ids == [5, 6]  # decode overtook prefill
    assert s.absorb(chunk("p1", 0, [5])).token_ids == []  # the duplicate first token
    assert s.decoding and s.lost_holder(WorkerDied("p1")) is None  # prefill no longer needed
    with pytest.raises(WorkerLost, match="2 tokens of the stream from d1 were lost"):
        s.absorb(chunk("d1", 4, [9]))
    done = AttemptStream(decode_id="d1", prefill_id="p1")
    event = done.absorb(chunk("d1", 0, [5, 6], finish="length"))
    assert event.token_ids == [5, 6] and event.finish_reason == "length"


def test_stream_holds_tokens_until_every_prompt_logprob_arrived():
    s = AttemptStream(decode_id="d1", prefill_id="p1", expect_prompt=3)
    lp = [Logprob(-1.0 - i) for i in range(3)]
    part = chunk("p1", 0, [])
    first = msgspec.structs.replace(part, prompt_logprobs=tuple(lp[:2]), prompt_index=1)
    rest = msgspec.structs.replace(part, prompt_logprobs=tuple(lp[2:]), prompt_index=3)
    assert s.absorb(chunk("d1", 0, [5, 6])).token_ids == []  # decode's tokens wait
    assert s.absorb(first).token_ids == []
    assert s.absorb(first).token_ids == [] and len(s.prompt_logprobs) == 2  # a duplicate
    event = s.absorb(rest)
    assert event.token_ids == [5, 6] and event.prompt_logprobs == lp  # released together
    assert s.absorb(chunk("d1", 2, [7])).prompt_logprobs is None  # once
    p = Progress("r1", [1, 2, 3, 4], SamplingParams(max_tokens=8, prompt_logprobs=2))
    assert p.attempt_params().prompt_logprobs == 2  # nothing went out yet: ask again
    p.generated = [5]
    assert p.attempt_params().prompt_logprobs is None  # the client has them


def test_stream_errors_blame_the_right_worker():
    busy = ErrorBody(message="KV transfer deadline passed", type="x", code=503)
    s = AttemptStream(decode_id="d1", prefill_id="p1")
    with pytest.raises(WorkerLost) as lost:  # decode's transfer failed: blame its sender
        s.absorb(chunk("d1", 0, [], "error", busy))
    assert lost.value.suspects == {"p1"} and not lost.value.dead
    with pytest.raises(WorkerLost) as lost:
        s.absorb(chunk("p1", 0, [], "error", busy))
    assert lost.value.suspects == {"p1"}
    bug = ErrorBody(message="engine bug", type="server_error", code=500)
    with pytest.raises(BackendError, match="engine bug"):  # not retryable: the client is told
        s.absorb(chunk("d1", 0, [], "error", bug))
    assert s.lost_holder(WorkerDied("d1")).dead
    assert s.timed_out(5.0).suspects == {"p1"}  # no token yet: prefill is the one to blame


def test_peer_watch_does_not_count_its_own_outage():
    connected = [True]
    watch = PeerWatch(lambda: connected[0], missed_beats=3)
    report = Heartbeat(
        worker_id="d1", role="decode", zmq_address="tcp://x:1", model="m", fingerprint="f",
        block_size=4, total_blocks=8, free_blocks=8, running=0, waiting=0,
        queued_prefill_tokens=0, max_model_len=64,
    )  # fmt: skip
    assert watch.beat(report, now=0.0) and not watch.beat(report, now=1.0)
    connected[0] = False
    assert watch.expire(now=10.0) == []  # silence while we were cut off proves nothing
    connected[0] = True
    assert watch.expire(now=12.0) == []  # a fresh bound after the reconnection
    assert watch.expire(now=15.5) == ["d1"]


def test_gateway_leases_expire_after_silence_but_not_during_our_own_outage():
    connected = [True]
    leases = Leases(lambda: connected[0], timeout_s=3.0)
    leases.renew("gw-a", 0.0)
    leases.renew("gw-b", 0.0)
    leases.renew("gw-b", 2.5)
    assert leases.expire(3.5) == ["gw-a"] and leases.expire(3.6) == []
    connected[0] = False
    assert leases.expire(20.0) == []  # cut off ourselves: nobody's fault
    connected[0] = True
    assert leases.expire(21.0) == []  # every lease renewed at the reconnection
    assert leases.expire(24.5) == ["gw-b"]


def test_a_cancel_landing_with_a_nats_reply_is_kept():
    """nats-py awaits a reply with ``wait_for``; on Python 3.11 a cancel (an abort, a client
    gone) that lands in the loop iteration the reply does is dropped and the reply returned."""

    class Nc:  # the shape of nats-py's request
        def __init__(self) -> None:
            self.reply = asyncio.get_running_loop().create_future()

        async def request(self, subject: str, payload: bytes, timeout: float):
            return await asyncio.wait_for(self.reply, timeout)

    async def race(call) -> tuple[str, int]:
        nc = Nc()
        task = asyncio.create_task(call(nc))
        await asyncio.sleep(0)  # it waits for its reply
        nc.reply.set_result("msg")
        task.cancel()  # in the same iteration
        try:
            return await task, task.cancelling()
        except asyncio.CancelledError:
            return "cancelled", task.cancelling()

    async def answered(call) -> str:
        nc = Nc()
        task = asyncio.create_task(call(nc))
        await asyncio.sleep(0)
        nc.reply.set_result("msg")
        return await task

    kept = asyncio.run(race(lambda nc: request(nc, "s", b"", 5)))
    assert kept == ("cancelled", 1)
    assert asyncio.run(answered(lambda nc: request(nc, "s", b"", 5))) == "msg"


def test_decode_fails_transfers_of_a_dead_prefill_and_bounds_admission(checkpoints):
    rt = build_runtime(
        RuntimeConfig(
            dtype="float32",
            model=checkpoints(arch="llama"),
            num_blocks=64,
            block_size=4,
            engine=EngineConfig(max_num_seqs=2),
        )
    )
    link = Loopback(rt.fingerprint)
    decode = DecodeWorker(rt.engine, link.receiver, fingerprint=rt.fingerprint)
    decode.admit("a", [1, 2, 3, 4, 5], SamplingParams(), prefill_id="p1")
    decode.admit("b", [1, 2, 3], SamplingParams(), prefill_id="p2")
    with pytest.raises(AdmitError) as busy:  # max_num_seqs requests held
        decode.admit("c", [1, 2], SamplingParams(), prefill_id="p2")
    assert busy.value.status == 429
    assert decode.fail_transfers_from("p1") == 1
    (failed,) = decode.step()
    assert isinstance(failed, FailedTransfer) and "p1 died" in failed.error
    assert decode.abort("b") and not decode.has_work()
    assert_pool_full(decode.pool)


# --- client disconnects --------------------------------------------------------------------


def aborts_found(cluster: Cluster) -> int:
    return len(cluster.events("decode-a", "abort", found=True)) + len(
        cluster.events("decode-b", "abort", found=True)
    )


def admitted(cluster: Cluster) -> int:
    return sum(len(cluster.events(name, "admitted")) for name in ("decode-a", "decode-b"))


def test_http_disconnect_mid_stream_and_before_answer_free_blocks(cluster):
    before = aborts_found(cluster)
    body = {"prompt": prompts(1, 8, 1)[0], "max_tokens": LONG, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", cluster.base + "/v1/completions", json=body, timeout=60) as resp:
        chunks = resp.iter_lines()
        assert resp.status_code == 200 and next(c for c in chunks if c.startswith("data: {"))
    # The connection is closed mid-stream: the decode worker must be told, not run to the end.
    wait_until(lambda: aborts_found(cluster) > before, what="abort of the streamed request")
    # Not streamed: the client sends its request and goes away before any answer.
    body = json.dumps(body | {"stream": False}).encode()
    admits = admitted(cluster)
    with socket.create_connection(("127.0.0.1", cluster.port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        # Admitted, not only placed: a client gone while its placement is in flight leaves
        # nothing on a worker to abort.
        wait_until(lambda: admitted(cluster) > admits, what="the request admitted on decode")
    wait_until(lambda: aborts_found(cluster) > before + 1, what="abort of the unanswered request")
    assert_decode_pools_full(cluster)
    assert re.search(r"^disagg:num_requests_running 0\.0$", cluster.metrics(), re.M)


async def nats_abort(cluster: Cluster) -> tuple[list[dict], dict, list[dict]]:
    """A streamed NATS request aborted by id after its first chunk, and a non-streamed one
    aborted by reply inbox once placed; returns what each inbox received and the abort's reply."""
    model = cluster.model.name
    nc = await nats.connect(cluster.nats.url)
    try:
        body = {"model": model, "prompt": prompts(1, 8, 2)[0], "max_tokens": LONG,
                "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
        streamed = await _collect_aborted(nc, body, by_id=True)
        body["stream"] = False
        inbox, placed = nc.new_inbox(), cluster.placed()
        sub = await nc.subscribe(inbox)
        await nc.publish("disagg.v1.completions", json.dumps(body).encode(), reply=inbox)
        while cluster.placed() == placed:
            await asyncio.sleep(0.01)
        reply = await nc.request("disagg.v1.abort", json.dumps({"reply": inbox}).encode(), 10)
        unanswered = [json.loads((await sub.next_msg(timeout=WAIT_S)).data)]
        return streamed, json.loads(reply.data), unanswered
    finally:
        await nc.close()


async def _collect_aborted(nc, body: dict, *, by_id: bool) -> list[dict]:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("disagg.v1.completions", json.dumps(body).encode(), reply=inbox)
    first = json.loads((await sub.next_msg(timeout=WAIT_S)).data)
    await nc.request("disagg.v1.abort", json.dumps({"id": first["id"]}).encode(), 10)
    out = [first]
    while not out[-1].get("done"):
        out.append(json.loads((await sub.next_msg(timeout=WAIT_S)).data))
    return out


def test_nats_abort_frees_blocks(cluster):
    before = aborts_found(cluster)
    streamed, reply, unanswered = asyncio.run(asyncio.wait_for(nats_abort(cluster), WAIT_S))
    assert streamed[-1] == {"done": True}
    assert streamed[-2].get("error", {}).get("code") == "aborted", (len(streamed), streamed[-2])
    assert len(streamed) < LONG // 2, "the stream was not cut short"
    assert reply == {"aborted": True}
    assert unanswered[0]["error"]["code"] == "aborted"
    wait_until(lambda: aborts_found(cluster) >= before + 2, what="aborts on the decode workers")
    assert_decode_pools_full(cluster)


async def vanish_mid_stream(cluster: Cluster) -> dict:
    """A streamed NATS request whose client closes its connection after the first chunk, with
    no abort; returns that chunk."""
    nc = await nats.connect(cluster.nats.url)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    body = {"model": cluster.model.name, "prompt": prompts(1, 8, 4)[0], "max_tokens": LONG,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    await nc.publish("disagg.v1.completions", json.dumps(body).encode(), reply=inbox)
    first = json.loads((await sub.next_msg(timeout=WAIT_S)).data)
    await nc.close()
    return first


def test_a_nats_client_gone_without_an_abort_is_found_by_a_probe_and_aborted(cluster):
    before, gone = aborts_found(cluster), len(cluster.events("gateway", "nats_client_gone"))
    first = asyncio.run(asyncio.wait_for(vanish_mid_stream(cluster), WAIT_S))
    assert first["choices"]
    wait_until(lambda: len(cluster.events("gateway", "nats_client_gone")) > gone,
               what="the probe finding nobody")  # fmt: skip
    # found=True: the stream was still running on decode (900 tokens), not left to finish.
    wait_until(lambda: aborts_found(cluster) > before, what="the abort on the decode worker")
    assert_decode_pools_full(cluster)


async def malformed_requests(url: str) -> list[dict]:
    """Garbage to every internal request subject and to the public API; the replies."""
    nc = await nats.connect(url)
    subjects = ["disagg.sched.place", "disagg.decode.decode-a.admit",
                "disagg.prefill.prefill-a.job", "disagg.worker.decode-b.abort"]  # fmt: skip
    try:
        replies = []
        for subject in subjects:
            msg = await nc.request(subject, b"\x93\x01\x02", timeout=WAIT_S)
            replies.append(decode_reply(AbortReply, msg.data).error)
        msg = await nc.request("disagg.v1.completions", b"{not json", timeout=WAIT_S)
        return replies + [json.loads(msg.data)["error"]]
    finally:
        await nc.close()


def test_malformed_nats_messages_get_error_replies(cluster):
    *internal, public = asyncio.run(malformed_requests(cluster.nats.url))
    assert all(e.code == 400 and e.message.startswith("malformed") for e in internal)
    assert public["type"] == "invalid_request_error"
    cluster.assert_all_alive()
    assert_decode_pools_full(cluster)


# --- overload ------------------------------------------------------------------------------


def test_overload_is_429_with_retry_after_and_accepted_ones_complete(cluster):
    """The gateway holds 6 requests: 6 long streams fill it, 6 more are refused at once."""
    held = Streams(cluster.base, prompts(6, 8, 3), LONG)
    held.wait_started()
    refused = [completion(cluster.base, {"prompt": [5, 6, 7], "max_tokens": 4}) for _ in range(6)]
    assert {r.status_code for r in refused} == {429}
    assert all(r.headers["retry-after"] == "1" for r in refused)
    assert all(r.json()["error"]["type"] == "rate_limit_error" for r in refused)
    (nats_reply,) = asyncio.run(nats_request(cluster.nats.url, {"prompt": [5, 6], "max_tokens": 2}))
    assert nats_reply["error"]["code"] == "queue_full"
    assert [len(t) for t in held.results()] == [LONG] * 6
    ok = completion(cluster.base, {"prompt": [5, 6, 7], "max_tokens": 4})
    assert ok.status_code == 200
    assert_decode_pools_full(cluster)


async def nats_request(url: str, body: dict) -> list[dict]:
    nc = await nats.connect(url)
    try:
        msg = await nc.request("disagg.v1.completions", json.dumps(body).encode(), timeout=WAIT_S)
        return [json.loads(msg.data)]
    finally:
        await nc.close()


# --- NATS restart --------------------------------------------------------------------------


def test_nats_restart_under_load(cluster):
    """nats-server SIGKILLed mid-stream and restarted on its port: every service reconnects by
    itself, the streams end complete and right (lost chunks make them move), new requests work."""
    ps = prompts(4, 8, 4)
    reference = Streams(cluster.base, ps, LONG).results()
    load = Streams(cluster.base, ps, LONG)
    load.wait_started(5)
    cluster.nats.kill()
    time.sleep(1.5)
    cluster.nats.start()
    assert load.results() == reference
    cluster.assert_all_alive()
    wait_until(lambda: completion(cluster.base, {"prompt": [9, 8], "max_tokens": 3}).status_code
               == 200, what="a new request served after the restart")  # fmt: skip
    assert_decode_pools_full(cluster)


# --- worker deaths -------------------------------------------------------------------------


# Two greedy streams and two seeded sampled ones: a draw depends only on (seed, position),
# and penalties count the tokens generated before the move, so both kinds resume exactly.
SEEDED = {"temperature": 1.0, "top_k": 50, "top_p": 0.95, "min_p": 0.01,
          "presence_penalty": 0.3, "frequency_penalty": 0.2, "repetition_penalty": 1.1}  # fmt: skip
# The last is n = 2: two sequences forked on one decode worker, each moving on its own.
KILL_BODIES = [{}, {"logprobs": 2}, SEEDED | {"seed": 42}, SEEDED | {"seed": 7, "n": 2}]


def test_decode_killed_mid_stream_streams_migrate_with_same_tokens(cluster):
    ps, moved_before = prompts(4, 8, 5), len(cluster.events("gateway", "migrating"))
    uninterrupted = Streams(cluster.base, ps, LONG, KILL_BODIES)
    reference = uninterrupted.results()
    assert reference[2] != reference[3] != uninterrupted.more[3][1]  # the seeds matter
    cluster.freeze_until_gone("decode-b")
    streams = Streams(cluster.base, ps, LONG, KILL_BODIES)
    streams.wait_started(5)
    placed = cluster.events("scheduler", "placed")
    assert {e["decode"] for e in placed if e["request_id"] in streams.ids} == {"decode-a"}
    cluster.freeze("decode-a")  # mid-stream: the four are on it
    frozen_at = time.time()
    cluster.thaw("decode-b")
    cluster.kill("decode-a")
    killed_at = time.time()
    assert streams.results() == reference
    assert streams.more == uninterrupted.more and len(streams.more[3][1]) == LONG
    # Logprobs go on across the move too: every token's equals transformers'.
    ref = hf_logprobs(cluster.model, ps[1], reference[1])
    want = [ref[i, t].item() for i, t in enumerate(reference[1])]
    assert streams.logprobs[1] == pytest.approx(want, abs=1e-4)
    (dead,) = cluster.events("gateway", "worker_dead", worker_id="decode-a")
    moves = cluster.events("gateway", "migrating")[moved_before:]
    assert len(moves) == 5 and all(e["excluded"] == ["decode-a"] for e in moves), moves
    resumed = cluster.events("gateway", "migrated")[-5:]
    print(f"\ndecode death declared {iso_time(dead) - frozen_at:.2f} s after the worker froze "
          f"(3 s after its last heartbeat; {iso_time(dead) - killed_at:.2f} s after SIGKILL); "
          f"streams resumed {max(e['seconds'] for e in resumed):.2f} s after the move")  # fmt: skip
    assert_decode_pools_full(cluster)


def test_prefill_killed_mid_prefill_requests_move_then_none_left_is_503(cluster):
    ps, moved_before = prompts(4, 900, 6), len(cluster.events("gateway", "migrating"))
    cluster.freeze_until_gone("prefill-b")
    placed = len(cluster.events("scheduler", "placed", prefill="prefill-a"))
    streams = Streams(cluster.base, ps, 40)
    wait_until(
        lambda: len(cluster.events("scheduler", "placed", prefill="prefill-a")) >= placed + 4,
        what="placements on prefill-a",
    )
    cluster.freeze("prefill-a")  # mid-prefill: dozens of 64-token steps queued
    cluster.thaw("prefill-b")
    cluster.kill("prefill-a")
    results = streams.results()
    for prompt, tokens in zip(ps, results):
        assert tokens == hf_greedy(cluster.model, prompt, 40)
    moves = cluster.events("gateway", "migrating")[moved_before:]
    assert moves and all("prefill-a" in e["reason"] + str(e["excluded"]) for e in moves)
    assert_decode_pools_full(cluster)
    # No prefill worker left while a request prefills: a clear 503 within the bounds.
    body = {"prompt": prompts(1, 900, 7)[0], "max_tokens": 4, "temperature": 0}
    answer: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answer.append(completion(cluster.base, body)))
    placed = cluster.placed()
    sender.start()
    wait_until(lambda: cluster.placed() > placed, what="placement")
    cluster.freeze("prefill-b")
    sender.join(WAIT_S)
    cluster.thaw("prefill-b")
    (resp,) = answer
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert "no prefill worker" in resp.json()["error"]["message"]
    assert_decode_pools_full(cluster)


# --- graceful shutdown ---------------------------------------------------------------------


def test_sigterm_drains_every_service_and_exits_zero(cluster):
    """Last: SIGTERM the gateway mid-stream (the stream completes, then it exits 0), then the
    scheduler and the workers (each exits 0)."""
    stream = Streams(cluster.base, prompts(1, 8, 8), 300)
    stream.wait_started()
    cluster.children["gateway"].signal(signal.SIGTERM)
    assert len(stream.results()[0]) == 300
    assert cluster.children["gateway"].proc.wait(WAIT_S) == 0
    for name, child in cluster.children.items():
        if child.alive():
            child.signal(signal.SIGTERM)
            assert child.proc.wait(WAIT_S) == 0, f"{name} did not exit 0 on SIGTERM"


# --- security ------------------------------------------------------------------------------

PASSWORD = "pw-Zq81-never-logged"
KEYS = ("key-one-Xv3", "key-two-Pq9")


class SecureUp:
    """`disagg up --mode agg` with NATS credentials and API keys given in its environment."""

    def __init__(self, model: Path, logs: Path) -> None:
        self.port, self.nats_port = free_port(), free_port()
        argv = [*disagg_command(), "up", "--model", str(model), "--mode", "agg",
                "--port", str(self.port), "--nats-port", str(self.nats_port), "--nats-user", "svc",
                "--kv-memory-gb", "0.05", "--block-size", "4", "--log-dir", str(logs)]  # fmt: skip
        env = os.environ | {"DISAGG_NATS_PASSWORD": PASSWORD, "DISAGG_API_KEY": ",".join(KEYS)}
        self.proc = subprocess.Popen(
            argv, env=env | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        ready = threading.Event()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        assert ready.wait(STARTUP_S), "disagg up did not start:\n" + "".join(self.lines[-30:])
        self.pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", "".join(self.lines))]

    def _read(self, ready: threading.Event) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("processes:"):
                ready.set()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(WAIT_S)


def status(method: str, url: str, key: str | None = None, **kw) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    resp = httpx.request(method, url, headers=headers, timeout=WAIT_S, **kw)
    if resp.status_code == 401:
        assert resp.json()["error"]["type"] == "authentication_error"
    return resp.status_code


async def nats_with_and_without_credentials(url: str) -> tuple[dict, bool]:
    refused = False
    try:
        await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)
    except Exception:  # nats-py raises its own errors (or a timeout) for a refused connect
        refused = True
    nc = await nats.connect(url, user="svc", password=PASSWORD)
    try:
        body = {"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}
        msg = await nc.request("disagg.v1.completions", json.dumps(body).encode(), WAIT_S)
        return json.loads(msg.data), refused
    finally:
        await nc.close()


def pool_full(base: str, key: str) -> bool:
    metrics = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {key}"}).text
    free, total = decode_pools(metrics, role="both")
    return bool(total) and free == total


def test_api_keys_and_nats_credentials_end_to_end(checkpoints, tmp_path):
    up = SecureUp(checkpoints(arch="llama"), tmp_path)
    try:
        base, body = up.base, {"prompt": [5, 6, 7], "max_tokens": 3}
        assert status("GET", base + "/health") == 200  # the one open route
        for path in ("/v1/models", "/metrics"):
            assert status("GET", base + path) == 401
            assert status("GET", base + path, "wrong-key") == 401
            assert status("GET", base + path, KEYS[1]) == 200
        assert status("POST", base + "/v1/completions", json=body) == 401
        assert status("POST", base + "/v1/completions", KEYS[0], json=body) == 200
        reply, refused = asyncio.run(nats_with_and_without_credentials(up.nats_url))
        assert refused, "the NATS server let a client in without credentials"
        assert reply["choices"][0]["finish_reason"] == "length"
        # A service without the credentials is refused by NATS: one log line, exit code 1.
        intruder = subprocess.run(
            [*disagg_command(), "scheduler", "--nats", up.nats_url],
            env={k: v for k, v in os.environ.items() if not k.startswith("DISAGG_")},
            capture_output=True, text=True, timeout=WAIT_S,
        )  # fmt: skip
        assert intruder.returncode == 1 and "nats_refused" in intruder.stderr
        wait_until(lambda: pool_full(base, KEYS[0]), what="the worker's pool full")
        secrets = (PASSWORD, *KEYS)
        for pid in up.pids:  # `ps` shows command lines: no secret on them
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            assert not any(s in cmdline for s in secrets)
    finally:
        assert up.stop() == 0
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
    assert "gateway_ready" in logs and "worker_ready" in logs
    assert not any(s in logs + "".join(up.lines) for s in secrets), "a secret was logged"


def make_tls_cert(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def tls_round_trip(url: str, ca: Path) -> bytes:
    nc = await connect_nats(NatsConfig((url,), NatsAuth(tls_ca=ca)), "tls-test")
    try:
        sub = await nc.subscribe("t.echo")
        await nc.publish("t.echo", b"over tls")
        return (await sub.next_msg(timeout=10)).data
    finally:
        await nc.close()


async def refused_without_ca(url: str) -> bool:
    with contextlib.suppress(NatsRefused):
        await asyncio.wait_for(connect_nats(NatsConfig((url,)), "tls-test"), WAIT_S)
        return False
    return True


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_nats_over_tls_with_a_ca_and_refused_without(tmp_path):
    cert, key = make_tls_cert(tmp_path)
    server = NatsServer(args=["--tls", "--tlscert", str(cert), "--tlskey", str(key)]).start()
    try:
        assert asyncio.run(tls_round_trip(server.url, cert)) == b"over tls"
        assert asyncio.run(refused_without_ca(server.url))
    finally:
        server.stop()
