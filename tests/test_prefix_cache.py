"""Prefix caching: shared prefixes reuse cached blocks, output stays equal to transformers."""

from __future__ import annotations

import time

import pytest
import torch

from disagg.services.workers.decode import DecodeWorker
from disagg.services.workers.prefill import PrefillJob, PrefillWorker
from disagg.services.workers.runtime import RuntimeConfig, build_runtime
from disagg.shared.sampling import SamplingParams
from disagg.shared.transfer import KVReceiver, KVSender
from tests.conftest import assert_pool_full, hf_greedy
from tests.test_engine import make_engine

BLOCK = 4


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(0, 380, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_one(engine, rid: str, prompt: list[int], n: int = 8):
    engine.add_request(rid, prompt, SamplingParams(max_tokens=n, ignore_eos=True))
    out, cached = [], 0
    while engine.has_unfinished():
        for o in engine.step():
            out += o.new_token_ids
            cached = o.num_cached_tokens
    return out, cached


def test_second_request_reuses_the_shared_prefix(checkpoints):
    path = checkpoints(arch="qwen3")
    engine, pool = make_engine(path, blocks=64, budget=64)
    prefix = tokens(0, 13)  # 3 full blocks + 1
    a, b = prefix + tokens(1, 6), prefix + tokens(2, 3)
    out_a, cached_a = run_one(engine, "a", a)
    out_b, cached_b = run_one(engine, "b", b)
    assert cached_a == 0 and cached_b == 12  # the 3 full blocks of the shared prefix
    assert out_a == hf_greedy(path, a, 8) and out_b == hf_greedy(path, b, 8)
    # The whole of `a` again: everything but its last block-and-token comes from the cache.
    out_a2, cached_a2 = run_one(engine, "a2", a)
    assert out_a2 == out_a and cached_a2 == (len(a) - 1) // BLOCK * BLOCK
    assert_pool_full(pool)


def test_generated_blocks_are_cached_too(checkpoints):
    path = checkpoints(arch="llama")
    engine, pool = make_engine(path, blocks=64, budget=64)
    prompt = tokens(3, 5)
    out, _ = run_one(engine, "first", prompt, n=12)
    follow_up = prompt + out  # a chat turn that continues the same text
    out2, cached = run_one(engine, "second", follow_up, n=4)
    assert cached == (len(follow_up) - 1) // BLOCK * BLOCK
    assert out2 == hf_greedy(path, follow_up, 4)
    assert_pool_full(pool)


def test_evictions_keep_output_exact(checkpoints):
    path = checkpoints(arch="mistral")
    engine, pool = make_engine(path, blocks=12, budget=64)  # 48 token slots: constant eviction
    prefix = tokens(4, 12)
    base, _ = run_one(engine, "base", prefix + [7, 8])
    for i in range(5):  # unrelated prompts push the prefix out of the cache
        run_one(engine, f"noise{i}", tokens(10 + i, 20))
    again, cached = run_one(engine, "again", prefix + [7, 8])
    assert again == base == hf_greedy(path, prefix + [7, 8], 8)
    assert cached < 12  # at least part of it was evicted
    pool.check_integrity()
    assert_pool_full(pool)


def test_both_roles_cache_and_disagg_output_is_unchanged(checkpoints):
    """Prefill reuses its cached prefix and still ships every block; decode's output is exact."""
    path = checkpoints(arch="llama")
    cfg = RuntimeConfig(model=path, num_blocks=64, block_size=BLOCK)
    p_rt, d_rt = build_runtime(cfg), build_runtime(cfg)
    sender, receiver = KVSender(p_rt.fingerprint), KVReceiver("127.0.0.1")
    try:
        prefill = PrefillWorker(p_rt.engine, sender)
        decode = DecodeWorker(d_rt.engine, receiver, fingerprint=d_rt.fingerprint)
        prefix = tokens(5, 16)
        for i, suffix in enumerate((tokens(6, 3), tokens(7, 5))):
            prompt, params = prefix + suffix, SamplingParams(max_tokens=6, ignore_eos=True)
            transfer = decode.admit(f"r{i}", prompt, params)
            prefill.submit(PrefillJob(f"r{i}", prompt, params, transfer))
            out = drive(prefill, decode, f"r{i}")
            assert out == hf_greedy(path, prompt, 6)
        # the second prompt's prefix came from prefill's own cache
        assert p_rt.pool.stats()["cached"] > 0
        assert_pool_full(d_rt.pool)
        assert_pool_full(p_rt.pool)
    finally:
        sender.close()
        receiver.close()


def drive(prefill: PrefillWorker, decode: DecodeWorker, rid: str, timeout: float = 60.0):
    out: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while True:
        if time.monotonic() >= deadline:
            pytest.fail("request did not finish")
        if prefill.has_work():
            prefill.step()
            prefill.poll_sent()
        for o in decode.step():
            out.update({o.index + i: t for i, t in enumerate(o.new_token_ids)})
            if o.finished and o.request_id == rid:
                return [out[i] for i in sorted(out)]
        time.sleep(0.001)
