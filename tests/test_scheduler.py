"""The engine's scheduler alone: no torch, no model. A stand-in "model" samples a token that is a
pure function of the sequence so far, so recomputation after preemption must give the same
tokens, as a real greedy model would. (tests/test_layout.py checks the module imports no torch.)
"""

from __future__ import annotations

import hashlib

import pytest

from disagg.shared.engine.block_pool import BlockPool
from disagg.shared.engine.request import RequestError
from disagg.shared.engine.scheduler import EngineConfig, Scheduler, StepPlan
from disagg.shared.protocol.sampling import SamplingParams
from tests.conftest import assert_pool_full

VOCAB = 50
EOS = 0
BLOCK = 4
STEP_BOUND = 1000


def scheduler(blocks: int = 32, **config) -> Scheduler:
    pool = BlockPool(blocks, BLOCK)
    return Scheduler(
        pool, EngineConfig(**config), vocab_size=VOCAB, eos_token_ids=[EOS], model_max_len=4096
    )


def next_token(tokens: list[int]) -> int:
    """The stand-in model: never EOS, a pure function of the whole sequence."""
    digest = hashlib.blake2b(bytes(tokens), digest_size=2).digest()
    return 1 + int.from_bytes(digest) % (VOCAB - 1)


def fake_model(plan: StepPlan) -> list[int]:
    """Tokens for ``plan.sampled``: each from its sequence up to the position computed now."""
    return [next_token(r.tokens(0, r.num_tokens)) for r in plan.sampled]


def run(sched: Scheduler, plans: list[StepPlan] | None = None) -> dict[str, list[int]]:
    """Step to the end; returns every request's tokens (and records the plans)."""
    out: dict[str, list[int]] = {}
    for _ in range(STEP_BOUND):
        if not sched.has_unfinished():
            return out
        outputs = sched.take_outputs()
        plan = sched.schedule()
        if plan:
            if plans is not None:
                plans.append(plan)
            outputs += sched.update(plan, fake_model(plan))
        for o in outputs:
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    pytest.fail(f"unfinished after {STEP_BOUND} steps")


def expected(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq))
    return seq[len(prompt) :]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_chunked_prefill_under_the_token_budget_then_decode():
    sched = scheduler(max_num_batched_tokens=4)
    prompt = list(range(1, 11))  # 10 tokens: chunks of 4, 4, 2
    sched.add_request("a", prompt, greedy(3))
    plans: list[StepPlan] = []
    assert run(sched, plans) == {"a": expected(prompt, 3)}
    assert [[n for _, n in p.chunks] for p in plans[:3]] == [[4], [4], [2]]
    assert [len(p.completing) for p in plans[:3]] == [0, 0, 1]  # a token only at the last chunk
    assert all(len(p.decodes) == 1 and not p.chunks for p in plans[3:])
    assert len(plans) == 5
    assert_pool_full(sched.pool)


def test_running_decodes_go_first_and_late_arrivals_join_the_batch():
    sched = scheduler(max_num_batched_tokens=6, max_num_seqs=2)
    sched.add_request("a", [1, 2, 3], greedy(6))
    plan = sched.schedule()
    sched.update(plan, fake_model(plan))
    sched.add_request("b", list(range(5, 15)), greedy(2))  # 10 tokens > budget left
    sched.add_request("c", [7], greedy(1))  # over max_num_seqs: waits
    plan = sched.schedule()
    assert [r.request_id for r in plan.decodes] == ["a"]
    assert [(r.request_id, n) for r, n in plan.chunks] == [("b", 5)]  # 6 - 1 decode token
    assert [r.request_id for r in sched.waiting] == ["c"]
    sched.update(plan, fake_model(plan))
    out = run(sched)
    assert out["b"] == expected(list(range(5, 15)), 2) and out["c"] == expected([7], 1)
    assert_pool_full(sched.pool)


def test_preemption_frees_blocks_and_recompute_gives_the_same_tokens():
    prompts = {f"r{i}": [i + 1] * 6 for i in range(3)}
    sched = scheduler(blocks=8, max_num_batched_tokens=64)  # 3 x (6 + 10) tokens need 12 blocks
    for rid, prompt in prompts.items():
        sched.add_request(rid, prompt, greedy(10))
    preempted = []
    original = sched._preempt

    def spy(req):
        preempted.append(req.request_id)
        original(req)

    sched._preempt = spy
    out = run(sched)
    assert preempted, "the pool was meant to be too small for all three at once"
    assert out == {rid: expected(p, 10) for rid, p in prompts.items()}
    assert_pool_full(sched.pool)


def test_stop_conditions():
    sched = scheduler()
    prompt = [3, 4, 5]
    first = expected(prompt, 1)[0]
    sched.add_request("stop-id", prompt, greedy(10, stop_token_ids=[first]))
    sched.add_request("length", prompt, greedy(2))
    outputs = {}
    for _ in range(10):
        plan = sched.schedule()
        if not plan:
            break
        for o in sched.update(plan, fake_model(plan)):
            if o.finished:
                outputs[o.request_id] = o
    assert outputs["stop-id"].finish_reason == "stop" and outputs["stop-id"].num_output_tokens == 1
    assert outputs["length"].finish_reason == "length" and outputs["length"].num_output_tokens == 2
    # EOS stops unless ignore_eos
    sched.add_request("eos", [1], greedy(5))
    sched.add_request("ignore", [1], greedy(3, ignore_eos=True))
    plan = sched.schedule()
    done = {o.request_id: o for o in sched.update(plan, [EOS, EOS])}
    assert done["eos"].finished and done["eos"].finish_reason == "stop"
    assert not done["ignore"].finished
    assert sched.abort("ignore") and not sched.abort("ignore")
    assert_pool_full(sched.pool)


