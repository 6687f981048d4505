"""The role actuator: a fixed set of workers follows the planner by switching roles.

On a fixed core budget (`disagg up --autoscale`, one machine) workers are not added or removed;
the planner's counts (prefill, decode, both) are met by asking live workers to drain and go on
as another role (``RoleRequest``, a short drain after which what still runs moves to another
worker with its tokens). ``RoleActuator.plan`` is pure: it picks at most one switch per call
and none while a switch is under way (one worker away at a time), preferring a switch that
leaves the other workers able to serve on their own, then the least loaded worker. A switch
counts as done when the worker's heartbeat shows the new role, not draining, or after
``timeout_s`` (a worker that died mid-switch is the supervisor's to restart).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from disagg.services.planner.core import Counts
from disagg.shared.protocol.types import Role

ROLES = (Role.PREFILL, Role.DECODE, Role.BOTH)  # the order of Counts


@dataclass(frozen=True)
class WorkerView:
    """What the actuator needs of one live worker (from its heartbeat)."""

    worker_id: str
    role: Role
    draining: bool = False
    running: int = 0


@dataclass(frozen=True)
class Switch:
    worker_id: str
    role: Role


def serves(workers: Sequence[WorkerView]) -> bool:
    """Whether these workers can take a request: an aggregated worker, or a decode and a
    prefill worker (an aggregated worker never prefills for another)."""
    roles = {w.role for w in workers if not w.draining}
    return Role.BOTH in roles or {Role.PREFILL, Role.DECODE} <= roles


class RoleActuator:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.pending: tuple[Switch, float] | None = None  # sent, and when

    def plan(self, desired: Counts, workers: Sequence[WorkerView], now: float) -> Switch | None:
        """The one switch that brings ``workers`` closer to ``desired``, or None."""
        if self._under_way(workers, now) or any(w.draining for w in workers):
            return None
        have = Counter(w.role for w in workers)
        want = dict(zip(ROLES, desired, strict=True))
        missing = [r for r in ROLES if want[r] > have[r]]
        spare = {r for r in ROLES if have[r] > want[r]}
        options = [Switch(w.worker_id, to) for to in missing for w in workers if w.role in spare]
        if not options:
            return None
        by_id = {w.worker_id: w for w in workers}

        def key(s: Switch) -> tuple[bool, int, str]:
            rest = [w for w in workers if w.worker_id != s.worker_id]
            return (not serves(rest), by_id[s.worker_id].running, s.worker_id)

        return min(options, key=key)

    def sent(self, switch: Switch, now: float) -> None:
        self.pending = (switch, now)

    def _under_way(self, workers: Sequence[WorkerView], now: float) -> bool:
        if self.pending is None:
            return False
        switch, at = self.pending
        worker = next((w for w in workers if w.worker_id == switch.worker_id), None)
        done = worker is not None and worker.role == switch.role and not worker.draining
        if done or now - at > self.timeout_s:
            self.pending = None
            return False
        return True
