"""When `disagg up` restarts a child that exited, with no I/O of its own.

A child that exits is restarted after a delay that starts at ``restart_initial_s`` and doubles
with each exit up to ``restart_max_s``; one that then stays up a whole crash-loop window starts
again from the first delay. ``crash_loop_exits`` exits within that window is a crash loop: that
child is given up on (the shell logs it once and keeps the rest serving). The shell reports
starts and exits with their times and asks which restarts are due.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from disagg.shared.config import option


@dataclass(frozen=True)
class RestartPolicy:
    """How `disagg up` restarts its children."""

    restart_initial_s: float = option(1.0, help="first restart delay of a child that exited")
    restart_max_s: float = option(30.0, help="longest restart delay (it doubles per exit)")
    crash_loop_exits: int = option(5, help="exits within --crash-loop-window-s: stop restarting")
    crash_loop_window_s: float = option(60.0, help="window of --crash-loop-exits")

    def __post_init__(self) -> None:
        if not 0 < self.restart_initial_s <= self.restart_max_s:
            raise ValueError("need 0 < --restart-initial-s <= --restart-max-s")
        if self.crash_loop_exits < 1 or self.crash_loop_window_s <= 0:
            raise ValueError("--crash-loop-exits must be >= 1 and --crash-loop-window-s > 0")


@dataclass
class _Child:
    delay: float
    started_at: float
    exits: deque[float] = field(default_factory=deque)
    restart_at: float | None = None
    given_up: bool = False


class Supervisor:
    """Restart timing of named children."""

    def __init__(self, policy: RestartPolicy = RestartPolicy()) -> None:
        self.policy = policy
        self._children: dict[str, _Child] = {}

    def started(self, name: str, now: float) -> None:
        child = self._children.get(name)
        if child is None:
            self._children[name] = _Child(self.policy.restart_initial_s, now)
        else:
            child.started_at, child.restart_at = now, None

    def exited(self, name: str, now: float) -> float | None:
        """A child exited: when to restart it, or None for a crash loop (given up)."""
        p, child = self.policy, self._children[name]
        if now - child.started_at >= p.crash_loop_window_s:  # it had been stable
            child.delay = p.restart_initial_s
        child.exits.append(now)
        while child.exits and now - child.exits[0] > p.crash_loop_window_s:
            child.exits.popleft()
        if len(child.exits) >= p.crash_loop_exits:
            child.given_up = True
            return None
        child.restart_at = now + child.delay
        child.delay = min(2 * child.delay, p.restart_max_s)
        return child.restart_at

    def due(self, now: float) -> list[str]:
        """Children whose restart time has come (each returned once per exit)."""
        names = [
            name
            for name, c in self._children.items()
            if c.restart_at is not None and c.restart_at <= now
        ]
        for name in names:
            self._children[name].restart_at = None
        return names

    def exits(self, name: str) -> int:
        """Exits of ``name`` within the crash-loop window (as of its last exit)."""
        return len(self._children[name].exits)

    @property
    def given_up(self) -> list[str]:
        return sorted(name for name, c in self._children.items() if c.given_up)
