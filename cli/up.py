"""`disagg up`: the whole stack on one machine, each role its own process.

Starts nats-server, the scheduler, the workers and the gateway as child processes — the same
`disagg <role> ...` commands a user would run by hand — waits until the gateway is healthy,
prints where it serves, and stops everything on Ctrl-C or SIGTERM. A child that dies once the
stack is up (any role, the scheduler, the gateway, the embedded nats-server) is restarted with
exponential backoff; a crash loop stops restarting that child and the rest keeps serving
(`supervisor`). Every child dies with `disagg up`, however it ends.

With ``--autoscale`` it also runs the planner (`disagg planner --act-roles`, its budget the
workers started here): as the load moves between long prompts and long outputs, it switches
live workers between prefill, decode and aggregated, one at a time (``--planner-*`` flags: its
SLOs and damping). Start it in disagg mode: dedicated workers are what measure each phase's
capacity.

Secrets (NATS user/password or token, API keys) reach the children in their environment, never
on a command line (`ps` shows those). With NATS credentials and no `--nats`, the embedded
nats-server is started requiring them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

from disagg.cli.procs import Child, NatsServer, disagg_command, free_port, nats_cluster
from disagg.cli.supervisor import RestartPolicy, Supervisor
from disagg.cli.tiny import TinySpec, write_tiny_checkpoint
from disagg.services.planner.core import PlannerPolicy
from disagg.services.workers.config import parse_cpus
from disagg.shared.config import env_name, group, option, to_flags
from disagg.shared.log import configure_logging, get_logger
from disagg.shared.model.args import DTYPE_CHOICES
from disagg.shared.protocol.types import DEFAULT_BLOCK_SIZE
from disagg.shared.service import NatsAuth, redact_url

log = get_logger("disagg.up")


@dataclass(frozen=True)
class UpConfig:
    """What `disagg up` starts; its fields are its flags."""

    model: Path | None = option(None, help="model folder (default: a tiny built-in one)")
    host: str = option("127.0.0.1", help="interface the gateway binds")
    port: int = option(8000, help="port of the gateway (0: a free one)")
    nats_port: int = option(4222, help="port of the embedded nats-server (the first one's)")
    nats_cluster: int = option(
        1, help="embedded nats-servers, clustered over loopback routes (ports --nats-port + i)"
    )
    nats: str | None = option(None, help="use this NATS server instead of starting one")
    auth: NatsAuth = group(NatsAuth, "nats-")
    api_key: str | None = option(None, help="gateway Bearer key(s)", secret=True)
    mode: Literal["disagg", "agg"] = option("disagg", help="disaggregated or aggregated workers")
    prefill: int = option(1, help="prefill workers (disagg mode)")
    decode: int = option(1, help="decode workers (or aggregated workers)")
    both: int = option(0, help="aggregated workers beside the prefill and decode ones (disagg)")
    autoscale: bool = option(
        False, help="run the planner: it switches the workers' roles to follow the load"
    )
    planner: PlannerPolicy = group(PlannerPolicy, "planner-")  # max-workers: the workers here
    dtype: DTYPE_CHOICES = option("auto", help="weights and KV dtype")
    kv_memory_gb: float = option(0.5, help="KV cache per worker")
    block_size: int = option(DEFAULT_BLOCK_SIZE, help="tokens per KV block")
    device: str = option("cpu", help="cpu | cuda")
    cpus: str | None = option(None, help="give worker i core i of this list, e.g. 0-3")
    log_dir: Path | None = option(None, help="one log file per child (default: inherit)")
    log_level: str = option("info", help="debug | info | warning | error")
    ready_timeout_s: float = option(180.0, help="bound on the whole stack getting ready")
    restart: RestartPolicy = group(RestartPolicy)

    def __post_init__(self) -> None:
        if min(self.prefill, self.decode, self.both) < 0:
            raise ValueError("--prefill, --decode and --both must be >= 0")
        if self.mode == "agg" and (self.decode < 1 or self.both):
            raise ValueError("agg mode takes --decode N (aggregated workers), no --both")
        if self.mode == "disagg" and (self.prefill < 1 or self.decode + self.both < 1):
            raise ValueError("disagg mode needs --prefill >= 1 and --decode + --both >= 1")
        if self.autoscale and len(worker_roles(self)) < 2:
            raise ValueError("--autoscale moves roles between workers: start two or more")
        if self.cpus is not None:
            parse_cpus(self.cpus)
        if not 1 <= self.nats_cluster <= 9:
            raise ValueError("--nats-cluster must be in [1, 9]")


def default_model() -> Path:
    """A tiny checkpoint in the user cache dir, written once."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "disagg"
    path = cache / "tiny-llama"
    if not (path / "config.json").is_file():
        write_tiny_checkpoint(
            path, TinySpec(arch="llama", num_layers=4, hidden_size=128, intermediate_size=256)
        )
        print(f"disagg up: no --model given; wrote a tiny random llama checkpoint to {path}")
    return path


