"""Prefix caching: shared prefixes reuse cached blocks, output stays equal to transformers."""

from __future__ import annotations

import time

import pytest
import torch

from disagg.services.workers.decode import AdmitError, DecodeWorker
from disagg.services.workers.prefill import PrefillJob, PrefillWorker
from disagg.shared.engine.request import RequestError
from disagg.shared.engine.runtime import RuntimeConfig, build_runtime
from disagg.shared.protocol.descriptor import TransferDescriptor
from disagg.shared.protocol.sampling import SamplingParams
from disagg.shared.transfer.sockets import KVReceiver, KVSender
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
    cfg = RuntimeConfig(dtype="float32", model=path, num_blocks=64, block_size=BLOCK)
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
        assert p_rt.pool.num_cached > 0
        assert_pool_full(d_rt.pool)
        assert_pool_full(p_rt.pool)
    finally:
        sender.close()
        receiver.close()


def drive(
    prefill: PrefillWorker, decode: DecodeWorker, rid: str, timeout: float = 60.0, stats=None
):
    """Run the pair until `rid` finishes; its output tokens. With `stats` (a dict), also record
    `stats[rid] = (decode's cached tokens, prefill's cached tokens)` and return
    (tokens, transfers sent meanwhile)."""
    out: dict[int, int] = {}
    sent, prefill_cached = [], 0
    deadline = time.monotonic() + timeout
    while True:
        if time.monotonic() >= deadline:
            pytest.fail("request did not finish")
        if prefill.has_work():
            for result in prefill.step():
                prefill_cached = result.num_cached_tokens
            sent += prefill.poll_sent()
        for o in decode.step():
            out.update({o.index + i: t for i, t in enumerate(o.new_token_ids)})
            if o.finished and o.request_id == rid:
                tokens_out = [out[i] for i in sorted(out)]
                if stats is None:
                    return tokens_out
                while prefill.has_work():  # the done frame left before decode could finish
                    prefill.step()
                    sent += prefill.poll_sent()
                stats[rid] = (o.num_cached_tokens, prefill_cached)
                return tokens_out, sent
        time.sleep(0.001)


def test_decode_held_prefix_ships_only_the_suffix(checkpoints):
    """A prompt whose prefix is cached on its decode worker: decode reserves only the suffix's
    blocks and the prefill worker ships only those, whether it has the prefix cached itself
    (computes only the suffix) or not (recomputes the prefix, still ships only the suffix)."""
    path = checkpoints(arch="llama")
    cfg = RuntimeConfig(dtype="float32", model=path, num_blocks=64, block_size=BLOCK)
    warm_rt, cold_rt, d_rt = build_runtime(cfg), build_runtime(cfg), build_runtime(cfg)
    senders = [KVSender(warm_rt.fingerprint), KVSender(cold_rt.fingerprint)]
    receiver = KVReceiver("127.0.0.1")
    try:
        warm, cold = (PrefillWorker(rt.engine, s) for rt, s in zip((warm_rt, cold_rt), senders))
        decode = DecodeWorker(d_rt.engine, receiver, fingerprint=d_rt.fingerprint)
        prefix = tokens(8, 17)  # 4 full blocks + 1 token
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        sent: dict[str, int] = {}
        cached: dict[str, tuple[int, int]] = {}

        def serve(rid: str, prompt: list[int], prefill: PrefillWorker) -> list[int]:
            transfer = decode.admit(rid, prompt, params)
            prefill.submit(PrefillJob(rid, prompt, params, transfer))
            out, first = drive(prefill, decode, rid, stats=cached)
            sent[rid] = sum(t.stats.payload_bytes for t in first)
            return out

        first = prefix + tokens(9, 3)
        assert serve("first", first, warm) == hf_greedy(path, first, 6)
        for seed, rid, prefill in ((10, "warm", warm), (11, "cold", cold)):
            prompt = prefix + tokens(seed, 6)
            assert serve(rid, prompt, prefill) == hf_greedy(path, prompt, 6)
        # 5 blocks for "first"; then 4 blocks of the prefix stay on decode, 2 of 6 are shipped.
        block_bytes = sent["first"] // 5
        assert sent["warm"] == sent["cold"] == 2 * block_bytes
        # Decode reports the 16 prefix tokens it held; only the warm prefill skipped compute.
        assert cached["warm"] == (16, 16) and cached["cold"] == (16, 0)
        assert cached["first"] == (0, 0)
        for rt in (warm_rt, cold_rt, d_rt):
            assert_pool_full(rt.pool)
    finally:
        for endpoint in (*senders, receiver):
            endpoint.close()


def test_prefill_refuses_a_transfer_that_does_not_end_at_the_prompt(checkpoints):
    rt = build_runtime(
        RuntimeConfig(dtype="float32", model=checkpoints(arch="llama"), num_blocks=16, block_size=4)
    )
    sender = KVSender(rt.fingerprint)
    try:
        prefill = PrefillWorker(rt.engine, sender)
        prompt, params = tokens(12, 9), SamplingParams(max_tokens=1)  # 3 blocks
        for first_block, n in ((1, 1), (0, 2), (2, 2)):
            transfer = TransferDescriptor.new(
                address="tcp://127.0.0.1:1", block_ids=list(range(n)), block_size=4,
                num_layers=rt.engine.kv_cache.num_layers, wire_dtype="float32",
                model_fingerprint=rt.fingerprint, deadline_s=5.0, first_block=first_block,
            )  # fmt: skip
            with pytest.raises(RequestError, match="do not end with the prompt's last block"):
                prefill.submit(PrefillJob(f"r{first_block}{n}", prompt, params, transfer))
        assert not prefill.has_work()
        assert_pool_full(rt.pool)
    finally:
        sender.close()


def test_decode_held_prefix_is_released_on_abort_failure_and_refusal(checkpoints):
    """Every way out of a pending admit gives back the shared prefix blocks as well as the new
    ones; the prefix stays cached for the next request."""
    path = checkpoints(arch="llama")
    rt = build_runtime(RuntimeConfig(dtype="float32", model=path, num_blocks=12, block_size=BLOCK))
    receiver = KVReceiver("127.0.0.1")
    try:
        decode = DecodeWorker(rt.engine, receiver, fingerprint=rt.fingerprint)
        prefix = tokens(13, 16)
        run_one(rt.engine, "warm", prefix + tokens(14, 2), n=1)  # caches 4 prefix blocks
        params = SamplingParams(max_tokens=4)
        transfer = decode.admit("a", prefix + tokens(15, 3), params)
        assert transfer.first_block == 4 and len(transfer.block_ids) == 1
        assert decode.abort("a")
        transfer = decode.admit("b", prefix + tokens(16, 3), params)
        assert transfer.first_block == 4
        assert decode.fail_transfers_from("nobody") == 0
        decode.receiver.cancel(transfer.transfer_id)
        decode._fail(transfer.transfer_id, "test: the prefill worker died")
        decode.admit("x", tokens(18, 20), params)  # 5 blocks held
        with pytest.raises(AdmitError, match="no room"):  # 4 cached + 7 new, 3 free
            decode.admit("c", prefix + tokens(17, 25), params)
        assert decode.abort("x")
        assert_pool_full(rt.pool)
        assert len(rt.engine.scheduler.cached_prefix(prefix + [1])) == 4  # still cached
    finally:
        receiver.close()
