"""How many prefill and decode workers to run, from measured load and the SLOs. No I/O.

Each tick the shell hands ``Planner.observe`` the scheduler's signals (``Signals``: per-phase
rates over a window, the prefill queue, decode KV usage, held placements) and gets the desired
counts back (``Decision``). The need of each phase:

- **prefill**: busy workers' worth of arriving prompt tokens (``PhaseRates.workers_needed``)
  sized for ``--target-utilization``; and enough to drain the queued prompt tokens within half
  the TTFT SLO at the measured per-worker rate.
- **decode**: the same utilization rule on sampled tokens; the inter-token latency a worker
  gives at its batch (``running / tokens-per-busy-second``) kept under the ITL SLO; and one
  more while placements are held or KV usage is above ``--kv-high-watermark``.

The budget (``--max-workers``) caps the sum. When both needs do not fit and one phase is light
(at most half a worker's worth), aggregated ("both") workers carry it: for long outputs every
worker is "both" (each decodes and prefills its own prompts: an aggregated worker never
prefills for another), for long prompts one "both" worker decodes and the rest prefill.
Otherwise the budget is shared in proportion to the needs, at least one each.
A "both" worker's work counts toward each phase's demand; capacities come from dedicated
workers (the last measured when none runs). Changes are damped: more workers are granted at
once (a violated SLO costs now), fewer only after the lower need held
``--scale-down-after-s`` and, computed at a lower utilization (the hysteresis band), still
fits, one worker at a time; no two changes within ``--cooldown-s``. Steady load therefore
gives steady counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from disagg.shared.config import option
from disagg.shared.rates import PhaseRates

DOWN_BAND = 0.15  # utilization below the target a smaller count must reach to be chosen
LIGHT = 0.5  # busy workers' worth a phase may need and still ride on a "both" worker
UNMEASURED = "not measured"
Action = Literal["hold", "scale_up", "scale_down", "rebalance"]
Counts = tuple[int, int, int]  # prefill, decode, both


@dataclass(frozen=True)
class PlannerPolicy:
    """SLOs, budget and damping of the planner; its fields are flags."""

    ttft_slo_ms: float = option(2000.0, help="time-to-first-token objective")
    itl_slo_ms: float = option(200.0, help="inter-token latency objective")
    max_workers: int = option(2, help="worker budget: prefill + decode workers at most")
    target_utilization: float = option(0.7, help="busy fraction each worker is sized for")
    kv_high_watermark: float = option(0.85, help="decode KV usage that asks for one more")
    scale_down_after_s: float = option(30.0, help="a lower need holds this long before a removal")
    cooldown_s: float = option(10.0, help="at least this long between two changes")

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"--{f.name.replace('_', '-')} must be positive")
        if self.max_workers < 2:
            raise ValueError("--max-workers must be >= 2 (one prefill, one decode)")
        if not DOWN_BAND < self.target_utilization <= 1.0:
            raise ValueError(f"--target-utilization must be in ({DOWN_BAND}, 1]")
        if self.kv_high_watermark > 1.0:
            raise ValueError("--kv-high-watermark must be <= 1")


@dataclass(frozen=True)
class Signals:
    """What the planner sees at ``now`` (live, non-draining dedicated workers only)."""

    now: float
    prefill: PhaseRates
    decode: PhaseRates
    prefill_workers: int
    decode_workers: int
    both_workers: int = 0
    queued_prefill_tokens: int = 0
    decode_running: int = 0  # sequences in the decode workers' batches
    decode_kv_usage: float = 0.0
    held: int = 0  # placements waiting for decode room


@dataclass(frozen=True)
class Decision:
    prefill: int
    decode: int
    action: Action
    reason: str
    both: int = 0  # aggregated workers (each serves both phases)

    @property
    def counts(self) -> Counts:
        return (self.prefill, self.decode, self.both)


@dataclass(frozen=True)
class Need:
    prefill: int
    decode: int
    why: str
    both: int = 0

    @property
    def counts(self) -> Counts:
        return (self.prefill, self.decode, self.both)


def capacity(counts: Counts) -> tuple[int, int]:
    """Workers serving (prefill, decode): a "both" worker serves either."""
    return counts[0] + counts[2], counts[1] + counts[2]


class Planner:
    """Desired worker counts, damped; starts from the first counts it observes."""

    def __init__(self, policy: PlannerPolicy = PlannerPolicy()) -> None:
        self.policy = policy
        self.desired: Counts | None = None
        self._changed_at = -math.inf
        self._lower_since: float | None = None
        self._capacity: dict[str, float] = {}  # per phase, last measured (tokens/busy s)

    def need(self, s: Signals, utilization: float | None = None) -> Need:
        """Each phase's worker need at ``utilization`` (default: the target), in the budget."""
        util = utilization or self.policy.target_utilization
        (p, p_busy), p_why = self._prefill_need(s, util)
        (d, d_busy), d_why = self._decode_need(s, util)
        if p_why == d_why == UNMEASURED:  # nothing to go by: keep the shape that runs
            return Need(s.prefill_workers, s.decode_workers, UNMEASURED, s.both_workers)
        counts = self._shape(p, d, p_busy, d_busy)
        why = f"prefill {p} ({p_why}), decode {d} ({d_why})"
        return Need(*counts[:2], why, counts[2])

    def observe(self, s: Signals) -> Decision:
        """The desired counts after this tick."""
        if self.desired is None:
            self.desired = self._start(s)
        need = self.need(s)
        want = need.counts
        if want == self.desired:
            self._lower_since = None
            return self._decision("hold", need.why)
        if s.now - self._changed_at < self.policy.cooldown_s:
            return self._decision("hold", f"cooldown; wants {want}")
        wanted, held = capacity(want), capacity(self.desired)
        if wanted[0] > held[0] or wanted[1] > held[1]:  # an SLO is at stake now
            grown = self.desired[:2] + (0,)
            grown = (max(want[0], grown[0]), max(want[1], grown[1]), want[2])
            target = grown if sum(grown) <= self.policy.max_workers and not want[2] else want
            action = "scale_up" if sum(target) > sum(self.desired) else "rebalance"
            return self._change(target, s.now, action, need.why)
        return self._maybe_lower(s, need)

    def _maybe_lower(self, s: Signals, need: Need) -> Decision:
        self._lower_since = s.now if self._lower_since is None else self._lower_since
        if s.now - self._lower_since < self.policy.scale_down_after_s:
            return self._decision("hold", f"lower need for {s.now - self._lower_since:.0f} s")
        band = self.need(s, self.policy.target_utilization - DOWN_BAND)
        p, d, b = self.desired
        if band.both or b:  # a change of shape: to the band's counts, whole
            lower = band.counts
            if any(n > h for n, h in zip(capacity(lower), capacity(self.desired), strict=True)):
                return self._decision("hold", "within the hysteresis band")
        else:
            lower = (p - (band.prefill < p), d - (band.decode < d), 0)
        if lower == self.desired:  # inside the hysteresis band: keep what runs
            return self._decision("hold", "within the hysteresis band")
        action = "scale_down" if sum(lower) < sum(self.desired) else "rebalance"
        return self._change(lower, s.now, action, band.why)

    def _start(self, s: Signals) -> Counts:
        p, d, b = s.prefill_workers, s.decode_workers, s.both_workers
        if b and p + d + b <= self.policy.max_workers:
            return (p, d, b)
        fitted = self._fit(max(1, p), max(1, d))
        return (*fitted, 0)

    def _change(self, counts: Counts, now: float, action: Action, why: str) -> Decision:
        self.desired, self._changed_at, self._lower_since = counts, now, None
        return self._decision(action, why)

    def _decision(self, action: Action, reason: str) -> Decision:
        p, d, b = self.desired
        return Decision(p, d, action, reason, b)

    def _shape(self, p: int, d: int, p_busy: float, d_busy: float) -> Counts:
        """Dedicated counts when they fit; else the light phase on one "both" worker."""
        budget = self.policy.max_workers
        if p + d <= budget:
            return (p, d, 0)
        if p_busy <= LIGHT < d_busy:  # every worker decodes; prompts prefill where they decode
            return (0, 0, budget)
        if d_busy <= LIGHT < p_busy:  # one decodes (and prefills too), the rest prefill
            return (budget - 1, 0, 1)
        return (*self._fit(p, d), 0)

    def _rate(self, phase: str, rates: PhaseRates) -> tuple[float | None, float | None]:
        """(busy workers' worth of demand, per-worker capacity): the capacity measured now or,
        with no dedicated worker of the phase, last; demand includes "both" workers' share."""
        measured = rates.capacity_tps
        if measured is not None:
            self._capacity[phase] = measured
        cap = self._capacity.get(phase)
        demand = rates.demand_tps + rates.shared_demand_tps
        if cap is None or (measured is None and not rates.shared_demand_tps):
            return None, cap
        return demand / cap, cap

    def _prefill_need(self, s: Signals, util: float) -> tuple[tuple[int, float], str]:
        """((workers, busy workers' worth), why) for prefill."""
        workers = max(1, s.prefill_workers + s.both_workers)
        needed, cap = self._rate("prefill", s.prefill)
        if needed is None:  # nothing measured in the window: keep what runs
            return (workers, 1.0), UNMEASURED
        n, why = math.ceil(needed / util), f"{needed:.2f} busy"
        if s.queued_prefill_tokens and cap:
            drain_s = self.policy.ttft_slo_ms / 1000 / 2
            queue_n = math.ceil(s.queued_prefill_tokens / (cap * drain_s))
            if queue_n > n:
                n, why, needed = queue_n, f"{s.queued_prefill_tokens} tokens queued", queue_n
        return (max(1, n), needed), why

    def _decode_need(self, s: Signals, util: float) -> tuple[tuple[int, float], str]:
        """((workers, busy workers' worth), why) for decode."""
        workers = max(1, s.decode_workers + s.both_workers)
        needed, cap = self._rate("decode", s.decode)
        if needed is None:
            n, why, needed = workers, UNMEASURED, 1.0
        else:
            n, why = max(1, math.ceil(needed / util)), f"{needed:.2f} busy"
        if cap and s.decode_running:
            itl_s = s.decode_running / workers / cap  # a step serves the whole batch
            itl_n = math.ceil(workers * itl_s / (self.policy.itl_slo_ms / 1000 * util))
            if itl_n > n:
                n, why, needed = (
                    itl_n,
                    f"ITL {itl_s * 1000:.0f} ms at batch {s.decode_running}",
                    itl_n,
                )
        if s.held or s.decode_kv_usage > self.policy.kv_high_watermark:
            n, why = max(n, workers + 1), f"{s.held} held, KV {s.decode_kv_usage:.0%}"
            needed = max(needed, n)
        return (max(1, n), needed), why

    def _fit(self, p: int, d: int) -> tuple[int, int]:
        """(p, d) within the budget, shared in proportion to the needs, at least one each."""
        budget = self.policy.max_workers
        if p + d <= budget:
            return p, d
        p = min(budget - 1, max(1, round(budget * p / (p + d))))
        return p, budget - p
