"""How fast disagg moves KV from a prefill to a decode worker, against raw ZeroMQ, in one run.

Two processes, each pinned to its own core with one torch thread (`--cpus PREFILL,DECODE`): this
one runs a PrefillWorker + KVSender, a spawned child (`kv_transfer_decode.py`) runs a DecodeWorker
+ KVReceiver. The child is driven by JSON over a multiprocessing Pipe (the benchmark's own control
channel; KV only ever moves over the product's ZeroMQ sockets). For each wire mode (fp32 cache
-> fp32 wire, bf16 -> bf16, fp32 -> int8) it measures, after one warm-up, the median of
`--repeats` runs of:

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
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import torch
import zmq

from disagg.benchmarks.harness.checkpoint import BENCH_SPEC, bench_checkpoint
from disagg.benchmarks.kv_transfer_decode import (
    IDLE_WAIT_S,
    STEP_TIMEOUT_S,
    DecodeProcess,
    blocks_for,
    clock_is_shared,
    pick_cores,
    pin_to_core,
    runtime_config,
)
from disagg.benchmarks.kv_transfer_report import (
    MODE_LABELS,
    format_table,
    machine_info,
    print_contention,
    print_header,
)
from disagg.cli.tiny import parameter_count
from disagg.services.workers.prefill import PrefillJob, PrefillWorker
from disagg.shared.engine.runtime import Runtime, build_runtime
from disagg.shared.log import configure_logging
from disagg.shared.protocol.descriptor import TransferDescriptor
from disagg.shared.protocol.sampling import SamplingParams
from disagg.shared.transfer.layout import WIRE_DTYPES
from disagg.shared.transfer.sender import DEFAULT_MAX_CHUNK_BYTES, TransferStats
from disagg.shared.transfer.sockets import KVSender

# mode -> (KV cache dtype on both sides, wire dtype; None = the cache's own)
MODES: dict[str, tuple[str, str | None]] = {
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "int8": ("float32", "int8"),
}
SCALE_BYTES = 4  # one float32 scale per (kv, token, kv head) on the int8 wire
SEND_TIMEOUT_MS = 10_000


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
        return msgspec.convert(reply["transfer"], TransferDescriptor)

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
