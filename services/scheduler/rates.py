"""P:D rate matching, the scheduler's pure side: hold placements while decode memory is short,
notice when prefill falls behind while decode has room, and estimate the P:D ratio to run.

No sockets, no asyncio, no clock: every method that depends on time takes ``now`` (the shell's
monotonic seconds), as in ``placement``.

Holding. A placement that would overrun decode (``place`` finds no decode worker with the
blocks, or decode KV usage is at or above ``HoldPolicy.watermark``) waits in a bounded FIFO
instead of failing; the shell re-checks it on every heartbeat (free blocks only change there)
and on a timer (for ``max_hold_s``). Held requests are answered in arrival order: a request
that arrives while others wait queues behind them even if it would fit, so a long prompt is
never starved by short ones. Past ``max_hold_s`` (or with the queue full) the answer is the
429 it would have been without holding.

Counting placements. A heartbeat can be sent after a placement but before the gateway's admit
reached the decode worker; trusting it would hand the same blocks out twice and the second admit
would be refused. So every placement stays counted against its workers (``note_placed``) for
``confirm_s`` on top of each new heartbeat. A heartbeat that already shows the admit then counts
it twice for a moment, so a hold may last up to ``confirm_s`` longer than needed; an admit that
takes longer than ``confirm_s`` to show may still be refused (the gateway then retries it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from disagg.services.scheduler.placement import (
    NoCapacityError,
    PlaceDecision,
    PlaceInput,
    PlacementError,
    PlacementPolicy,
    WorkerReport,
    WorkerTable,
    decode_pressure,
    place,
    should_hold_prefill,
)

T = TypeVar("T")

MAX_SAMPLES = 4096  # per worker in a rate window: a bound whatever the heartbeat rate
HOLD_WATERMARK = "watermark"
HOLD_NO_CAPACITY = "no_capacity"
HOLD_BEHIND = "behind_held"  # others wait already: arrival order


class HoldRefusedError(PlacementError):
    """A placement that could not wait for decode room: the hold queue was full, or it waited
    ``max_hold_s`` in vain (HTTP 429 with ``Retry-After``)."""

    def __init__(self, message: str, reason: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.reason = reason  # "full" | "timeout"
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class HoldPolicy:
    """When placements wait for decode room, and for how long.

    ``max_held`` 0 or ``max_hold_s`` 0 turns holding off: placement fails at once (429) when
    decode has no room, as without rate matching, and the watermark is not applied.
    """

    watermark: float = 0.9  # decode KV usage (0, 1] at which placements wait
    max_held: int = 256  # placements waiting at once; beyond, 429
    max_hold_s: float = 20.0  # longest wait; keep it below the gateway's --place-timeout-s
    confirm_s: float = 1.0  # a placement counts on top of heartbeats this long (one beat)

    def __post_init__(self) -> None:
        if not 0.0 < self.watermark <= 1.0:
            raise ValueError(f"watermark must be in (0, 1], got {self.watermark}")
        for name in ("max_held", "max_hold_s", "confirm_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def enabled(self) -> bool:
        return self.max_held > 0 and self.max_hold_s > 0


@dataclass(frozen=True)
class Answer(Generic[T]):
    """The outcome of one placement request: ``held_s`` None when it was answered on arrival."""

    item: T
    request: PlaceInput
    outcome: PlaceDecision | PlacementError
    held_s: float | None = None


@dataclass(frozen=True)
class Submitted(Generic[T]):
    """What ``submit`` did: the answers ready now (earlier held ones included) and, when the new
    request was held, why (``HOLD_WATERMARK``, ``HOLD_NO_CAPACITY`` or ``HOLD_BEHIND``)."""

    answers: list[Answer[T]]
    held_reason: str | None = None


@dataclass(frozen=True)
class _Held(Generic[T]):
    item: T
    request: PlaceInput
    since: float


@dataclass(frozen=True)
class _Unconfirmed:
    decision: PlaceDecision
    prompt_len: int
    at: float


@dataclass
class HoldCounters:
    """Cumulative since the scheduler started (the stats message carries them)."""

    holds: int = 0  # requests ever held
    released: int = 0  # held requests answered with a placement
    timeouts: int = 0  # held requests refused after max_hold_s
    overflows: int = 0  # requests refused because the hold queue was full
    hold_seconds: float = 0.0  # summed over requests that left the queue


class PlacementGate(Generic[T]):
    """``place`` behind decode back-pressure; ``T`` is whatever the shell needs to answer a
    request later (its NATS message). Each call returns the answers that are ready; the shell
    sends them in order."""

    def __init__(self, policy: PlacementPolicy, hold: HoldPolicy) -> None:
        self.policy, self.hold = policy, hold
        self.counters = HoldCounters()
        self._queue: deque[_Held[T]] = deque()
        self._unconfirmed: deque[_Unconfirmed] = deque()

    @property
    def held(self) -> int:
        return len(self._queue)

    def submit(self, table: WorkerTable, item: T, request: PlaceInput, now: float) -> Submitted[T]:
        """A new request: placed, refused, or held behind the requests already waiting."""
        answers = self.release(table, now)
        reason = HOLD_BEHIND if self._queue else None  # FIFO: no overtaking
        if reason is None:
            outcome = self._try(table, request, now)
            if not isinstance(outcome, str):
                return Submitted([*answers, Answer(item, request, outcome)])
            reason = outcome
        if len(self._queue) >= self.hold.max_held:
            self.counters.overflows += 1
            message = f"{len(self._queue)} placements already wait for decode KV room"
            refused = HoldRefusedError(message, "full", self.policy.retry_after_s)
            return Submitted([*answers, Answer(item, request, refused)])
        self._queue.append(_Held(item, request, now))
        self.counters.holds += 1
        return Submitted(answers, reason)

    def release(self, table: WorkerTable, now: float) -> list[Answer[T]]:
        """Refuse the requests held past ``max_hold_s``, then place held ones in arrival order
        while decode has room. Call after each heartbeat and on a timer."""
        answers = self._expire(now)
        while self._queue:
            head = self._queue[0]
            outcome = self._try(table, head.request, now)
            if isinstance(outcome, str):
                break
            self._queue.popleft()
            if isinstance(outcome, PlaceDecision):
                self.counters.released += 1
            answers.append(self._leave(head, outcome, now))
        return answers

    def cancel_all(self, error: PlacementError, now: float) -> list[Answer[T]]:
        """Answer every held request with ``error`` (the shell is stopping)."""
        answers = [self._leave(h, error, now) for h in self._queue]
        self._queue.clear()
        return answers

    def after_heartbeat(self, table: WorkerTable, worker_id: str, now: float) -> None:
        """Call right after ``worker_id``'s heartbeat replaced its report: count again the
        placements made less than ``confirm_s`` ago, which the report may not show yet."""
        self._forget_confirmed(now)
        for p in self._unconfirmed:
            decision = p.decision
            if worker_id in (decision.decode_id, decision.prefill_id):
                # note_placed skips ids the table does not know: "" / None leave a side out
                only = PlaceDecision(
                    decode_id=decision.decode_id if decision.decode_id == worker_id else "",
                    prefill_id=decision.prefill_id if decision.prefill_id == worker_id else None,
                )
                table.note_placed(only, p.prompt_len)

    def _forget_confirmed(self, now: float) -> None:
        while self._unconfirmed and now - self._unconfirmed[0].at >= self.hold.confirm_s:
            self._unconfirmed.popleft()

    def _try(
        self, table: WorkerTable, request: PlaceInput, now: float
    ) -> PlaceDecision | PlacementError | str:
        """A placement (counted into the table), an error to answer with, or why to hold."""
        try:
            decision = place(table, request, self.policy)
        except NoCapacityError as err:
            return HOLD_NO_CAPACITY if self.hold.enabled else err
        except PlacementError as err:
            return err
        if self.hold.enabled and should_hold_prefill(table, self.hold.watermark):
            return HOLD_WATERMARK
        table.note_placed(decision, request.prompt_len)
        self._forget_confirmed(now)
        self._unconfirmed.append(_Unconfirmed(decision, request.prompt_len, now))
        return decision

    def _expire(self, now: float) -> list[Answer[T]]:
        answers = []
        while self._queue and now - self._queue[0].since >= self.hold.max_hold_s:
            head = self._queue.popleft()
            self.counters.timeouts += 1
            message = f"no decode KV room within {self.hold.max_hold_s:g} s"
            refused = HoldRefusedError(message, "timeout", self.policy.retry_after_s)
            answers.append(self._leave(head, refused, now))
        return answers

    def _leave(
        self, held: _Held[T], outcome: PlaceDecision | PlacementError, now: float
    ) -> Answer[T]:
        held_s = max(0.0, now - held.since)
        self.counters.hold_seconds += held_s
        return Answer(held.item, held.request, outcome, held_s)


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
    prefills = [s for s in table.alive("prefill") if s.report.role == "prefill"]
    return sum(s.report.queued_prefill_tokens for s in prefills)


def is_prefill_bound(table: WorkerTable, trend: QueueTrend, held: int, watermark: float) -> bool:
    """Prefill is the bottleneck: its queues keep growing while decode has room (nothing is
    held and decode KV usage is under the watermark)."""
    if held or not table.alive("decode"):
        return False
    return trend.rising() and decode_pressure(table) < watermark


# --- recommended P:D ratio -----------------------------------------------------------------------


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

    def observe(self, report: WorkerReport, now: float) -> None:
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
        tokens = busy = demand = 0.0
        workers = 0
        for worker_role, samples in self._history.values():
            recent = [s for s in samples if now - s.at <= self.window_s]
            if worker_role != role or len(recent) < 2 or recent[-1].at <= recent[0].at:
                continue
            first, last = recent[0], recent[-1]
            done = _done(role, first, last)
            arrived = done
            if role == "prefill":
                arrived += last.queued_prefill_tokens - first.queued_prefill_tokens
            workers += 1
            tokens += done
            busy += last.busy_s - first.busy_s
            demand += max(0.0, arrived) / (last.at - first.at)
        return PhaseRates(workers, tokens, busy, demand)

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
