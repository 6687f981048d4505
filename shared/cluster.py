"""The cluster as every service sees it: a table of workers built from their heartbeats.

The scheduler places on it, the gateway watches the workers its requests depend on, decode
workers watch the prefill workers pushing into them. No sockets, no asyncio, no clock: every
method that depends on time takes ``now`` (monotonic seconds) from the shell.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from disagg.shared.protocol.messages import Heartbeat
from disagg.shared.protocol.types import Role

HEARTBEAT_INTERVAL_S = 1.0


@dataclass(frozen=True)
class WorkerState:
    """The latest heartbeat of one worker and when it arrived (the table's clock, not
    ``sent_at``)."""

    report: Heartbeat
    last_seen: float
    prefix_set: frozenset[int]

    @property
    def worker_id(self) -> str:
        return self.report.worker_id

    @property
    def can_prefill(self) -> bool:
        return Role(self.report.role).prefills

    @property
    def can_decode(self) -> bool:
        return Role(self.report.role).decodes

    def serves(self, role: Role) -> bool:
        """Whether this worker can take ``role`` work ("both" serves either)."""
        return self.can_prefill if Role(role) is Role.PREFILL else self.can_decode

    def blocks_for(self, prompt_len: int) -> int:
        """KV blocks a request needs here: the prompt plus the first generated token."""
        return math.ceil((prompt_len + 1) / self.report.block_size)

    def prefix_overlap(self, prefix_hashes: Sequence[int]) -> int:
        """Number of leading ``prefix_hashes`` this worker has cached.

        Hashes are chained, so a hit on block i stands for the whole prefix up to i: the deepest
        hit counts, even when the worker's bounded summary left out shallower blocks.
        """
        for i in range(len(prefix_hashes) - 1, -1, -1):
            if prefix_hashes[i] in self.prefix_set:
                return i + 1
        return 0


class WorkerTable:
    """Workers known from heartbeats; a worker silent for more than
    ``missed_beats * heartbeat_interval_s`` is expired (dead)."""

    def __init__(
        self, heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S, missed_beats: int = 3
    ) -> None:
        if heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s must be positive, got {heartbeat_interval_s}")
        if missed_beats < 1:
            raise ValueError(f"missed_beats must be >= 1, got {missed_beats}")
        self.timeout_s = heartbeat_interval_s * missed_beats
        self._workers: dict[str, WorkerState] = {}

    def update(self, report: Heartbeat, now: float) -> WorkerState:
        """Record a heartbeat; a worker expired earlier comes back alive with it."""
        state = WorkerState(report, now, frozenset(report.prefix_hashes))
        self._workers[report.worker_id] = state
        return state

    def revise(self, worker_id: str, report: Heartbeat) -> None:
        """Replace a known worker's report by an estimate, keeping when it was last heard."""
        state = self._workers.get(worker_id)
        if state is not None:
            self._workers[worker_id] = WorkerState(report, state.last_seen, state.prefix_set)

    def expire(self, now: float) -> list[str]:
        """Remove and return (sorted) the workers silent for more than ``timeout_s``."""
        dead = sorted(w for w, s in self._workers.items() if now - s.last_seen > self.timeout_s)
        for worker_id in dead:
            del self._workers[worker_id]
        return dead

    def remove(self, worker_id: str) -> bool:
        """Forget a worker now (it said goodbye); False if it was not known."""
        return self._workers.pop(worker_id, None) is not None

    def get(self, worker_id: str) -> WorkerState | None:
        return self._workers.get(worker_id)

    def alive(self, role: Role) -> list[WorkerState]:
        """Workers that may take new ``role`` work: serving it and not draining, sorted by id."""
        if Role(role) is Role.BOTH:
            raise ValueError("alive() takes the prefill or the decode role")
        return [s for s in self.workers() if s.serves(role) and not s.report.draining]

    def coming(self, role: Role) -> list[WorkerState]:
        """Draining workers switching to a role that serves ``role``: back soon, for it."""

        def serves(next_role: Role | None) -> bool:
            return next_role is not None and (
                Role(next_role).prefills if Role(role) is Role.PREFILL else Role(next_role).decodes
            )

        return [s for s in self.workers() if s.report.draining and serves(s.report.switching_to)]

    def workers(self) -> list[WorkerState]:
        """Every known worker, draining ones included, sorted by id."""
        return [self._workers[w] for w in sorted(self._workers)]

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers


class PeerWatch:
    """A ``WorkerTable`` that does not blame the workers for this process's own NATS outage.

    Silence while this process's connection is down (``is_connected`` False) is not counted,
    and after a reconnection every known worker gets a fresh bound.
    """

    def __init__(self, is_connected: Callable[[], bool], missed_beats: int = 3) -> None:
        self.table = WorkerTable(missed_beats=missed_beats)
        self._outage = OwnOutage(is_connected)

    def beat(self, report: Heartbeat, now: float) -> bool:
        """Record a heartbeat; True when the worker was not known (joined or came back)."""
        known = report.worker_id in self.table
        self.table.update(report, now)
        return not known

    def expire(self, now: float) -> list[str]:
        """Forget and return the workers that went silent."""
        if self._outage.down():
            return []
        if self._outage.just_back():
            for state in self.table.workers():
                self.table.update(state.report, now)
        return self.table.expire(now)


class OwnOutage:
    """Silence heard while this process's own NATS link is down proves nothing about others:
    no verdicts while ``down()``, and a fresh bound for everyone once ``just_back()``."""

    def __init__(self, is_connected: Callable[[], bool]) -> None:
        self._is_connected, self._was_down = is_connected, False

    def down(self) -> bool:
        down = not self._is_connected()
        self._was_down |= down
        return down

    def just_back(self) -> bool:
        back, self._was_down = self._was_down, False
        return back


class Leases:
    """Parties that must keep being heard (gateways, for the requests they placed): each beat or
    message renews a party's lease; one silent for ``timeout_s`` is expired. As ``PeerWatch``,
    silence during this process's own NATS outage is not counted, and every lease is renewed
    when the connection comes back."""

    def __init__(self, is_connected: Callable[[], bool], timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self._last: dict[str, float] = {}
        self._outage = OwnOutage(is_connected)

    def renew(self, party: str, now: float) -> None:
        self._last[party] = now

    def expire(self, now: float) -> list[str]:
        """Forget and return (sorted) the parties silent for more than ``timeout_s``."""
        if self._outage.down():
            return []
        if self._outage.just_back():
            self._last = dict.fromkeys(self._last, now)
        gone = sorted(p for p, last in self._last.items() if now - last > self.timeout_s)
        for party in gone:
            del self._last[party]
        return gone
