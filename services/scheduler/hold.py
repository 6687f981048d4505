"""Holding placements while decode memory is short: the scheduler's back-pressure, pure.

No sockets, no asyncio, no clock: every method that depends on time takes ``now`` (the shell's
monotonic seconds), as in ``placement``.

Holding. A placement whose only workers of a role are draining to switch to it (a
``RoleRequest``; their heartbeats say ``switching_to``) waits for them the same way. A
placement that would overrun decode (``place`` finds no decode worker with the
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
    NoWorkerError,
    PlaceDecision,
    PlaceInput,
    PlacementError,
    PlacementPolicy,
    note_placed,
    place,
    should_hold_prefill,
)
from disagg.shared.cluster import WorkerTable
from disagg.shared.config import option

T = TypeVar("T")

HOLD_WATERMARK = "watermark"
HOLD_NO_CAPACITY = "no_capacity"
HOLD_BEHIND = "behind_held"  # others wait already: arrival order
HOLD_SWITCHING = "switching"  # the only workers of a role are switching to it


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

    watermark: float = option(
        0.9, help="decode KV usage (0-1] at or above which placements wait for room",
        flag="--kv-watermark",
    )  # fmt: skip
    max_held: int = option(256, help="placements waiting for decode room (beyond: 429); 0: never")
    max_hold_s: float = option(
        20.0, help="longest wait for decode room, then 429; keep it below the gateway's "
        "--place-timeout-s; 0: never wait",
    )  # fmt: skip
    confirm_s: float = option(
        1.0, help="a placement counts against its workers on top of their heartbeats this long "
        "(until its admit shows in them)", flag="--placement-grace-s",
    )  # fmt: skip

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
                note_placed(table, only, p.prompt_len)

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
        except NoWorkerError as err:  # a worker switching to that role is back in a moment
            return HOLD_SWITCHING if self.hold.enabled and table.coming(err.role) else err
        except PlacementError as err:
            return err
        if self.hold.enabled and should_hold_prefill(table, self.hold.watermark):
            return HOLD_WATERMARK
        note_placed(table, decision, request.prompt_len)
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
