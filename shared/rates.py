"""Per-phase rates of the workers from the heartbeats' cumulative counters (prompt tokens
computed, tokens sampled, busy seconds), over a sliding window: what the scheduler's P:D ratio
and the planner's worker counts are computed from. Pure: no I/O, no clock of its own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from disagg.shared.protocol.messages import Heartbeat

MAX_SAMPLES = 4096  # per worker in a rate window: a bound whatever the heartbeat rate


@dataclass(frozen=True)
class _Sample:
    at: float
    prefill_tokens: int
    sampled_tokens: int
    busy_s: float
    queued_prefill_tokens: int


@dataclass(frozen=True)
class PhaseRates:
    """One phase over the window, summed over its workers.

    ``tokens`` done, ``busy_s`` spent computing, ``demand_tps`` tokens per wall second (for
    prefill: computed plus queue growth, i.e. what arrived).
    """

    workers: int
    tokens: float
    busy_s: float
    demand_tps: float
    # This phase's tokens per wall second done by aggregated ("both") workers, apart: their
    # busy time mixes both phases, so they measure no capacity (the planner adds this demand).
    shared_demand_tps: float = 0.0

    @property
    def capacity_tps(self) -> float | None:
        """Tokens one worker does per busy second; None without busy time."""
        return self.tokens / self.busy_s if self.busy_s > 0 and self.tokens > 0 else None

    @property
    def workers_needed(self) -> float | None:
        """Workers' worth of work: demand over per-worker capacity."""
        capacity = self.capacity_tps
        return None if capacity is None else self.demand_tps / capacity


class RateEstimator:
    """Per-phase rates from the deltas of heartbeat counters over the last ``window_s``.

    Prefill side: workers of role "prefill", counting ``prefill_tokens`` (prompt tokens
    computed, cache hits excluded). Decode side: role "decode", counting ``sampled_tokens``.
    Aggregated ("both") workers do both in one step and count on neither side.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.window_s = window_s
        self._history: dict[str, tuple[str, deque[_Sample]]] = {}  # id -> (role, samples)

    def observe(self, report: Heartbeat, now: float) -> None:
        """Record a heartbeat's counters (the raw report, before any scheduler estimate)."""
        sample = _Sample(
            now,
            report.prefill_tokens,
            report.sampled_tokens,
            report.busy_s,
            report.queued_prefill_tokens,
        )
        role, samples = self._history.get(report.worker_id, (report.role, deque()))
        if role != report.role or (samples and _went_back(samples[-1], sample)):
            samples = deque()  # restarted under the same id: its counters began again
        samples.append(sample)
        while len(samples) > MAX_SAMPLES or now - samples[0].at > self.window_s:
            samples.popleft()
        self._history[report.worker_id] = (report.role, samples)

    def forget(self, worker_id: str) -> None:
        """A worker died or left: its rates no longer count."""
        self._history.pop(worker_id, None)

    def phase(self, role: str, now: float) -> PhaseRates:
        """Rates of the ``role`` ("prefill" or "decode") workers heard from in the window."""
        tokens = busy = demand = shared = 0.0
        workers = 0
        for worker_role, samples in self._history.values():
            recent = [s for s in samples if now - s.at <= self.window_s]
            if (
                worker_role not in (role, "both")
                or len(recent) < 2
                or recent[-1].at <= recent[0].at
            ):
                continue
            first, last = recent[0], recent[-1]
            done = _done(role, first, last)
            arrived = done
            if role == "prefill":
                arrived += last.queued_prefill_tokens - first.queued_prefill_tokens
            rate = max(0.0, arrived) / (last.at - first.at)
            if worker_role == "both":
                shared += rate
                continue
            workers += 1
            tokens += done
            busy += last.busy_s - first.busy_s
            demand += rate
        return PhaseRates(workers, tokens, busy, demand, shared)

    def ratio(self, now: float) -> float | None:
        """Recommended prefill workers per decode worker, from the rates measured in the window.

        ``ratio = (Dp / Cp) / (Dd / Cd)`` where, over the window,
        Dp = prompt tokens arriving at prefill per wall second (computed + queue growth),
        Cp = prompt tokens one prefill worker computes per busy second,
        Dd = tokens sampled by decode workers per wall second,
        Cd = tokens one decode worker samples per busy second.
        Each quotient is the number of fully busy workers the phase's load needs.

        Caveats: Cd depends on the decode batch size (a step costs about the same for 1 or
        32 sequences), so Cd measured at low load understates capacity under high load and
        the ratio leans toward decode; Cp depends on prompt length and prefix-cache hits.
        Dd counts what decode served: while placements are held decode is the bottleneck and
        Dd understates its demand (watch the held-requests metric). Decode workers that
        prefill locally (conditional disaggregation) count that time as decode busy time.
        None until both phases did work with measurable busy time in the window.
        """
        prefill, decode = self.phase("prefill", now), self.phase("decode", now)
        p_needed, d_needed = prefill.workers_needed, decode.workers_needed
        if p_needed is None or d_needed is None or d_needed <= 0:
            return None
        return p_needed / d_needed


def _done(role: str, first: _Sample, last: _Sample) -> int:
    if role == "prefill":
        return last.prefill_tokens - first.prefill_tokens
    return last.sampled_tokens - first.sampled_tokens


def _went_back(before: _Sample, after: _Sample) -> bool:
    return (
        after.prefill_tokens < before.prefill_tokens
        or after.sampled_tokens < before.sampled_tokens
        or after.busy_s < before.busy_s
    )