ROLES = ("prefill", "decode", "worker")


def worker_roles(cfg: UpConfig) -> list[str]:
    if cfg.mode == "agg":
        return ["worker"] * cfg.decode
    return ["prefill"] * cfg.prefill + ["decode"] * cfg.decode + ["worker"] * cfg.both


class Stack:
    """The children of one `disagg up`, in start order; stopped in reverse."""

    def __init__(self, args: UpConfig, model: Path) -> None:
        self.args, self.model = args, model
        self.private = tempfile.TemporaryDirectory(prefix="disagg-up-")  # 0700: secrets inside
        self.nats: list[NatsServer] = []  # embedded ones
        if args.nats is None:
            config = _nats_auth_config(args, Path(self.private.name))
            if args.nats_cluster == 1:
                self.nats = [NatsServer(port=args.nats_port, config=config)]
            else:
                self.nats = nats_cluster(
                    args.nats_cluster, "127.0.0.1", args.nats_port, config=config
                )
        self.nats_url = args.nats or ",".join(n.url for n in self.nats)
        self.env = os.environ | child_secrets(args)
        self.children: list[Child] = []
        self._argv: dict[str, list[str]] = {}  # how each child was started
        self._down: set[str] = set()  # exited, restart pending (or given up)

    def start(self) -> None:
        for server in self.nats:
            server.start()
        common = ["--nats", self.nats_url, "--log-level", self.args.log_level]
        self._spawn("scheduler", ["scheduler", *common])
        cpus = _cpu_list(self.args.cpus)
        for i, role in enumerate(worker_roles(self.args)):
            argv = [
                role,
                *common,
                *self._model_flags(),
                "--kv-memory-gb",
                str(self.args.kv_memory_gb),
            ]
            argv += ["--block-size", str(self.args.block_size), "--device", self.args.device]
            if cpus:
                argv += ["--cpus", str(cpus[i % len(cpus)])]
            self._spawn(f"{role}-{i}", argv)
        roles = worker_roles(self.args)
        if self.args.autoscale:
            policy = replace(self.args.planner, max_workers=len(roles))
            planner = ["planner", *common, "--act-roles", "--metrics-port", "0"]
            self._spawn("planner", planner + to_flags(policy))
        gateway = ["gateway", *common, "--model", str(self.model), "--host", self.args.host]
        expect = ",".join(f"{r}={n}" for r, n in Counter(roles).items())
        if self.args.autoscale:  # roles change: only the count of workers is fixed
            expect = f"any={len(roles)}"
        gateway += ["--port", str(self.args.port), "--expect-workers", expect]
        self._spawn("gateway", gateway)

    def _model_flags(self) -> list[str]:
        return ["--model", str(self.model), "--dtype", self.args.dtype]

    def _spawn(self, name: str, argv: list[str]) -> Child:
        out = None
        if self.args.log_dir is not None:
            self.args.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.args.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (owned by the child)
        self._argv[name] = argv
        child = Child(name, [*disagg_command(), *argv], env=self.env, log=out or sys.stderr)
        self.children.append(child)
        return child

    def supervise(self, sup: Supervisor, now: float) -> None:
        """Report new exits to `sup` and restart the children it says are due."""
        for child in [*self.nats_children, *self.children]:
            if child.alive() or child.name in self._down:
                continue
            code = child.proc.returncode
            if code == 0 and child.name.split("-")[0] in ROLES:  # a worker that drained
                log.info("worker_left", name=child.name)
                self.children.remove(child)
                continue
            self._down.add(child.name)
            when = sup.exited(child.name, now)
            if when is None:
                hint = "not restarted again; the rest of the stack keeps serving"
                log.error("crash_loop", name=child.name, code=code, exits=sup.exits(child.name),
                          hint=hint)  # fmt: skip
            else:
                log.warning("child_exited", name=child.name, code=code, restart_in_s=when - now)
        for name in sup.due(now):
            self._down.discard(name)
            if (server := self._nats_named(name)) is not None:
                pid = server.start().child.pid
            else:
                self.children = [c for c in self.children if c.name != name]
                pid = self._spawn(name, self._argv[name]).pid
            sup.started(name, now)
            log.info("child_restarted", name=name, pid=pid)

    def dead_child(self) -> Child | None:
        """A child that died; a worker that drained and exited 0 is let go, not a failure."""
        for child in list(self.children):
            if child.alive():
                continue
            if child.proc.returncode == 0 and child.name.split("-")[0] in ROLES:
                log.info("worker_left", name=child.name)
                self.children.remove(child)
                continue
            return child
        return None

    @property
    def nats_children(self) -> list[Child]:
        return [server.child for server in self.nats if server.child is not None]

    def _nats_named(self, name: str) -> NatsServer | None:
        return next((server for server in self.nats if server.name == name), None)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        for server in self.nats:
            server.stop()
        self.private.cleanup()


