"""`disagg up` as a child process of the benchmark: started, awaited, stopped by PID.

`disagg up` prints a line starting with `processes:` once the gateway has heard from every
worker. Stopping sends it SIGTERM (it stops its own children); if it does not exit in time it is
killed, and so is every process it had started (found through /proc before the kill), since its
children run in their own sessions and would otherwise outlive it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from disagg.cli.procs import disagg_command, free_port

READY_LINE = "processes:"


class UpProcess:
    """One `disagg up`; use as a context manager (stopped on every exit path)."""

    def __init__(
        self,
        up_args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 300.0,
        log: Path | None = None,
    ) -> None:
        """`env`: the environment of `disagg up` and so of its children (default: this one's)."""
        self.port, self.nats_port = free_port(), free_port()
        self.argv = [*disagg_command(), "up", "--port", str(self.port)]
        self.argv += ["--nats-port", str(self.nats_port), *up_args]
        self.env = dict(env) if env is not None else None
        self.ready_timeout_s = ready_timeout_s
        self.log = log  # also copy its output here
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self._ready = threading.Event()
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> UpProcess:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Spawn and wait (bounded) for the ready line; raises with the output if it fails."""
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env
        )
        threading.Thread(target=self._drain, name="up-output", daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None:
                raise RuntimeError(f"disagg up exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                waited = f"{self.ready_timeout_s} s"
                raise TimeoutError(f"disagg up not ready in {waited}:\n{self.tail()}")

    def _drain(self) -> None:
        # Always read: a full pipe would block the stack's logging.
        copy = None
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            copy = open(self.log, "a")  # noqa: SIM115 (open for as long as the pipe is)
        with copy or contextlib.nullcontext():
            for line in self.proc.stdout:
                self.lines.append(line)
                if copy is not None:
                    copy.write(line)
                    copy.flush()
                if line.startswith(READY_LINE):
                    self._ready.set()

    def tail(self, n: int = 40) -> str:
        return "".join(list(self.lines)[-n:])

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM, wait; then SIGKILL it and what it started. Safe to call twice."""
        if self.proc is None or self.proc.poll() is not None:
            return
        descendants = descendant_pids(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
            return
        except subprocess.TimeoutExpired:
            descendants |= descendant_pids(self.proc.pid)
        self.proc.kill()
        self.proc.wait(10)
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def descendant_pids(root: int) -> set[int]:
    """Every live process below `root`, from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children[ppid].append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _busy_jiffies() -> int:
    """CPU time all processes ran since boot, in clock ticks (all cores). Interrupt time is left
    out: it belongs to no process, and loopback traffic of the stack itself makes much of it."""
    user, nice, system = map(int, Path("/proc/stat").read_text().split()[1:4])
    return user + nice + system


def _process_jiffies(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            # utime + stime, and cutime + cstime: children that exited and were waited for
            total += sum(int(f) for f in fields[11:15])
    return total


class ForeignCpu:
    """How much of the machine processes outside this benchmark used during a window.

    Other work on the same cores inflates every latency the benchmark measures; this lets a
    report say so instead of silently comparing a loaded run with a quiet one.
    """

    def __init__(self, roots: set[int]) -> None:
        self.roots = roots
        self.start = self._sample()

    def _pids(self) -> set[int]:
        pids = set(self.roots)
        for root in self.roots:
            pids |= descendant_pids(root)
        return pids

    def _sample(self) -> tuple[float, int, int] | None:
        try:
            return time.monotonic(), _busy_jiffies(), _process_jiffies(self._pids())
        except OSError:  # no /proc here
            return None

    def share(self) -> float | None:
        """Foreign CPU time / (elapsed x cores) since construction; None without /proc."""
        end = self._sample()
        if end is None or self.start is None:
            return None
        elapsed = (end[0] - self.start[0]) * (os.cpu_count() or 1)
        foreign = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, foreign / os.sysconf("SC_CLK_TCK") / elapsed) if elapsed > 0 else None