def test_abort_mid_prefill_and_mid_decode_frees_every_block():
    sched = scheduler(max_num_batched_tokens=4)
    sched.add_request("prefilling", list(range(1, 13)), greedy(4))
    plan = sched.schedule()
    sched.update(plan, fake_model(plan))
    assert sched.pool.num_free < sched.pool.num_blocks
    assert sched.abort("prefilling")
    (out,) = sched.take_outputs()
    assert out.finished and out.finish_reason == "abort"
    sched.add_request("decoding", [1, 2], greedy(10))
    for _ in range(3):
        plan = sched.schedule()
        sched.update(plan, fake_model(plan))
    assert sched.abort("decoding")
    assert sched.has_unfinished()  # until its abort output is taken
    (out,) = sched.take_outputs()
    assert out.finish_reason == "abort" and out.num_output_tokens == 3
    assert not sched.has_unfinished()
    assert_pool_full(sched.pool)


def test_a_shared_prefix_is_reused_and_only_the_rest_computed():
    sched = scheduler()
    prefix = list(range(1, 13))  # three full blocks
    sched.add_request("a", prefix + [20], greedy(1))
    run(sched)
    sched.add_request("b", prefix + [21, 22], greedy(2))
    plans: list[StepPlan] = []
    out = run(sched, plans)
    assert out["b"] == expected(prefix + [21, 22], 2)
    assert [n for _, n in plans[0].chunks] == [2]  # 12 cached tokens not recomputed
    assert sched.num_prefill_tokens_computed == 13 + 2
    assert_pool_full(sched.pool)


def test_the_last_prompt_token_is_always_computed():
    sched = scheduler(enable_prefix_caching=True)
    prompt = list(range(1, 9))  # exactly two blocks
    sched.add_request("a", prompt, greedy(1))
    run(sched)
    assert len(sched.cached_prefix(prompt)) == 1  # the block holding the last token is not reused
    assert scheduler(enable_prefix_caching=False).cached_prefix(prompt) == []


def test_add_prefilled_takes_the_blocks_or_leaves_them_with_the_caller():
    sched = scheduler()
    prompt = [1, 2, 3, 4, 5]
    blocks = sched.pool.allocate(2)
    with pytest.raises(RequestError, match="2 blocks hold 5 tokens, got 1"):
        sched.add_prefilled("x", prompt, 7, blocks[:1], greedy(3))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        sched.add_prefilled("x", prompt, VOCAB, blocks, greedy(3))
    assert "x" not in sched.requests  # refused: the caller still owns the blocks
    sched.add_prefilled("x", prompt, 7, blocks, greedy(3))
    out = run(sched)
    assert out["x"] == [7] + expected(prompt + [7], 2)
    assert_pool_full(sched.pool)


def test_forks_wait_for_the_parents_prompt_then_share_its_blocks():
    sched = scheduler(max_num_batched_tokens=6)
    prompt = list(range(1, 15))  # three full blocks and a partial one, prefilled in 3 chunks
    sched.add_request("p", prompt, greedy(3))
    for fork in ("f1", "f2"):
        sched.add_request(fork, prompt, greedy(3), after="p")
    with pytest.raises(RequestError, match="another prompt"):
        sched.add_request("bad", prompt[:-1], greedy(3), after="p")
    plans: list[StepPlan] = []
    out = run(sched, plans)
    assert out == {r: expected(prompt, 3) for r in ("p", "f1", "f2")}
    forks = [(r.request_id, n) for plan in plans for r, n in plan.chunks if r.request_id != "p"]
    assert forks == [("f1", 2), ("f2", 2)]  # only the partial block each; none before "p" done
    assert sched.num_prefill_tokens_computed == 14 + 2 + 2
    assert_pool_full(sched.pool)


def test_a_fork_of_a_parent_that_ends_early_goes_alone_and_an_aborted_fork_frees_nothing():
    sched = scheduler(max_num_batched_tokens=4)
    prompt = list(range(1, 10))
    sched.add_request("p", prompt, greedy(2))
    sched.add_request("f1", prompt, greedy(2), after="p")
    sched.add_request("f2", prompt, greedy(2), after="p")
    plan = sched.schedule()
    sched.update(plan, fake_model(plan))  # "p" mid-prefill: its forks are held
    assert sched.abort("f2") and sched.abort("p")
    assert {o.request_id for o in sched.take_outputs()} == {"f2", "p"}
    assert run(sched) == {"f1": expected(prompt, 2)}  # computed its prompt itself
    assert_pool_full(sched.pool)
    sched.add_request("late", prompt, greedy(1), after="gone")  # unknown parent: plain request
    assert run(sched) == {"late": expected(prompt, 1)}


def test_prompts_that_can_never_run_are_refused():
    sched = scheduler(blocks=4)  # 16 tokens of KV
    for prompt, message in (
        ([], "empty"),
        ([VOCAB], r"\[0, 50\)"),
        (list(range(1, 17)), "maximum context length is 16"),
    ):
        with pytest.raises(RequestError, match=message):
            sched.add_request("r", prompt, greedy(1))
    sched.add_request("r", [1], greedy(1))
    with pytest.raises(RequestError, match="already in use"):
        sched.add_request("r", [1], greedy(1))
    sched.abort("r")
    assert_pool_full(sched.pool)
