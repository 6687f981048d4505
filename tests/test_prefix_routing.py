"""Prefix-aware placement and conditional disaggregation, end to end with real processes.

One cluster: a scheduler (local-prefill threshold 32 tokens, prefix weight 0.25), prefill-a,
decode-a, decode-b and a gateway. Workers report their cached block hashes in heartbeats; the
test reads the same heartbeats over NATS to know when the scheduler can have seen a prefix.
"""

from __future__ import annotations

import asyncio
import random
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import nats
import pytest

from disagg.shared.engine.block_pool import prefix_block_hashes
from disagg.shared.protocol.codec import decode
from disagg.shared.protocol.messages import Heartbeat
from disagg.shared.protocol.subjects import Subjects
from tests.cluster import GATEWAY_FLAGS, WAIT_S, Cluster, assert_decode_pools_full, wait_until
from tests.conftest import hf_greedy

pytestmark = pytest.mark.slow
BLOCK = 4
THRESHOLD = 32
WORKER = ("--kv-memory-gb", "0.05", "--block-size", str(BLOCK))


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints(arch="llama")


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    workers = {
        "prefill-a": ("prefill", *WORKER),
        "decode-a": ("decode", *WORKER),
        "decode-b": ("decode", *WORKER),
    }
    scheduler = ("--local-prefill-threshold", str(THRESHOLD), "--prefix-weight", "0.25")
    gateway = (*GATEWAY_FLAGS, "--max-concurrent-requests", "16")
    c = Cluster(
        model,
        tmp_path_factory.mktemp("prefix-logs"),
        workers,
        scheduler_flags=scheduler,
        gateway_flags=gateway,
    )
    yield c
    c.stop()


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 380) for _ in range(n)]


def complete(cluster: Cluster, prompt: list[int], max_tokens: int = 4) -> tuple[list[int], dict]:
    """A greedy completion: its token ids and usage, plus its placement as `usage["placed"]`."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    resp = httpx.post(cluster.base + "/v1/completions", json=body, timeout=WAIT_S)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    (placed,) = cluster.events("scheduler", "placed", request_id=data["id"])
    return data["choices"][0]["token_ids"], data["usage"] | {"placed": placed}


def where(usage: dict) -> tuple[str, str | None]:
    return usage["placed"]["decode"], usage["placed"]["prefill"]


def cached(usage: dict) -> int:
    return usage["prompt_tokens_details"]["cached_tokens"]


def metric(cluster: Cluster, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", cluster.metrics(), re.M)
    return float(found.group(1)) if found else 0.0


def transfers(cluster: Cluster) -> tuple[float, float]:
    """(KV transfers reported, their bytes) from the gateway's metrics."""
    count = metric(cluster, "disagg:kv_transfer_bytes_count")
    return count, metric(cluster, "disagg:kv_transfer_bytes_sum")


def wait_transfers(cluster: Cluster, count: float) -> tuple[float, float]:
    """Transfer reports travel apart from the tokens: wait until `count` have arrived."""
    wait_until(lambda: transfers(cluster)[0] >= count, what=f"{count} transfer reports")
    return transfers(cluster)


def wait_cached(cluster: Cluster, worker: str, prompt: list[int]) -> None:
    """Until two heartbeats of `worker` listing the last full block of `prompt` went by (the
    scheduler, subscribed to the same subject, has then seen at least the first)."""
    want = prefix_block_hashes(prompt, BLOCK)[-1]

    async def watch() -> None:
        nc = await nats.connect(cluster.nats.url)
        seen, done = 0, asyncio.Event()

        async def on_beat(msg) -> None:
            nonlocal seen
            hb = decode(Heartbeat, msg.data)
            if hb.worker_id == worker and want in hb.prefix_hashes:
                seen += 1
                if seen >= 2:
                    done.set()

        await nc.subscribe(Subjects().heartbeat, cb=on_beat)
        try:
            await asyncio.wait_for(done.wait(), WAIT_S)
        finally:
            await nc.close()

    asyncio.run(watch())


