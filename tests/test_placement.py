"""Unit tests of the scheduler core: worker table from synthetic heartbeats, and placement."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.services.scheduler.placement import (
    NoCapacityError,
    NoWorkerError,
    PlaceDecision,
    PlaceInput,
    PlacementError,
    PlacementPolicy,
    PromptTooLongError,
    decode_cost,
    decode_pressure,
    note_placed,
    place,
    should_hold_prefill,
)
from disagg.shared.cluster import WorkerTable
from disagg.shared.protocol.codec import encode
from disagg.shared.protocol.messages import Heartbeat

POLICY = PlacementPolicy()


def report(worker_id: str, role: str = "decode", **fields) -> Heartbeat:
    base = dict(
        worker_id=worker_id,
        role=role,
        zmq_address=f"tcp://{worker_id}:5555",
        model="tiny",
        fingerprint="fp0",
        block_size=16,
        total_blocks=100,
        free_blocks=100,
        running=0,
        waiting=0,
        queued_prefill_tokens=0,
        max_model_len=4096,
        prefix_hashes=[],
        sent_at=0.0,
        draining=False,
    )
    return Heartbeat(**{**base, **fields})


def table_of(*reports: Heartbeat, now: float = 0.0) -> WorkerTable:
    table = WorkerTable()
    for r in reports:
        table.update(r, now)
    return table


def prefill() -> Heartbeat:
    return report("p", "prefill")


def ids(states) -> list[str]:
    return [s.worker_id for s in states]


# --- reports and the table ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"role": "router"}, "role"),
        ({"free_blocks": 101}, "free_blocks"),
        ({"block_size": 0}, "block_size"),
        ({"running": -1}, "running"),
        ({"worker_id": ""}, "worker_id"),
    ],
)
def test_bad_report_raises(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode(report(**{"worker_id": "w", **fields}))


def test_dead_after_three_missed_beats_not_before() -> None:
    table = table_of(report("d0"), report("d1"))
    table.update(report("d1"), 2.5)
    assert table.expire(3.0) == []  # exactly three intervals silent: still alive
    assert table.expire(3.01) == ["d0"]
    assert ids(table.alive("decode")) == ["d1"] and table.get("d0") is None
    assert table.expire(5.5) == [] and table.expire(5.51) == ["d1"]
    assert len(table) == 0


def test_timeout_follows_interval_and_missed_beats() -> None:
    table = WorkerTable(heartbeat_interval_s=0.5, missed_beats=4)
    table.update(report("d0"), 10.0)
    assert table.expire(12.0) == [] and table.expire(12.001) == ["d0"]
    with pytest.raises(ValueError, match="missed_beats"):
        WorkerTable(missed_beats=0)


def test_new_beat_revives_an_expired_worker_with_fresh_state() -> None:
    table = table_of(report("d0", prefix_hashes=[7]))
    assert table.expire(4.0) == ["d0"]
    with pytest.raises(NoWorkerError):
        place(table, PlaceInput(10), POLICY)
    table.update(report("d0", free_blocks=40), 4.5)
    table.update(prefill(), 4.5)
    assert "d0" in table and table.get("d0").report.free_blocks == 40
    assert table.get("d0").prefix_overlap([7]) == 0  # the new beat's (empty) summary replaces it
    assert place(table, PlaceInput(10), POLICY).decode_id == "d0"


def test_role_filtering_both_serves_either_role() -> None:
    table = table_of(report("p", "prefill"), report("d", "decode"), report("b", "both"))
    assert ids(table.alive("prefill")) == ["b", "p"]
    assert ids(table.alive("decode")) == ["b", "d"]
    with pytest.raises(ValueError, match="role"):
        table.alive("both")


def test_draining_is_excluded_from_placement_but_still_tracked() -> None:
    best = report("d0", free_blocks=100)
    table = table_of(
        msgspec.structs.replace(best, draining=True), report("d1", free_blocks=10), prefill()
    )
    assert ids(table.alive("decode")) == ["d1"]
    assert table.get("d0") is not None and table.get("d0").report.draining
    assert place(table, PlaceInput(10), POLICY).decode_id == "d1"


# --- the decode cost model ----------------------------------------------------------------------


def test_decode_cost_terms() -> None:
    table = table_of(report("d", total_blocks=100, free_blocks=60, running=6, waiting=2))
    w = table.get("d")
    # usage: (40 used + 2 needed) / 100; load: 8 / (8 + 8); cached: 1 block * 16 / 31 tokens
    expected = 1.0 * 0.42 + 1.0 * 0.5 - 0.5 * (16 / 31)
    assert decode_cost(w, 31, 1, POLICY) == pytest.approx(expected)
    only_prefix = PlacementPolicy(kv_weight=0, load_weight=0, prefix_weight=2.0)
    assert decode_cost(w, 16, 1, only_prefix) == pytest.approx(-2.0)


def test_bad_policy_raises() -> None:
    with pytest.raises(ValueError, match="prefix_weight"):
        PlacementPolicy(prefix_weight=-1)
    with pytest.raises(ValueError, match="load_scale"):
        PlacementPolicy(load_scale=0)


# --- decode choice ------------------------------------------------------------------------------


def test_decode_prefers_free_blocks_then_fewer_running() -> None:
    table = table_of(report("a", free_blocks=30), report("b", free_blocks=80), prefill())
    assert place(table, PlaceInput(10), POLICY).decode_id == "b"
    table = table_of(report("a", running=5), report("b", running=2), prefill())
    assert place(table, PlaceInput(10), POLICY).decode_id == "b"


def test_prefix_overlap_is_the_deepest_chained_hit() -> None:
    # Hashes are chained: holding block i's hash means holding the prefix up to i, even when a
    # truncated summary (newest hashes first) left out the shallower ones.
    x, y, z = report("x", prefix_hashes=[3]), report("y", prefix_hashes=[1, 2]), report("z")
    table = table_of(x, y, z, report("w", prefix_hashes=[7, 8]))
    assert table.get("x").prefix_overlap([1, 2, 3]) == 3
    assert table.get("y").prefix_overlap([1, 2, 3]) == 2
    assert table.get("z").prefix_overlap([1, 2, 3]) == 0
    assert table.get("w").prefix_overlap([1, 2, 3]) == 0


@pytest.mark.parametrize(("running", "winner"), [(7, "cached"), (9, "idle")])
def test_prefix_overlap_wins_until_load_flips_it(running: int, winner: str) -> None:
    # A full hit is worth prefix_weight 0.5; load reaches 0.5 at load_scale = 8 requests.
    hashes = [11, 12, 13, 14]
    table = table_of(
        report("cached", prefix_hashes=hashes, running=running),
        report("idle", prefix_hashes=[99]),
        prefill(),
    )
    assert place(table, PlaceInput(64, hashes), POLICY).decode_id == winner


def test_ties_break_by_free_blocks_running_then_id_whatever_the_order() -> None:
    same = [report(w) for w in ("w2", "w0", "w1")]
    for order in (same, same[::-1]):
        assert place(table_of(*order, prefill()), PlaceInput(10), POLICY).decode_id == "w0"
    # Equal cost with free blocks and running traded off: more free blocks wins the tie.
    zero_kv = PlacementPolicy(kv_weight=0, load_weight=0)
    table = table_of(report("a", free_blocks=10), report("b", free_blocks=20, running=3), prefill())
    assert place(table, PlaceInput(10), zero_kv).decode_id == "b"


def test_excluded_workers_are_never_chosen() -> None:
    table = table_of(
        report("d0"), report("d1", free_blocks=5), report("p0", "prefill"),
        report("p1", "prefill", queued_prefill_tokens=1000),
    )  # fmt: skip
    assert place(table, PlaceInput(10), POLICY) == PlaceDecision("d0", "p0")
    decision = place(table, PlaceInput(10, exclude=frozenset({"d0", "p0"})), POLICY)
    assert decision == PlaceDecision("d1", "p1")


def test_no_decode_worker_raises_no_worker_decode() -> None:
    with pytest.raises(NoWorkerError) as err:
        place(table_of(report("p", "prefill")), PlaceInput(10), POLICY)
    assert err.value.role == "decode"
    with pytest.raises(NoWorkerError, match="decode"):
        place(table_of(report("d"), report("p", "prefill")), PlaceInput(10, exclude={"d"}), POLICY)


def test_decode_only_without_prefill_raises_no_worker_prefill() -> None:
    with pytest.raises(NoWorkerError) as err:
        place(table_of(report("d")), PlaceInput(10), POLICY)
    assert err.value.role == "prefill"
    table = table_of(report("d"), report("p", "prefill", draining=True))
    with pytest.raises(NoWorkerError, match="prefill"):
        place(table, PlaceInput(10), POLICY)


def test_no_capacity_when_no_decode_worker_fits_the_prompt() -> None:
    # 31 prompt tokens + 1 generated = 2 blocks of 16; 32 + 1 needs 3.
    table = table_of(
        report("d0", free_blocks=2), report("d1", free_blocks=1), report("p", "prefill")
    )
    assert place(table, PlaceInput(31), POLICY).decode_id == "d0"
    policy = PlacementPolicy(retry_after_s=2.5)
    with pytest.raises(NoCapacityError) as err:
        place(table, PlaceInput(32), policy)
    assert err.value.blocks_needed == 3 and err.value.retry_after_s == 2.5


def test_prompt_no_worker_could_ever_hold_is_too_long_not_retryable() -> None:
    table = table_of(report("d", max_model_len=64, total_blocks=100), report("p", "prefill"))
    assert place(table, PlaceInput(63), POLICY).decode_id == "d"
    with pytest.raises(PromptTooLongError) as err:
        place(table, PlaceInput(64), POLICY)
    assert err.value.max_prompt_len == 63 and not isinstance(err.value, NoCapacityError)
    small_pool = table_of(report("d", total_blocks=4, free_blocks=4), report("p", "prefill"))
    with pytest.raises(PromptTooLongError):
        place(small_pool, PlaceInput(64), POLICY)  # 65 tokens never fit 4 blocks of 16


def test_model_filter() -> None:
    table = table_of(
        report("d0", model="other"), report("d1", free_blocks=1), report("p", "prefill")
    )
    assert place(table, PlaceInput(10), POLICY).decode_id == "d0"
    assert place(table, PlaceInput(10, model="tiny"), POLICY).decode_id == "d1"
    with pytest.raises(NoWorkerError):
        place(table, PlaceInput(10, model="missing"), POLICY)


# --- prefill choice -----------------------------------------------------------------------------


def test_prefill_by_queued_tokens_then_running_then_id() -> None:
    decode = report("d")
    table = table_of(
        decode,
        report("p0", "prefill", queued_prefill_tokens=500),
        report("p1", "prefill", queued_prefill_tokens=100, running=2),
        report("p2", "prefill", queued_prefill_tokens=100, running=1),
        report("p3", "prefill", queued_prefill_tokens=100, running=1),
    )
    assert place(table, PlaceInput(10), POLICY).prefill_id == "p2"


def test_prefill_must_match_decode_fingerprint_and_block_size() -> None:
    # d0 looks best but no prefill worker can push KV into it.
    table = table_of(
        report("d0", fingerprint="other"),
        report("d1", free_blocks=10),
        report("p0", "prefill", block_size=32),
        report("p1", "prefill", queued_prefill_tokens=999),
    )
    assert place(table, PlaceInput(10), POLICY) == PlaceDecision("d1", "p1")
    lonely = table_of(report("d0", fingerprint="other"), report("p0", "prefill"))
    with pytest.raises(NoWorkerError, match="prefill"):
        place(lonely, PlaceInput(10), POLICY)


def test_both_worker_prefills_locally_without_dedicated_prefill() -> None:
    table = table_of(report("b0", "both"), report("b1", "both", free_blocks=10))
    assert place(table, PlaceInput(10), POLICY) == PlaceDecision("b0", None)
    table.update(report("p", "prefill"), 0.0)
    assert place(table, PlaceInput(10), POLICY) == PlaceDecision("b0", "p")


def test_a_both_worker_prefills_itself_when_the_prefill_worker_is_further_behind() -> None:
    policy = PlacementPolicy()
    busy_p = table_of(report("b", "both"), report("p", "prefill", queued_prefill_tokens=500))
    assert place(busy_p, PlaceInput(100), policy) == PlaceDecision("b", None)
    busy_b = table_of(report("b", "both", queued_prefill_tokens=500),
                      report("p", "prefill", queued_prefill_tokens=200))  # fmt: skip
    assert place(busy_b, PlaceInput(100), policy) == PlaceDecision("b", "p")
    even = table_of(report("b", "both"), report("p", "prefill"))
    assert place(even, PlaceInput(100), policy) == PlaceDecision("b", "p")  # a tie: dedicated


def test_a_both_worker_never_prefills_for_a_decode_only_worker() -> None:
    # It runs no prefill-job endpoint: "d", with no dedicated prefill worker, is unreachable,
    # and the prompt goes where it can be prefilled, however little room is left there.
    table = table_of(report("d", free_blocks=100), report("b", "both", free_blocks=1))
    assert place(table, PlaceInput(10), POLICY) == PlaceDecision("b", None)


@pytest.mark.parametrize(
    ("prompt_len", "cached_blocks", "local"),
    [(99, 0, True), (100, 0, False), (130, 2, True), (132, 2, False)],
)
def test_conditional_disaggregation_on_uncached_tokens(
    prompt_len: int, cached_blocks: int, local: bool
) -> None:
    hashes = list(range(1, 9))
    policy = PlacementPolicy(local_prefill_threshold_tokens=100)
    # "p" caches the same prefix: only the threshold decides (not who has less to compute).
    cached = hashes[:cached_blocks]
    table = table_of(
        report("b", "both", prefix_hashes=cached), report("p", "prefill", prefix_hashes=cached)
    )
    decision = place(table, PlaceInput(prompt_len, hashes), policy)
    assert decision == PlaceDecision("b", None if local else "p")


def test_threshold_lets_a_decode_only_worker_prefill_short_prompts() -> None:
    # Conditional disaggregation: a short uncached part is prefilled where it is decoded.
    policy = PlacementPolicy(local_prefill_threshold_tokens=64)
    table = table_of(report("d"), report("p", "prefill"))
    assert place(table, PlaceInput(10), policy) == PlaceDecision("d", None)
    assert place(table, PlaceInput(64), policy) == PlaceDecision("d", "p")
    # Uncached is what counts: 96 of 100 tokens cached on "d" leave 4 to compute.
    cached = table_of(report("d", prefix_hashes=list(range(6))), report("p", "prefill"))
    assert place(cached, PlaceInput(100, list(range(6))), policy) == PlaceDecision("d", None)
    # With no prefill worker at all, short prompts are still served, long ones are not.
    alone = table_of(report("d"))
    assert place(alone, PlaceInput(10), policy) == PlaceDecision("d", None)
    with pytest.raises(NoWorkerError):
        place(alone, PlaceInput(100), policy)


def test_prefill_choice_counts_its_queue_plus_what_it_must_compute() -> None:
    # "p1" has the prompt's first 96 tokens cached: 4 to compute behind a 50-token queue beats
    # "p2"'s 100 behind an empty one; past 96 queued tokens the idle one wins.
    hashes = list(range(6))
    p1 = report("p1", "prefill", prefix_hashes=hashes, queued_prefill_tokens=50)
    table = table_of(report("d"), p1, report("p2", "prefill"))
    assert place(table, PlaceInput(100, hashes), POLICY).prefill_id == "p1"
    busy = msgspec.structs.replace(p1, queued_prefill_tokens=97)
    table = table_of(report("d"), busy, report("p2", "prefill"))
    assert place(table, PlaceInput(100, hashes), POLICY).prefill_id == "p2"
    # Hashes made at another block size match nothing.
    other = PlaceInput(100, hashes, hash_block_size=8)
    table = table_of(report("d"), p1, report("p2", "prefill"))
    assert place(table, other, POLICY).prefill_id == "p2"
    assert place(table, dataclasses.replace(other, hash_block_size=16), POLICY).prefill_id == "p1"
    # Prefix-blind placement (for comparisons) sees only the queues.
    blind = dataclasses.replace(POLICY, prefix_routing=False)
    table = table_of(report("d"), p1, report("p2", "prefill"))
    assert place(table, PlaceInput(100, hashes), blind).prefill_id == "p2"


# --- rate matching ------------------------------------------------------------------------------


def test_decode_pressure_and_hold() -> None:
    table = table_of(
        report("d0", total_blocks=100, free_blocks=20),
        report("b", "both", total_blocks=100, free_blocks=60),
        report("d1", total_blocks=100, free_blocks=0, draining=True),
        report("p", "prefill", total_blocks=100, free_blocks=0),
    )
    assert decode_pressure(table) == pytest.approx(0.6)
    assert should_hold_prefill(table, 0.6) and not should_hold_prefill(table, 0.61)
    assert decode_pressure(table_of(report("p", "prefill"))) == 1.0
    with pytest.raises(ValueError, match="watermark"):
        should_hold_prefill(table, 0.0)


# --- property -----------------------------------------------------------------------------------

worker_strategy = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["prefill", "decode", "both"]),
        "total_blocks": st.integers(0, 40),
        "free_frac": st.floats(0, 1),
        "running": st.integers(0, 20),
        "waiting": st.integers(0, 5),
        "queued_prefill_tokens": st.integers(0, 2000),
        "block_size": st.sampled_from([8, 16]),
        "fingerprint": st.sampled_from(["fp0", "fp1"]),
        "max_model_len": st.sampled_from([128, 4096]),
        "prefix_len": st.integers(0, 6),
        "draining": st.booleans(),
    }
)


def _build(specs: list[dict]) -> WorkerTable:
    table = WorkerTable()
    for i, s in enumerate(specs):
        r = report(
            f"w{i}",
            s["role"],
            total_blocks=s["total_blocks"],
            free_blocks=int(s["total_blocks"] * s["free_frac"]),
            running=s["running"],
            waiting=s["waiting"],
            queued_prefill_tokens=s["queued_prefill_tokens"],
            block_size=s["block_size"],
            fingerprint=s["fingerprint"],
            max_model_len=s["max_model_len"],
            prefix_hashes=list(range(s["prefix_len"])),
            draining=s["draining"],
        )
        table.update(r, 0.0)
    return table


@settings(max_examples=300, deadline=None)
@given(
    specs=st.lists(worker_strategy, min_size=0, max_size=6),
    prompt_len=st.integers(1, 300),
    exclude=st.sets(st.integers(0, 5)),
    threshold=st.sampled_from([0, 64]),
)
def test_property_placement_is_always_valid(
    specs: list[dict], prompt_len: int, exclude: set[int], threshold: int
) -> None:
    table = _build(specs)
    request = PlaceInput(prompt_len, list(range(6)), frozenset(f"w{i}" for i in exclude))
    usable = [s for s in table.alive("decode") if s.worker_id not in request.exclude]
    policy = PlacementPolicy(local_prefill_threshold_tokens=threshold)

    def uncached(s) -> int:
        return max(0, prompt_len - s.prefix_overlap(request.prefix_hashes) * s.report.block_size)

    def self_prefills(s) -> bool:
        return s.can_prefill or uncached(s) < threshold

    try:
        decision = place(table, request, policy)
    except PlacementError as err:
        if isinstance(err, NoWorkerError):
            # A worker that prefills for itself never lacks a prefill worker.
            assert not (usable if err.role == "decode" else [s for s in usable if self_prefills(s)])
        if isinstance(err, NoCapacityError | PromptTooLongError):
            assert not any(s.blocks_for(prompt_len) <= s.report.free_blocks
                           and prompt_len < s.report.max_model_len
                           and self_prefills(s) for s in usable)  # fmt: skip
        return
    decode = table.get(decision.decode_id)
    assert decode is not None and decode.can_decode and not decode.report.draining
    assert decode.worker_id not in request.exclude
    assert decode.blocks_for(prompt_len) <= decode.report.free_blocks
    assert prompt_len < decode.report.max_model_len
    if decision.prefill_id is None:
        assert self_prefills(decode)
        return
    assert uncached(decode) >= threshold
    prefill = table.get(decision.prefill_id)
    assert prefill is not None and prefill.can_prefill and not prefill.report.draining
    assert prefill.worker_id not in request.exclude and prefill.worker_id != decode.worker_id
    assert prefill.report.fingerprint == decode.report.fingerprint
    assert prefill.report.block_size == decode.report.block_size


def test_a_burst_within_one_heartbeat_spreads_over_decode_workers():
    table = WorkerTable()
    for worker_id in ("d1", "d2"):
        table.update(report(worker_id, role="decode"), now=0.0)
    table.update(report("p1", role="prefill"), now=0.0)
    chosen = []
    for _ in range(6):
        decision = place(table, PlaceInput(prompt_len=10), PlacementPolicy())
        note_placed(table, decision, 10)
        chosen.append(decision.decode_id)
    assert chosen.count("d1") == 3 and chosen.count("d2") == 3
    # the next heartbeat replaces the estimate with the worker's own numbers
    table.update(report("d1", role="decode"), now=1.0)
    assert table.get("d1").report.running == report("d1", role="decode").running
