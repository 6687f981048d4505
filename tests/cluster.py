"""A disagg cluster for tests: nats-server, a scheduler, the workers asked for and a gateway,
each its own `disagg` process (child of the test, killed by PID) logging JSON to its own file,
plus the waits and /metrics readers the service-level tests share.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from disagg.cli.procs import Child, NatsServer, disagg_command, free_port

STARTUP_S = 240
WAIT_S = 60.0  # bound on any single wait (death detection is ~3 s)
GATEWAY_FLAGS = (
    "--max-concurrent-requests", "6", "--first-token-timeout-s", "60",
    "--inter-token-timeout-s", "20", "--resync-timeout-s", "3", "--drain-timeout-s", "60",
    "--nats-probe-s", "0.5",
)  # fmt: skip


def wait_until(predicate, timeout: float = WAIT_S, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() >= deadline:
            pytest.fail(f"{what} not reached within {timeout} s")
        time.sleep(0.02)
    return result


class Cluster:
    """The services as child processes on one nats-server; logs in `logs/<name>.log`."""

    def __init__(
        self,
        model: Path,
        logs: Path,
        workers: dict[str, tuple[str, ...]],
        *,
        scheduler_flags: tuple[str, ...] = (),
        gateway_flags: tuple[str, ...] = GATEWAY_FLAGS,
    ) -> None:
        """`workers`: name -> (role, *flags); the name is also the worker's id."""
        self.model, self.logs = model, logs
        self.nats = NatsServer().start()
        self.port = free_port()
        # Two cores for six processes: torch's own thread pools would only fight each other.
        self.env = os.environ | {"OMP_NUM_THREADS": "1"}
        self.children: dict[str, Child] = {}
        try:
            self.spawn("scheduler", "scheduler", *scheduler_flags)
            for name, (role, *flags) in workers.items():
                self.spawn(name, role, "--id", name, *self._model(), *flags)
            self.spawn(
                "gateway", "gateway", *self._model(), "--port", str(self.port), *gateway_flags
            )
            self.wait_workers(list(workers), STARTUP_S)
        except BaseException:
            self.stop()
            raise

    def _model(self) -> list[str]:
        return ["--model", str(self.model)]

    def spawn(self, name: str, role: str, *flags: str) -> None:
        argv = [*disagg_command(), role, "--nats", self.nats.url, *flags]
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (the child writes it)
        self.children[name] = Child(name, argv, env=self.env, log=log)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> str:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as resp:
            return resp.read().decode()

    def workers_seen(self) -> set[str]:
        """Workers the gateway currently counts alive (it drops dead ones from /metrics)."""
        with contextlib.suppress(OSError):
            return set(
                re.findall(r'disagg:kv_blocks_total\{role="\w+",worker="([^"]+)"', self.metrics())
            )
        return set()

    def wait_workers(self, names, timeout: float = WAIT_S) -> None:
        for name, child in self.children.items():
            assert child.alive(), f"{name} exited: {child.proc.returncode}"
        wait_until(lambda: set(names) <= self.workers_seen(), timeout, f"workers {names} seen")

    def freeze_until_gone(self, name: str) -> None:
        """SIGSTOP, then wait until the gateway and the scheduler have declared `name` dead."""
        deaths = len(self.events("scheduler", "worker_dead", worker_id=name))
        self.freeze(name)
        wait_until(lambda: name not in self.workers_seen(), what=f"{name} dropped by the gateway")
        wait_until(
            lambda: len(self.events("scheduler", "worker_dead", worker_id=name)) > deaths,
            what=f"{name} dropped by the scheduler",
        )

    def freeze(self, name: str) -> None:
        self.children[name].signal(signal.SIGSTOP)

    def kill(self, name: str) -> None:
        """SIGKILL: the worker is gone for good (and no longer one of the cluster's)."""
        child = self.children.pop(name)
        child.signal(signal.SIGKILL)
        child.proc.wait(WAIT_S)

    def thaw(self, name: str) -> None:
        """SIGCONT, then wait until the gateway and the scheduler see it again."""
        joins = len(self.events("scheduler", "worker_joined", worker_id=name))
        self.children[name].signal(signal.SIGCONT)
        self.wait_workers([name])
        wait_until(
            lambda: len(self.events("scheduler", "worker_joined", worker_id=name)) > joins,
            what=f"{name} back in the scheduler",
        )

    def placed(self) -> int:
        """Placements the scheduler made so far."""
        return len(self.events("scheduler", "placed"))

    def events(self, name: str, event: str | None = None, **match) -> list[dict]:
        """The JSON log events of one child, optionally filtered."""
        out = []
        for line in (self.logs / f"{name}.log").read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                e = json.loads(line)
                if (event is None or e.get("event") == event) and match.items() <= e.items():
                    out.append(e)
        return out

    def assert_all_alive(self) -> None:
        for name, child in self.children.items():
            assert child.alive(), f"{name} exited with {child.proc.returncode}"

    def stop(self) -> None:
        for child in reversed(list(self.children.values())):
            child.signal(signal.SIGCONT)
            child.stop()
        self.nats.stop()


def decode_pools(metrics: str, role: str = "decode") -> tuple[dict, dict]:
    """(free, total) blocks per worker of `role` in the gateway's /metrics."""

    def per_worker(kind: str) -> dict[str, float]:
        pattern = rf'disagg:kv_blocks_{kind}{{role="{role}",worker="([^"]+)"}} ([0-9.e+]+)'
        return {w: float(v) for w, v in re.findall(pattern, metrics)}

    free, total = per_worker("free"), per_worker("total")
    return free, total


def assert_decode_pools_full(cluster: Cluster, timeout: float = WAIT_S) -> None:
    """Every live decode worker reports free == total in the gateway's /metrics."""

    def full():
        free, total = decode_pools(cluster.metrics())
        return total and free == total

    wait_until(full, timeout, "every decode pool full")
