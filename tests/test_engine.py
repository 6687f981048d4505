"""The aggregated engine against Hugging Face transformers, token for token."""

from __future__ import annotations

import msgspec
import pytest
import torch

from disagg.cli.tiny import ARCHS
from disagg.shared.engine.block_pool import BlockPool
from disagg.shared.engine.engine import Engine
from disagg.shared.engine.kv_cache import KVCache
from disagg.shared.engine.request import RequestError
from disagg.shared.engine.scheduler import EngineConfig
from disagg.shared.model.loader import load_model
from disagg.shared.protocol.sampling import SamplingParams
from tests.conftest import assert_greedy_close, assert_pool_full, hf_greedy

BLOCK = 4
# 1 token, under a block, exactly 3 blocks + 1 (> 3 blocks), and 5+ blocks.
PROMPT_LENS = (1, 3, 13, 22)
NEW_TOKENS = 12


def make_engine(path, *, dtype="float32", blocks=64, budget=7, max_seqs=64):
    model = load_model(path, dtype=dtype)
    a = model.args
    cache = KVCache(
        a.num_layers, blocks, BLOCK, a.num_kv_heads, a.head_dim, model.lm_head.weight.dtype
    )
    pool = BlockPool(blocks, BLOCK)
    config = EngineConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    return Engine(model, cache, pool, config), pool


def prompts_for(seed: int, lens=PROMPT_LENS, vocab: int = 380) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]


def run_to_end(engine: Engine, arrivals: dict[int, list[tuple[str, list[int]]]], params):
    """Step the engine; `arrivals[step]` lists requests added before that step."""
    results: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished() or any(k >= step for k in arrivals):
        for rid, prompt in arrivals.get(step, []):
            engine.add_request(rid, prompt, params)
            results[rid] = []
        for out in engine.step():
            results[out.request_id].extend(out.new_token_ids)
        step += 1
        assert step < 10_000
    return results


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers_with_chunking_and_late_arrivals(checkpoints, arch):
    path = checkpoints(arch=arch)
    engine, pool = make_engine(path, budget=7)  # forces several chunks for the long prompts
    early, late = prompts_for(1), prompts_for(2, lens=(9, 1, 17))
    arrivals = {0: [(f"e{i}", p) for i, p in enumerate(early)]}
    arrivals[3] = [(f"l{i}", p) for i, p in enumerate(late)]  # join while others decode
    params = SamplingParams(max_tokens=NEW_TOKENS)
    results = run_to_end(engine, arrivals, params)
    for rid, prompt in [r for reqs in arrivals.values() for r in reqs]:
        assert results[rid] == hf_greedy(path, prompt, NEW_TOKENS), rid
    assert_pool_full(pool)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bf16_greedy_equals_transformers_bf16(checkpoints, arch):
    # Tolerance, and why: teacher-forced, our bf16 logits stay within 1-2 bf16 ulps of
    # transformers' (measured: max |diff| 0.38 at logits ~25, ulp 0.125), so the only divergence
    # accepted is at a bf16 tie (assert_greedy_close); every token before it must be equal.
    path = checkpoints(arch=arch)
    engine, pool = make_engine(path, dtype="bfloat16", budget=64)
    prompts = prompts_for(3, lens=(2, 7, 15))
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    exact = [assert_greedy_close(path, p, out, torch.bfloat16) for p, out in zip(prompts, outs)]
    assert sum(exact) >= 16 * len(prompts) // 2, f"too few exact tokens: {exact}"
    assert_pool_full(pool)


def test_preemption_under_a_tiny_pool_keeps_greedy_output(checkpoints):
    path = checkpoints(arch="llama")
    # 14 blocks of 4 = 56 slots for 4 requests that grow to ~20 tokens each: some get preempted.
    engine, pool = make_engine(path, blocks=14, budget=16)
    prompts = prompts_for(4, lens=(6, 9, 5, 8))
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out == hf_greedy(path, prompt, 12)[: len(out)]
        assert len(out) == 12
    assert_pool_full(pool)


def test_abort_frees_blocks_mid_prefill_and_mid_decode(checkpoints):
    engine, pool = make_engine(checkpoints(arch="qwen2"), budget=5)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    engine.add_request("a", list(range(20)), params)
    engine.add_request("b", list(range(3)), params)
    engine.step()  # "b" waits on the budget, "a" is mid-prefill
    engine.step()
    assert engine.abort("a")
    for _ in range(4):
        engine.step()
    assert engine.abort("b")
    assert not engine.abort("b")
    finals = [o for o in engine.step() if o.finished]
    assert {o.request_id for o in finals} <= {"a", "b"}
    assert not engine.has_unfinished()
    assert_pool_full(pool)


