"""`disagg up`: the whole stack on one machine, each role its own process.

Starts nats-server, the scheduler, the workers and the gateway as child processes — the same
`disagg <role> ...` commands a user would run by hand — waits until the gateway is healthy,
prints where it serves, and stops everything on Ctrl-C or SIGTERM (or when a child dies).

Secrets (NATS user/password or token, API keys) reach the children in their environment, never
on a command line (`ps` shows those). With NATS credentials and no `--nats`, the embedded
nats-server is started requiring them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from disagg.services.common import add_nats_auth_flags, env_name, flag, redact_url
from disagg.services.procs import Child, NatsServer, disagg_command, free_port
from disagg.shared.log import configure_logging, get_logger
from disagg.shared.tiny import TinySpec, write_tiny_checkpoint

log = get_logger("disagg.up")


def add_up_args(p: argparse.ArgumentParser) -> None:
    flag(p, "--model", type=Path, default=None, help="model folder (default: a tiny built-in one)")
    flag(p, "--host", default="127.0.0.1", help="interface the gateway binds")
    flag(p, "--port", type=int, default=8000)
    flag(p, "--nats-port", type=int, default=4222)
    flag(p, "--nats", default=None, help="use this NATS server instead of starting one")
    add_nats_auth_flags(p)
    flag(p, "--api-key", default=None, help="gateway Bearer key(s) (better: DISAGG_API_KEY)")
    flag(p, "--mode", default="disagg", choices=("disagg", "agg"))
    flag(p, "--prefill", type=int, default=1, help="prefill workers (disagg mode)")
    flag(p, "--decode", type=int, default=1, help="decode workers (or aggregated workers)")
    flag(p, "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    flag(p, "--kv-memory-gb", type=float, default=0.5, help="KV cache per worker")
    flag(p, "--block-size", type=int, default=16)
    flag(p, "--device", default="cpu")
    flag(p, "--cpus", default=None, help="give worker i core i of this list, e.g. 0-3")
    flag(p, "--log-dir", type=Path, default=None, help="one log file per child (default: inherit)")
    flag(p, "--log-level", default="info")
    flag(p, "--ready-timeout-s", type=float, default=180.0)


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


def worker_roles(args: argparse.Namespace) -> list[str]:
    if args.mode == "agg":
        return ["worker"] * args.decode
    return ["prefill"] * args.prefill + ["decode"] * args.decode


class Stack:
    """The children of one `disagg up`, in start order; stopped in reverse."""

    def __init__(self, args: argparse.Namespace, model: Path) -> None:
        self.args, self.model = args, model
        self.private = tempfile.TemporaryDirectory(prefix="disagg-up-")  # 0700: secrets inside
        self.nats: NatsServer | None = None
        if args.nats is None:
            config = _nats_auth_config(args, Path(self.private.name))
            self.nats = NatsServer(port=args.nats_port, config=config)
        self.nats_url = args.nats or self.nats.url
        self.env = os.environ | child_secrets(args)
        self.children: list[Child] = []

    def start(self) -> None:
        if self.nats is not None:
            self.nats.start()
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
        gateway = ["gateway", *common, "--model", str(self.model), "--host", self.args.host]
        self._spawn("gateway", [*gateway, "--port", str(self.args.port)])

    def _model_flags(self) -> list[str]:
        return ["--model", str(self.model), "--dtype", self.args.dtype]

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = None
        if self.args.log_dir is not None:
            self.args.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.args.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (owned by the child)
        argv = [*disagg_command(), *argv]
        self.children.append(Child(name, argv, env=self.env, log=out or sys.stderr))

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

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        if self.nats is not None:
            self.nats.stop()
        self.private.cleanup()


NATS_FLAGS = ("user", "password", "token", "creds", "nkey", "tls_ca", "tls_cert", "tls_key")


def child_secrets(args: argparse.Namespace) -> dict[str, str]:
    """The NATS credentials and API keys given to `disagg up`, as the children's environment."""
    env = {
        env_name("--nats-" + name.replace("_", "-")): value
        for name in NATS_FLAGS
        if (value := getattr(args, "nats_" + name)) is not None
    }
    if args.api_key is not None:
        env["DISAGG_API_KEY"] = args.api_key
    return env


def _nats_auth_config(args: argparse.Namespace, folder: Path) -> Path | None:
    """A nats-server config requiring the user/password or token given to `disagg up`."""
    if args.nats_user:
        auth = {"user": args.nats_user, "password": args.nats_password or ""}
    elif args.nats_token:
        auth = {"token": args.nats_token}
    else:
        return None
    body = ", ".join(f"{key}: {json.dumps(value)}" for key, value in auth.items())
    path = folder / "nats-server.conf"
    path.write_text(f"authorization {{ {body} }}\n")
    path.chmod(0o600)
    return path


def _cpu_list(spec: str | None) -> list[int]:
    from disagg.services.workers.service import parse_cpus

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


def main(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    model = args.model or default_model()
    if args.port == 0:
        args.port = free_port(args.host)
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


def _serve(args: argparse.Namespace, stack: Stack, model: Path, stop: threading.Event) -> int:
    stack.start()
    base = f"http://{args.host}:{args.port}"
    wait_ready(base, stack, args.ready_timeout_s)
    roles = ", ".join(f"{c.name} (pid {c.pid})" for c in stack.children)
    nats = redact_url(stack.nats_url)
    print(f"disagg is serving {model} at {base}/v1 ({args.mode} mode; NATS {nats})")
    print(f"processes: {roles}", flush=True)
    while not stop.is_set():
        if (dead := stack.dead_child()) is not None:
            log.error("child_exited", name=dead.name, code=dead.proc.returncode)
            return 1
        stop.wait(0.2)
    return 0