def child_secrets(cfg: UpConfig) -> dict[str, str]:
    """The NATS credentials and API keys given to `disagg up`, as the children's environment."""
    env = {
        env_name("--nats-" + f.name.replace("_", "-")): str(value)
        for f in fields(NatsAuth)
        if (value := getattr(cfg.auth, f.name)) is not None
    }
    if cfg.api_key is not None:
        env["DISAGG_API_KEY"] = cfg.api_key
    return env


def _nats_auth_config(cfg: UpConfig, folder: Path) -> Path | None:
    """A nats-server config requiring the user/password or token given to `disagg up`."""
    if cfg.auth.user:
        auth = {"user": cfg.auth.user, "password": cfg.auth.password or ""}
    elif cfg.auth.token:
        auth = {"token": cfg.auth.token}
    else:
        return None
    body = ", ".join(f"{key}: {json.dumps(value)}" for key, value in auth.items())
    path = folder / "nats-server.conf"
    path.write_text(f"authorization {{ {body} }}\n")
    path.chmod(0o600)
    return path


def _cpu_list(spec: str | None) -> list[int]:
    return sorted(parse_cpus(spec)) if spec else []


TOTAL_BLOCKS = "disagg:kv_blocks_total{"


def wait_ready(base: str, stack: Stack, timeout: float) -> None:
    """Until /health is 200 and the gateway has heard from every worker this stack started."""
    workers = len(worker_roles(stack.args))
    key = (stack.args.api_key or "").split(",")[0].strip() or None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (dead := stack.dead_child()) is not None:
            raise RuntimeError(f"{dead.name} exited with code {dead.proc.returncode}")
        with contextlib.suppress(OSError):
            metrics = _get(base + "/health") and _get(base + "/metrics", key)
            if metrics and metrics.count(TOTAL_BLOCKS) >= workers:
                return
        time.sleep(0.25)
    raise TimeoutError(f"the stack was not ready within {timeout} s")


def _get(url: str, api_key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as resp:
        return resp.read().decode()


def main(args: UpConfig) -> int:
    configure_logging(args.log_level)
    model = args.model or default_model()
    if args.port == 0:
        args = replace(args, port=free_port(args.host))
    stack = Stack(args, model)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        return _serve(args, stack, model, stop)
    except (RuntimeError, TimeoutError) as err:
        print(f"disagg up: {err}; see the logs above (or --log-dir)", file=sys.stderr)
        return 1
    finally:
        stack.stop()


def _serve(args: UpConfig, stack: Stack, model: Path, stop: threading.Event) -> int:
    stack.start()
    base = f"http://{args.host}:{args.port}"
    wait_ready(base, stack, args.ready_timeout_s)
    roles = ", ".join(f"{c.name} (pid {c.pid})" for c in [*stack.nats_children, *stack.children])
    nats = ",".join(redact_url(url) for url in stack.nats_url.split(","))
    mode = args.mode + (" mode, autoscaled" if args.autoscale else " mode")
    print(f"disagg is serving {model} at {base}/v1 ({mode}; NATS {nats})")
    print(f"processes: {roles}", flush=True)
    sup, now = Supervisor(args.restart), time.monotonic()
    for name in [c.name for c in [*stack.nats_children, *stack.children]]:
        sup.started(name, now)
    while not stop.is_set():
        stack.supervise(sup, time.monotonic())
        stop.wait(0.2)
    return 0
