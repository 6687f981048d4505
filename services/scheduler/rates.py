"""P:D rate matching, measured: notice when prefill falls behind while decode has room, and
estimate the P:D ratio to run (``disagg.shared.rates``, which the planner shares), from the
heartbeats' cumulative counters. Pure, as ``placement``.
"""

from __future__ import annotations

from collections import deque

from disagg.services.scheduler.placement import decode_pressure
from disagg.shared.cluster import WorkerTable
from disagg.shared.protocol.types import Role
from disagg.shared.rates import MAX_SAMPLES, PhaseRates, RateEstimator

__all__ = ["PhaseRates", "QueueTrend", "RateEstimator", "is_prefill_bound", "queued_prefill_tokens"]


# --- prefill-bound -------------------------------------------------------------------------------


class QueueTrend:
    """Total queued prefill tokens sampled over the last ``window_s`` (the shell adds one
    sample a second)."""

    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque(maxlen=MAX_SAMPLES)

    def add(self, now: float, queued_tokens: int) -> None:
        self._samples.append((now, queued_tokens))
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def rising(self) -> bool:
        """The queue grew over the window and never emptied in it (an emptied queue kept up);
        False until the samples span half the window."""
        if len(self._samples) < 3:
            return False
        (first_at, first), (last_at, last) = self._samples[0], self._samples[-1]
        if last_at - first_at < self.window_s / 2:
            return False
        return last > first and min(q for _, q in self._samples) > 0


def queued_prefill_tokens(table: WorkerTable) -> int:
    """Prompt tokens waiting on the live, non-draining dedicated prefill workers (as the table
    estimates them: placements not yet in their heartbeats included)."""
    prefills = [s for s in table.alive(Role.PREFILL) if s.report.role == Role.PREFILL]
    return sum(s.report.queued_prefill_tokens for s in prefills)


def is_prefill_bound(table: WorkerTable, trend: QueueTrend, held: int, watermark: float) -> bool:
    """Prefill is the bottleneck: its queues keep growing while decode has room (nothing is
    held and decode KV usage is under the watermark)."""
    if held or not table.alive(Role.DECODE):
        return False
    return trend.rising() and decode_pressure(table) < watermark
