"""How fast disagg moves KV from a prefill to a decode worker, against raw ZeroMQ, in one run.

Two processes, each pinned to its own core with one torch thread (`--cpus PREFILL,DECODE`): this
one runs a PrefillWorker + KVSender, a spawned child runs a DecodeWorker + KVReceiver. The child is
driven by JSON over a multiprocessing Pipe (the benchmark's own control channel; KV only ever moves
over the product's ZeroMQ sockets). For each wire mode (fp32 cache -> fp32 wire, bf16 -> bf16,
fp32 -> int8) it measures, after one warm-up, the median of `--repeats` runs of:

- **prefill**: a `--prompt-len` prompt prefilled with the per-layer hand-off. `prefill` is step
  start -> `finish()` called (every layer, the pack copies, sampling); `pack` the part of it spent
  copying layers into send buffers; `exposed` = receiver completed -> `finish()` called, the time
  decode waits beyond compute; `eff GB/s` = KV payload / (receiver completed - layer 0 handed off).
  That window is mostly compute, so `eff` tells how well the wire keeps up, not how fast it is.
- **pipe**: the same KV sent with no compute in between (`send_layer` for every layer back to
  back, then `finish`): payload / (receiver completed - first `send_layer`). This is disagg's
  transfer path alone: pack, msgpack headers, ZeroMQ, validation, unpack (and INT8 (de)quantize).
- **raw**: a bare ZeroMQ PUSH/PULL pair on 127.0.0.1 between the same two pinned processes, the
  same messages (same frame sizes, headers included), zero-copy: first send -> last receive.

Timestamps from the two processes are compared directly when `time.perf_counter` and
`time.monotonic` are both the system-wide CLOCK_MONOTONIC (checked, and cross-checked with a
ping); otherwise the receive time is when this process hears of it over the pipe (an upper bound).

Run from the repository root: `python benchmarks/kv_transfer.py [--json PATH]` or
`python -m benchmarks.kv_transfer`. The default model is a ~100M-parameter random Llama written
once into `~/.cache/disagg/bench/`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import zmq

from disagg.services.bench.checkpoint import BENCH_SPEC, bench_checkpoint
from disagg.services.workers.decode import AdmitError, DecodeWorker
from disagg.services.workers.prefill import PrefillJob, PrefillWorker
from disagg.services.workers.runtime import Runtime, RuntimeConfig, build_runtime
from disagg.shared.log import configure_logging
from disagg.shared.sampling import SamplingParams
from disagg.shared.tiny import parameter_count
from disagg.shared.transfer import (
    DEFAULT_MAX_CHUNK_BYTES,
    WIRE_DTYPES,
    KVReceiver,
    KVSender,
    TransferDescriptor,
    TransferResult,
    TransferStats,
)

# mode -> (KV cache dtype on both sides, wire dtype; None = the cache's own)
MODES: dict[str, tuple[str, str | None]] = {
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "int8": ("float32", "int8"),
}
MODE_LABELS = {"fp32": "fp32->fp32", "bf16": "bf16->bf16", "int8": "fp32->int8"}
BLOCK_SIZE = 16
SCALE_BYTES = 4  # one float32 scale per (kv, token, kv head) on the int8 wire
READY_TIMEOUT_S = 300.0  # the child imports torch and loads the model on one busy core
STEP_TIMEOUT_S = 180.0  # one bf16 prefill on one AVX2 core takes ~10 s; leave room for a busy box
IDLE_WAIT_S = 0.001  # the decode loop's poll interval while it only waits for a transfer
SEND_TIMEOUT_MS = 10_000
CONTENDED_CPU_SHARE = 0.9  # prefill thread CPU time / wall time below this: the core was shared


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
        num_blocks=setup["num_blocks"], block_size=BLOCK_SIZE, max_num_seqs=4,
        max_num_batched_tokens=max(512, setup["prompt_len"]),
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


class RecordingReceiver(KVReceiver):
    """A KVReceiver that keeps each result DecodeWorker polls, so the benchmark can report it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: list[TransferResult] = []

    def poll_completed(self, timeout: float = 0.0) -> list[TransferResult]:
        results = super().poll_completed(timeout)
        self.recorded.extend(results)
        return results


