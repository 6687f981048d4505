"""The decode side of benchmarks/kv_transfer.py: a spawned child pinned to its own core.

It runs a DecodeWorker + KVReceiver (or a bare ZeroMQ PULL sink for the raw baseline) and is driven
by JSON over a multiprocessing Pipe, the benchmark's own control channel: KV only ever moves over
ZeroMQ. Setup helpers both processes share live here too.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec
import torch
import zmq

from disagg.services.workers.decode import AdmitError, DecodeWorker
from disagg.shared.engine.runtime import RuntimeConfig, build_runtime
from disagg.shared.engine.scheduler import EngineConfig
from disagg.shared.log import configure_logging
from disagg.shared.protocol.descriptor import TransferDescriptor
from disagg.shared.protocol.sampling import SamplingParams
from disagg.shared.transfer.receiver import ReceiverCore, TransferResult
from disagg.shared.transfer.sockets import KVReceiver

BLOCK_SIZE = 16
READY_TIMEOUT_S = 300.0  # the child imports torch and loads the model on one busy core
STEP_TIMEOUT_S = 180.0  # one bf16 prefill on one AVX2 core takes ~10 s; leave room for a busy box
IDLE_WAIT_S = 0.001  # the decode loop's poll interval while it only waits for a transfer


# -- setup ------------------------------------------------------------------------------------


def pin_to_core(core: int) -> None:
    """Pin every thread of this process to `core` (later threads inherit it); one torch thread."""
    tasks = Path("/proc/self/task")
    tids = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, {core})
    torch.set_num_threads(1)


def pick_cores(spec: str | None) -> tuple[int, int]:
    """`--cpus P,D`, or the first two cores this process may use (one core: both share it)."""
    if spec:
        prefill, decode = (int(c) for c in spec.split(","))
        return prefill, decode
    cores = sorted(os.sched_getaffinity(0))
    return cores[0], cores[1 % len(cores)]


def runtime_config(setup: dict[str, Any]) -> RuntimeConfig:
    """The RuntimeConfig both sides build from the same setup dict."""
    return RuntimeConfig(
        model=Path(setup["model"]), dtype=setup["dtype"], device=setup["device"],
        num_blocks=setup["num_blocks"], block_size=BLOCK_SIZE,
        engine=EngineConfig(  # every run ships the whole prompt: no prefix cache on either side
            max_num_seqs=4, max_num_batched_tokens=max(512, setup["prompt_len"]),
            enable_prefix_caching=False,
        ),
    )  # fmt: skip


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


# -- control pipe -----------------------------------------------------------------------------


def send_msg(conn: Connection, **msg: Any) -> None:
    """One JSON message on the control pipe (bytes, never pickle)."""
    conn.send_bytes(json.dumps(msg).encode())


def recv_msg(conn: Connection) -> dict[str, Any]:
    return json.loads(conn.recv_bytes())


# -- decode process (child) -------------------------------------------------------------------


class Recording:
    """A KV source that keeps each result DecodeWorker polls, so the benchmark can report it."""

    def __init__(self, source: ReceiverCore) -> None:
        self.source = source
        self.address = source.address
        self.recorded: list[TransferResult] = []

    def expect(self, desc: TransferDescriptor, kv_cache: torch.Tensor) -> None:
        self.source.expect(desc, kv_cache)

    def cancel(self, transfer_id: str) -> bool:
        return self.source.cancel(transfer_id)

    def expire(self, now: float | None = None) -> list[str]:
        return self.source.expire(now)

    def poll_completed(self, timeout: float = 0.0) -> list[TransferResult]:
        results = self.source.poll_completed(timeout)
        self.recorded.extend(results)
        return results


def decode_main(conn: Connection, setup_json: str) -> None:
    """Child entry point: pin, build DecodeWorker + receiver, serve the parent until quit/EOF."""
    setup = json.loads(setup_json)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # keep the parent's stdout for the table
    pin_to_core(setup["core"])
    configure_logging("warning")
    rt = build_runtime(runtime_config(setup))
    receiver = KVReceiver("127.0.0.1")
    recording = Recording(receiver.core)
    worker = DecodeWorker(
        rt.engine, recording, fingerprint=rt.fingerprint, transfer_deadline_s=STEP_TIMEOUT_S,
        wire_dtype=setup["wire_dtype"],
    )  # fmt: skip
    try:
        send_msg(
            conn, event="ready", fingerprint=rt.fingerprint, cores=sorted(os.sched_getaffinity(0))
        )
        serve_decode(conn, worker, recording)
    except (EOFError, BrokenPipeError):
        pass  # the parent went away: nothing left to report to
    finally:
        receiver.close()


def serve_decode(conn: Connection, worker: DecodeWorker, receiver: Recording) -> None:
    """Handle control messages and step the worker; report each received transfer and finish."""
    while True:
        busy = worker.engine.has_unfinished()
        if conn.poll(0.0 if busy else IDLE_WAIT_S):
            msg = recv_msg(conn)
            if msg["op"] == "quit":
                return
            handle_op(conn, worker, msg)
        if not worker.has_work():
            continue
        outputs = worker.step()
        for result in receiver.recorded:
            send_msg(conn, event="received", **asdict(result))
        receiver.recorded.clear()
        for out in outputs:
            if out.finished:
                send_msg(conn, event="finished", request_id=out.request_id, error=out.error)


def handle_op(conn: Connection, worker: DecodeWorker, msg: dict[str, Any]) -> None:
    """One control request: admit a prompt, answer a clock ping, or run the raw ZeroMQ sink."""
    if msg["op"] == "ping":
        send_msg(conn, event="pong", clock=time.monotonic())
    elif msg["op"] == "admit":
        try:
            desc = worker.admit(msg["request_id"], msg["prompt"], SamplingParams(max_tokens=1))
        except AdmitError as err:
            send_msg(conn, event="error", error=f"admit refused ({err.status}): {err}")
            return
        send_msg(conn, event="admitted", transfer=msgspec.to_builtins(desc))
    elif msg["op"] == "raw":
        raw_sink(conn, msg["messages"], msg["rounds"])
    else:
        send_msg(conn, event="error", error=f"unknown op {msg['op']!r}")


def raw_sink(conn: Connection, messages: int, rounds: int) -> None:
    """Bare PULL socket: receive `rounds` x `messages` multipart messages, report each round."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 64)  # as KVReceiver
    try:
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        send_msg(conn, event="raw_ready", address=f"tcp://127.0.0.1:{port}")
        for _ in range(rounds):
            nbytes = receive_round(sock, messages)
            send_msg(conn, event="raw_round", completed_at=time.monotonic(), bytes=nbytes)
    except TimeoutError as err:
        send_msg(conn, event="error", error=str(err))
    finally:
        sock.close()
        ctx.term()


