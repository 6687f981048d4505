"""A prefill worker in its own process, for the data-path tests (the NATS shell comes later).

Control is JSON lines (stdin: jobs and aborts; stdout: first tokens and transfer timelines); the
KV itself goes over the real ZeroMQ sockets of shared.transfer. Run:
    python -m tests.prefill_proc --model DIR [--blocks N] [--block-size B] [--layer-delay-s S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import msgspec
import torch

from disagg.services.workers.prefill import PrefillJob, PrefillWorker
from disagg.shared.engine.runtime import RuntimeConfig, build_runtime
from disagg.shared.engine.scheduler import EngineConfig
from disagg.shared.protocol.descriptor import TransferDescriptor
from disagg.shared.protocol.sampling import SamplingParams
from disagg.shared.transfer.sockets import KVSender


def emit(**event) -> None:
    print(json.dumps(event), flush=True)


def read_stdin(lines: queue.Queue) -> None:
    for line in sys.stdin:
        lines.put(json.loads(line))
    lines.put({"op": "quit"})


def slow_layers(worker: PrefillWorker, delay_s: float) -> None:
    """Stretch each layer's compute so tests can act mid-transfer."""
    ship = worker.engine.on_layer

    def delayed(layer, completing):
        ship(layer, completing)
        time.sleep(delay_s)

    worker.engine.on_layer = delayed


def handle(worker: PrefillWorker, msg: dict) -> bool:
    if msg["op"] == "quit":
        return False
    if msg["op"] == "abort":
        emit(event="aborted", request_id=msg["request_id"], found=worker.abort(msg["request_id"]))
        return True
    params = msgspec.convert(msg["params"], SamplingParams)
    job = PrefillJob(
        msg["request_id"],
        msg["prompt"],
        params,
        msgspec.convert(msg["transfer"], TransferDescriptor),
    )
    try:
        worker.submit(job)
    except Exception as err:  # reported to the test, which asserts on it
        emit(event="rejected", request_id=job.request_id, error=str(err))
    return True


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--blocks", type=int, default=256)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--layer-delay-s", type=float, default=0.0)
    p.add_argument("--max-chunk-bytes", type=int, default=4 << 20)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = RuntimeConfig(
        model=args.model, dtype=args.dtype, num_blocks=args.blocks, block_size=args.block_size,
        engine=EngineConfig(max_num_batched_tokens=args.budget),
    )  # fmt: skip
    rt = build_runtime(cfg)
    sender = KVSender(rt.fingerprint, max_chunk_bytes=args.max_chunk_bytes)
    worker = PrefillWorker(rt.engine, sender)
    if args.layer_delay_s:
        slow_layers(worker, args.layer_delay_s)
    lines: queue.Queue = queue.Queue(maxsize=1024)
    threading.Thread(target=read_stdin, args=(lines,), daemon=True).start()
    emit(event="ready", fingerprint=rt.fingerprint)
    running = True
    while running or worker.has_work():
        with contextlib.suppress(queue.Empty):
            running = handle(worker, lines.get(timeout=0.002 if worker.has_work() else 0.05))
        for result in worker.step() if worker.has_work() else []:
            emit(event="first_token", **asdict(result))
        for sent in worker.poll_sent():
            emit(
                event="sent", request_id=sent.request_id, error=sent.error, stats=asdict(sent.stats)
            )
    sender.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