def test_stop_conditions(checkpoints):
    path = checkpoints(arch="qwen3")
    prompt = prompts_for(5, lens=(6,))[0]
    reference = hf_greedy(path, prompt, 8)
    engine, pool = make_engine(path)
    # max_tokens -> "length"
    engine.add_request("len", prompt, SamplingParams(max_tokens=3))
    # the third greedy token as a stop id -> "stop" right there
    engine.add_request("stop", prompt, SamplingParams(max_tokens=8, stop_token_ids=(reference[2],)))
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert [t for o in outs["len"] for t in o.new_token_ids] == reference[:3]
    assert outs["len"][-1].finish_reason == "length"
    stop_ids = [t for o in outs["stop"] for t in o.new_token_ids]
    assert stop_ids == reference[: reference.index(reference[2]) + 1]
    assert outs["stop"][-1].finish_reason == "stop"
    assert_pool_full(pool)


def test_seeded_sampling_repeats_and_differs_across_seeds(checkpoints):
    path = checkpoints(arch="llama")
    engine, pool = make_engine(path)
    prompt = prompts_for(6, lens=(5,))[0]

    def draw(seed):
        return engine.generate(
            [prompt], SamplingParams(max_tokens=10, temperature=5.0, seed=seed, ignore_eos=True)
        )[0]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    greedy = engine.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    # top_k=1 and a vanishing top_p are greedy whatever the temperature.
    k1 = SamplingParams(max_tokens=10, temperature=5.0, top_k=1, seed=3, ignore_eos=True)
    p0 = SamplingParams(max_tokens=10, temperature=5.0, top_p=1e-6, seed=3, ignore_eos=True)
    assert engine.generate([prompt], k1)[0] == greedy
    assert engine.generate([prompt], p0)[0] == greedy
    assert_pool_full(pool)


def test_requests_that_can_never_run_are_refused(checkpoints):
    engine, pool = make_engine(checkpoints(arch="llama"), blocks=8)  # 32 tokens of cache
    params = SamplingParams()
    with pytest.raises(RequestError, match="maximum context length"):
        engine.add_request("long", list(range(40)), params)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("empty", [], params)
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request("vocab", [10**6], params)
    engine.add_request("ok", [1, 2], params)
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("ok", [1, 2], params)
    engine.abort("ok")
    engine.step()
    assert_pool_full(pool)


def test_sampling_params_validation():
    for bad in (
        dict(max_tokens=0),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(temperature=float("nan")),
    ):
        with pytest.raises(ValueError):  # msgspec's ValidationError, on every wire decode
            msgspec.convert(bad, SamplingParams)


def test_layer_callback_sees_a_prompt_whose_last_chunk_is_one_token(checkpoints):
    """A 9-token prompt under an 8-token budget ends with a 1-token chunk: still a prefill."""
    engine, pool = make_engine(checkpoints(arch="llama"), budget=8)
    seen: list[tuple[int, list[str]]] = []
    engine.on_layer = lambda layer, reqs: seen.append((layer, [r.request_id for r in reqs]))
    prompt = prompts_for(7, lens=(9,))[0]
    out = engine.generate([prompt], SamplingParams(max_tokens=3))[0]
    layers = engine.runner.model.args.num_layers
    assert [layer for layer, _ in seen] == list(range(layers))  # once per layer, at completion
    assert out == hf_greedy(checkpoints(arch="llama"), prompt, 3)
    assert_pool_full(pool)


def test_dtype_auto_is_bf16_only_where_the_hardware_runs_it_fast():
    from disagg.shared.engine.dtype import resolve_dtype

    def fast_bf16(dtype):  # e.g. AMX: bf16 matmul 7x fp32
        return 1.4e12 if dtype == torch.bfloat16 else 2e11

    def slow_bf16(dtype):  # e.g. AVX2 only: bf16 emulated
        return 3e10 if dtype == torch.bfloat16 else 2e11

    assert resolve_dtype("auto", "cpu", fast_bf16) == "bfloat16"
    assert resolve_dtype("auto", "cpu", slow_bf16) == "float32"
    assert resolve_dtype("float16", "cpu", fast_bf16) == "float16"  # asked for by name
    assert resolve_dtype("auto", "cpu") in ("bfloat16", "float32")  # this machine, measured