def decode_main(conn: Connection, setup_json: str) -> None:
    """Child entry point: pin, build DecodeWorker + receiver, serve the parent until quit/EOF."""
    setup = json.loads(setup_json)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # keep the parent's stdout for the table
    pin_to_core(setup["core"])
    configure_logging("warning")
    rt = build_runtime(runtime_config(setup))
    receiver = RecordingReceiver("127.0.0.1")
    worker = DecodeWorker(
        rt.engine, receiver, fingerprint=rt.fingerprint, transfer_deadline_s=STEP_TIMEOUT_S,
        wire_dtype=setup["wire_dtype"],
    )  # fmt: skip
    try:
        send_msg(
            conn, event="ready", fingerprint=rt.fingerprint, cores=sorted(os.sched_getaffinity(0))
        )
        serve_decode(conn, worker, receiver)
    except (EOFError, BrokenPipeError):
        pass  # the parent went away: nothing left to report to
    finally:
        receiver.close()


def serve_decode(conn: Connection, worker: DecodeWorker, receiver: RecordingReceiver) -> None:
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
        send_msg(conn, event="admitted", transfer=desc.to_dict())
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


# -- prefill side (this process) --------------------------------------------------------------


@dataclass
class PrefillSide:
    """This process's prefill runtime, KV sender and worker."""

    runtime: Runtime
    sender: KVSender
    worker: PrefillWorker

    @classmethod
    def build(cls, setup: dict[str, Any]) -> PrefillSide:
        runtime = build_runtime(runtime_config(setup))
        sender = KVSender(runtime.fingerprint, max_chunk_bytes=DEFAULT_MAX_CHUNK_BYTES)
        return cls(runtime, sender, PrefillWorker(runtime.engine, sender))

    def close(self) -> None:
        self.sender.close()


@dataclass
class Bench:
    """What one mode's runs share: both sides, the prompt, and how to read the child's clock."""

    side: PrefillSide
    decode: DecodeProcess
    prompt: list[int]
    wire_dtype: str
    shared_clock: bool

    def admit(self, request_id: str) -> TransferDescriptor:
        reply = self.decode.request(
            "admitted", op="admit", request_id=request_id, prompt=self.prompt
        )
        return TransferDescriptor.from_dict(reply["transfer"])

    def wait_received(self) -> float:
        """Wait until decode adopted the transfer and finished; returns when it completed."""
        received = self.decode.expect("received")
        if not received["ok"]:
            raise RuntimeError(f"transfer failed on the decode side: {received['error']}")
        finished = self.decode.expect("finished")
        if finished["error"]:
            raise RuntimeError(f"decode failed: {finished['error']}")
        return received["completed_at"] if self.shared_clock else received["observed_at"]


def run_prefill(bench: Bench, request_id: str) -> tuple[dict[str, float], TransferStats]:
    """Prefill the prompt with the per-layer hand-off; returns its metrics and send timeline."""
    desc = bench.admit(request_id)
    worker = bench.side.worker
    worker.submit(PrefillJob(request_id, bench.prompt, SamplingParams(max_tokens=1), desc))
    started, cpu_started = time.perf_counter(), time.thread_time()
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while worker.has_work():
        if time.monotonic() > deadline:
            raise TimeoutError(f"prefill did not finish within {STEP_TIMEOUT_S} s")
        for result in worker.step():
            if result.error:
                raise RuntimeError(f"prefill failed: {result.error}")
    cpu_share = (time.thread_time() - cpu_started) / (time.perf_counter() - started)
    stats = wait_sent(worker, request_id)
    metrics = prefill_metrics(started, stats, bench.wait_received())
    return metrics | {"cpu_share": cpu_share}, stats