def receive_round(sock: zmq.Socket, messages: int) -> int:
    """Receive `messages` multipart messages zero-copy; returns the bytes received."""
    deadline = time.monotonic() + STEP_TIMEOUT_S
    nbytes = 0
    for _ in range(messages):
        left_ms = int(1000 * (deadline - time.monotonic()))
        if left_ms <= 0 or not sock.poll(left_ms, zmq.POLLIN):
            raise TimeoutError(f"raw ZeroMQ round not received within {STEP_TIMEOUT_S} s")
        nbytes += sum(frame.buffer.nbytes for frame in sock.recv_multipart(copy=False))
    return nbytes


class DecodeProcess:
    """The decode side in a spawned child pinned to its own core; every wait is bounded."""

    def __init__(self, setup: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(
            target=decode_main, args=(child_conn, json.dumps(setup)), name="decode", daemon=True
        )
        self.proc.start()
        child_conn.close()
        try:
            self.ready = self.expect("ready", READY_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def request(self, event: str, timeout: float = STEP_TIMEOUT_S, **msg: Any) -> dict[str, Any]:
        """Send an op and wait for the reply `event`."""
        send_msg(self.conn, **msg)
        return self.expect(event, timeout)

    def expect(self, event: str, timeout: float = STEP_TIMEOUT_S) -> dict[str, Any]:
        """The next message, which must be `event`; `observed_at` is when this process got it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conn.poll(min(0.5, max(0.0, deadline - time.monotonic()))):
                msg = recv_msg(self.conn)
                msg["observed_at"] = time.perf_counter()
                if msg["event"] != event:
                    raise RuntimeError(f"decode process: wanted {event!r}, got {msg}")
                return msg
            if not self.proc.is_alive():
                raise RuntimeError(f"decode process exited ({self.proc.exitcode})")
        raise TimeoutError(f"decode process sent no {event!r} within {timeout} s")

    def close(self) -> None:
        """Ask the child to quit; kill it by PID if it has not within 10 s. Safe to call twice."""
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                send_msg(self.conn, op="quit")
            self.proc.join(10.0)
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.join(5.0)
        self.conn.close()


def clock_is_shared(decode: DecodeProcess) -> bool:
    """True if the child's time.monotonic() and our perf_counter() are one system-wide clock."""
    infos = [time.get_clock_info(name).implementation for name in ("perf_counter", "monotonic")]
    if infos != ["clock_gettime(CLOCK_MONOTONIC)"] * 2:
        return False
    before = time.perf_counter()
    pong = decode.request("pong", op="ping")
    return before <= pong["clock"] <= pong["observed_at"]