def test_prefix_routing_and_conditional_disaggregation(cluster, model):
    p1, p2 = tokens(1, 160), tokens(2, 160)  # 40 blocks each
    a1, a2 = p1 + tokens(11, 8), p2 + tokens(12, 8)

    # A1 and A2 together (long and uncached: prefilled remotely); the burst spreads them.
    with ThreadPoolExecutor(2) as pool:
        (out1, u1), (out2, u2) = pool.map(lambda p: complete(cluster, p, 32), (a1, a2))
    (holder1, prefill1), (holder2, prefill2) = where(u1), where(u2)
    assert holder1 != holder2 and prefill1 == prefill2 == "prefill-a"
    assert out1 == hf_greedy(model, a1, 32) and out2 == hf_greedy(model, a2, 32)
    wait_cached(cluster, holder1, p1)
    wait_cached(cluster, holder2, p2)
    count, nbytes = wait_transfers(cluster, 2)
    per_block = nbytes / count / 42  # both prompts were shipped whole: 42 blocks each

    # B1, B2: each shared prefix goes back to the worker holding it (both are idle: without
    # prefix routing both would go to decode-a). 8 uncached tokens < THRESHOLD: decode
    # prefills them itself on top of its cached 160.
    for prefix, holder, seed in ((p1, holder1, 21), (p2, holder2, 22)):
        b = prefix + tokens(seed, 8)
        out, usage = complete(cluster, b)
        assert where(usage) == (holder, None) and cached(usage) == 160
        assert out == hf_greedy(model, b, 4)
    assert transfers(cluster)[0] == count  # conditional disaggregation: nothing shipped

    # 48 uncached tokens go through prefill, which ships only the suffix's 12 blocks.
    c = p1 + tokens(31, 48)
    out, usage = complete(cluster, c)
    assert where(usage) == (holder1, "prefill-a") and cached(usage) == 160
    assert out == hf_greedy(model, c, 4)
    count, nbytes2 = wait_transfers(cluster, count + 1)
    assert nbytes2 - nbytes == pytest.approx(12 * per_block)

    # Short uncached prompts are prefilled where they decode; long ones are shipped.
    short, long = tokens(41, 10), tokens(42, 100)
    out, usage = complete(cluster, short)
    assert where(usage)[1] is None and cached(usage) == 0
    assert out == hf_greedy(model, short, 4)
    assert transfers(cluster)[0] == count
    out, usage = complete(cluster, long)
    assert where(usage)[1] == "prefill-a"
    assert out == hf_greedy(model, long, 4)
    wait_transfers(cluster, count + 1)

    hits = metric(cluster, "disagg:prefix_cache_hits_total")
    queries = metric(cluster, "disagg:prefix_cache_queries_total")
    assert hits >= 3 * 160 and queries > hits
    assert_decode_pools_full(cluster)


def test_a_loaded_holder_loses_its_prefix_past_the_cost_threshold(cluster):
    """Long streams sharing p3 pile onto the worker holding it until its load outweighs the
    prefix bonus (0.25 x 160/168 here): then the next one goes to the other worker."""
    p3 = tokens(3, 160)
    _, usage = complete(cluster, p3 + tokens(50, 8))
    holder = where(usage)[0]
    wait_cached(cluster, holder, p3)
    placed: list[str] = []
    with ThreadPoolExecutor(8) as pool:
        streams = []
        for i in range(8):
            before = len(cluster.events("scheduler", "placed"))
            streams.append(pool.submit(complete, cluster, p3 + tokens(60 + i, 8), 300))
            wait_until(lambda b=before: len(cluster.events("scheduler", "placed")) > b,
                       what=f"stream {i} placed")  # fmt: skip
            placed.append(cluster.events("scheduler", "placed")[before]["decode"])
            if placed[-1] != holder:
                break
        for stream in streams:
            stream.result(WAIT_S)
    assert placed[0] == holder, placed
    assert placed[-1] != holder and len(placed) >= 2, placed
    assert_decode_pools_full(cluster)