def wait_sent(worker: PrefillWorker, request_id: str) -> TransferStats:
    """Poll until the transfer's done frame has left; returns its timeline."""
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline:
        for sent in worker.poll_sent():
            if sent.error:
                raise RuntimeError(f"transfer failed on the prefill side: {sent.error}")
            if sent.request_id == request_id:
                return sent.stats
        time.sleep(IDLE_WAIT_S)
    raise TimeoutError(f"transfer {request_id} not sent within {STEP_TIMEOUT_S} s")


def prefill_metrics(started: float, stats: TransferStats, completed: float) -> dict[str, float]:
    """Compute time, hand-off cost and how much of the transfer compute did not hide."""
    prefill_s = stats.finish_called_at - started
    exposed_s = completed - stats.finish_called_at
    window_s = completed - stats.layer_called_at[0]
    lags = [s - c for c, s in zip(stats.layer_called_at, stats.layer_sent_at)]
    return {
        "prefill_s": prefill_s,
        "layers_s": stats.finish_called_at - stats.layer_called_at[0],
        "pack_s": stats.pack_s,
        "payload_bytes": stats.payload_bytes,
        "wire_bytes": stats.bytes_sent,
        "exposed_s": exposed_s,
        "exposed_frac": exposed_s / prefill_s,
        "effective_gbps": stats.payload_bytes / window_s / 1e9,
        "layer_lag_s": statistics.median(lags),  # layer handed off -> its bytes given to ZeroMQ
    }


def run_pipe(bench: Bench, request_id: str) -> dict[str, float]:
    """Send the prompt's KV with no compute in between: disagg's transfer path alone."""
    desc = bench.admit(request_id)
    pool, cache = bench.side.runtime.pool, bench.side.runtime.cache
    local_ids = pool.allocate(len(desc.block_ids))
    try:
        handle = bench.side.sender.begin(desc, local_ids, cache.data)
        for layer in range(desc.num_layers):
            handle.send_layer(layer)
        handle.finish(0)
        stats = handle.wait(STEP_TIMEOUT_S)
    finally:
        pool.free(local_ids)
    pipe_s = bench.wait_received() - stats.layer_called_at[0]
    return {
        "pipe_s": pipe_s,
        "pipe_pack_s": stats.pack_s,
        "pipe_gbps": stats.payload_bytes / pipe_s / 1e9,
    }


# -- raw ZeroMQ -------------------------------------------------------------------------------


def message_plan(stats: TransferStats, bench: Bench) -> list[list[int]]:
    """Frame sizes of every message disagg sent for `stats`: [header, data(, scales)] per chunk
    of each layer, then the header-only done message. Checked against the bytes really sent."""
    block_size, kv_heads, head_dim = bench.side.runtime.cache.data.shape[3:]
    blocks = blocks_for(len(bench.prompt))
    block_bytes = 2 * block_size * kv_heads * head_dim * WIRE_DTYPES[bench.wire_dtype].itemsize
    per_chunk = max(1, DEFAULT_MAX_CHUNK_BYTES // block_bytes)
    chunks = []
    for first in range(0, blocks, per_chunk):
        n = min(per_chunk, blocks - first)
        scales = [2 * n * block_size * kv_heads * SCALE_BYTES] if bench.wire_dtype == "int8" else []
        chunks.append([n * block_bytes, *scales])
    payloads = chunks * stats.num_layers + [[]]
    header = (stats.bytes_sent - stats.payload_bytes) // len(payloads)
    plan = [[header, *frames] for frames in payloads]
    if sum(sum(m[1:]) for m in plan) != stats.payload_bytes:
        raise RuntimeError("the raw ZeroMQ plan does not match the bytes disagg sent")
    return plan


def run_raw(bench: Bench, plan: list[list[int]], rounds: int) -> list[dict[str, float]]:
    """Send `plan` `rounds` times over a bare PUSH socket to the child's PULL; time each round."""
    ready = bench.decode.request("raw_ready", op="raw", messages=len(plan), rounds=rounds)
    buffers = {size: memoryview(bytearray(b"\xa5") * size) for m in plan for size in m}
    payload = sum(sum(m[1:]) for m in plan)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    for option, value in ((zmq.SNDHWM, 16), (zmq.LINGER, 1000), (zmq.SNDTIMEO, SEND_TIMEOUT_MS)):
        sock.setsockopt(option, value)
    sock.connect(ready["address"])
    runs = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            for sizes in plan:
                sock.send_multipart([buffers[s] for s in sizes], copy=False)
            done = bench.decode.expect("raw_round")
            raw_s = (done["completed_at"] if bench.shared_clock else done["observed_at"]) - started
            runs.append({"raw_s": raw_s, "raw_gbps": payload / raw_s / 1e9})
    finally:
        sock.close()
        ctx.term()
    return runs


# -- one mode ---------------------------------------------------------------------------------


def bench_mode(mode: str, args: argparse.Namespace, cores: tuple[int, int]) -> dict[str, Any]:
    """All measurements of one wire mode; both processes are torn down before returning."""
    cache_dtype, wire = MODES[mode]
    blocks = blocks_for(args.prompt_len)
    setup = {
        "model": str(args.model), "dtype": cache_dtype, "wire_dtype": wire, "device": args.device,
        "prompt_len": args.prompt_len, "num_blocks": 2 * blocks + 4, "core": cores[1],
    }  # fmt: skip
    decode = DecodeProcess(setup)  # loads on its core while this process loads on its own
    side = None
    try:
        side = PrefillSide.build(setup)
        vocab = min(side.runtime.model.args.vocab_size, 32000)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
        bench = Bench(side, decode, prompt, wire or cache_dtype, clock_is_shared(decode))
        return measure(bench, mode, args.repeats)
    finally:
        decode.close()
        if side is not None:
            side.close()


def measure(bench: Bench, mode: str, repeats: int) -> dict[str, Any]:
    """One warm-up, then `repeats` timed runs of prefill, pipe and raw; medians of each metric."""
    prefill, pipe = [], []
    stats = None
    for i in range(1 + repeats):
        metrics, stats = run_prefill(bench, f"{mode}-prefill-{i}")
        prefill.append(metrics)
    for i in range(1 + repeats):
        pipe.append(run_pipe(bench, f"{mode}-pipe-{i}"))
    plan = message_plan(stats, bench)
    raw = run_raw(bench, plan, 1 + repeats)
    runs = {"prefill": prefill[1:], "pipe": pipe[1:], "raw": raw[1:]}
    median = {k: statistics.median(r[k] for r in rs) for rs in runs.values() for k in rs[0]}
    median["eff_over_raw"] = median["effective_gbps"] / median["raw_gbps"]
    median["pipe_over_raw"] = median["pipe_gbps"] / median["raw_gbps"]
    return {
        "shared_clock": bench.shared_clock,
        "affinity": {
            "prefill": sorted(os.sched_getaffinity(0)),
            "decode": bench.decode.ready["cores"],
        },
        "messages_per_prompt": len(plan),
        "frame_bytes": sorted({s for m in plan for s in m}),
        "runs": runs,
        "median": median,
    }


# -- report -----------------------------------------------------------------------------------

COLUMNS = (
    ("mode", "{:<11}", None),
    ("prefill ms", "{:>10.0f}", ("prefill_s", 1e3)),
    ("pack ms", "{:>8.1f}", ("pack_s", 1e3)),
    ("KV MB", "{:>7.2f}", ("payload_bytes", 1e-6)),
    ("wire MB", "{:>8.2f}", ("wire_bytes", 1e-6)),
    ("exposed ms", "{:>10.1f}", ("exposed_s", 1e3)),
    ("exposed %", "{:>9.3f}", ("exposed_frac", 100)),
    ("eff GB/s", "{:>8.3f}", ("effective_gbps", 1)),
    ("pipe pack ms", "{:>12.1f}", ("pipe_pack_s", 1e3)),
    ("pipe GB/s", "{:>9.3f}", ("pipe_gbps", 1)),
    ("raw GB/s", "{:>8.3f}", ("raw_gbps", 1)),
    ("eff/raw", "{:>7.3f}", ("eff_over_raw", 1)),
    ("pipe/raw", "{:>8.3f}", ("pipe_over_raw", 1)),
)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per mode of the medians."""
    widths = [len(fmt.format(0 if key else "")) for _, fmt, key in COLUMNS]
    lines = ["  ".join(f"{name:>{w}}" for (name, _, _), w in zip(COLUMNS, widths))]
    for mode, result in results.items():
        median = result["median"]
        cells = [
            fmt.format(MODE_LABELS[mode]) if key is None else fmt.format(median[key[0]] * key[1])
            for _, fmt, key in COLUMNS
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def machine_info(args: argparse.Namespace, cores: tuple[int, int]) -> dict[str, Any]:
    """Where and when this ran."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zmq": zmq.zmq_version(),
        "device": args.device,
        "cores": {"prefill": cores[0], "decode": cores[1]},
        "torch_threads_per_process": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def print_header(info: dict[str, Any], args: argparse.Namespace, params: int | None) -> None:
    size = f"{params / 1e6:.0f}M params" if params else "parameters unknown"
    print(f"disagg KV transfer benchmark  {info['date']}")
    print(
        f"machine: {info['host_cpus']} cpus ({info['cpu']}), prefill on core "
        f"{info['cores']['prefill']}, decode on core {info['cores']['decode']}, "
        f"{info['torch_threads_per_process']} torch thread each, device {info['device']}, "
        f"load avg {info['load_average'][0]:.2f}"
    )
    print(
        f"model: {args.model} ({size}); prompt {args.prompt_len} tokens, block {BLOCK_SIZE}, "
        f"max chunk {DEFAULT_MAX_CHUNK_BYTES >> 20} MiB; "
        f"medians of {args.repeats} runs after 1 warm-up"
    )


def print_contention(results: dict[str, dict[str, Any]]) -> None:
    """Warn when the prefill thread did not have its core: its compute times are then inflated."""
    for mode, result in results.items():
        shares = [run["cpu_share"] for run in result["runs"]["prefill"]]
        if min(shares) < CONTENDED_CPU_SHARE:
            print(
                f"warning: {MODE_LABELS[mode]}: the prefill thread got "
                f"{', '.join(f'{s:.0%}' for s in shares)} of its core per run (other processes "
                "or its own sender thread competed for it); its prefill/pack times are inflated"
            )


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: ~100M Llama)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--cpus", default=None, help="PREFILL,DECODE cores (default: first two)")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(args.modes) - set(MODES):
        p.error(f"unknown modes {sorted(unknown)}; choose from {list(MODES)}")
    if args.prompt_len < 1 or args.repeats < 1:
        p.error("--prompt-len and --repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = pick_cores(args.cpus)
    pin_to_core(cores[0])  # before any thread (ZeroMQ I/O, sender) starts: they inherit it
    configure_logging("warning")
    params = None
    if args.model is None:
        args.model, params = bench_checkpoint(), parameter_count(BENCH_SPEC)
    info = machine_info(args, cores)
    print_header(info, args, params)
    results = {}
    for mode in args.modes:
        print(f"  running {MODE_LABELS[mode]} ...", file=sys.stderr, flush=True)
        results[mode] = bench_mode(mode, args, cores)
    clocks = {r["shared_clock"] for r in results.values()}
    print(
        "clock: "
        + ("shared CLOCK_MONOTONIC" if clocks == {True} else "parent-observed (upper bound)")
    )
    print(format_table(results))
    print_contention(results)
    if args.json:
        out = {
            "machine": info,
            "config": {**vars(args), "model": str(args.model)},
            "modes": results,
        }
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
