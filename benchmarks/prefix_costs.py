"""What a cached prefix saves, and the two ways to give a prefill worker a prefix decode holds.

When a prompt's prefix is cached on its decode worker but not on the prefill worker, the prefill
worker needs the prefix's KV to compute the suffix. Either it **recomputes** the prefix (what
disagg does: it then ships only the suffix's blocks, decode keeps its own copy of the prefix),
or decode **ships** the prefix blocks to it first (a reverse transfer before the prefill). This
measures, on one core with one torch thread, for each prefix length L:

- `full`: prefill of L + S tokens from nothing (no cache anywhere);
- `suffix`: prefill of the S suffix tokens with the L prefix in the engine's own prefix cache;
- `recompute` = full - suffix: the price of the prefix on a prefill worker that lacks it;
- `ship`: the L tokens' KV pushed through disagg's KVSender -> KVReceiver (real ZeroMQ over
  127.0.0.1, in one process: sender thread and receiver poller), every layer back to back.

And, to set the default of `disagg scheduler --local-prefill-threshold`, for small n: the decode
engine's step time when it prefills n uncached tokens itself (the stall every running decode
shares), against the control-plane round trips a remote prefill adds (place, admit, job: three
NATS request/replies through a real nats-server) or a tenth of a decode step, whichever is more.

Run from the repository root: `python benchmarks/prefix_costs.py [--json PATH]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import nats
import torch

from disagg.benchmarks.harness.checkpoint import bench_checkpoint
from disagg.cli.procs import NatsServer
from disagg.shared.engine.runtime import RuntimeConfig, build_runtime
from disagg.shared.engine.scheduler import EngineConfig
from disagg.shared.protocol.descriptor import TransferDescriptor
from disagg.shared.protocol.sampling import SamplingParams
from disagg.shared.transfer.sockets import KVReceiver, KVSender

SUFFIX = 32
PARAMS = SamplingParams(max_tokens=1, ignore_eos=True)


def prompt(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def timed_prefill(engine, rid: str, tokens: list[int]) -> float:
    """Seconds from add_request until the first token (the request's whole prefill)."""
    start = time.perf_counter()
    engine.add_request(rid, tokens, PARAMS)
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def ship_seconds(rt, receiver: KVReceiver, sender: KVSender, n_tokens: int) -> tuple[float, int]:
    """Push the KV of `n_tokens` (blocks of this cache onto themselves) and time it."""
    bs, kv = rt.pool.block_size, rt.engine.kv_cache
    blocks = rt.pool.allocate(-(-n_tokens // bs))
    try:
        desc = TransferDescriptor.new(
            address=receiver.address, block_ids=blocks, block_size=bs,
            num_layers=kv.num_layers, wire_dtype=str(kv.dtype).removeprefix("torch."),
            model_fingerprint=rt.fingerprint, deadline_s=60.0,
        )  # fmt: skip
        receiver.expect(desc, kv.data)
        start = time.perf_counter()
        handle = sender.begin(desc, blocks, kv.data)
        for layer in range(kv.num_layers):
            handle.send_layer(layer)
        handle.finish(0)
        deadline = start + 60
        while not (done := receiver.poll_completed(0.01)):
            if time.perf_counter() > deadline:
                raise TimeoutError("the transfer did not complete")
        assert done[0].ok, done[0].error
        return time.perf_counter() - start, handle.stats.payload_bytes
    finally:
        rt.pool.free(blocks)


async def nats_round_trip_s(repeats: int = 200) -> float:
    server = NatsServer().start()
    try:
        nc = await nats.connect(server.url)

        async def echo(msg) -> None:
            await msg.respond(msg.data)

        await nc.subscribe("bench.echo", cb=echo)
        body = b"x" * 512  # about an AdmitRequest's size
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            await nc.request("bench.echo", body, timeout=5)
            samples.append(time.perf_counter() - start)
        await nc.close()
        return statistics.median(samples)
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the 100M bench model")
    ap.add_argument("--prefix-lens", default="128,512,1024")
    ap.add_argument("--local-lens", default="8,16,32,64,128,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rtt = asyncio.run(nats_round_trip_s())
    model = args.model or bench_checkpoint()
    rt = build_runtime(
        RuntimeConfig(
            model=model, kv_memory_gb=1.0, engine=EngineConfig(max_num_batched_tokens=4096)
        )
    )
    engine, vocab = rt.engine, rt.model.args.vocab_size
    sender, receiver = KVSender(rt.fingerprint), KVReceiver("127.0.0.1")
    rows, seed = [], 0
    try:
        timed_prefill(engine, "warm-up", prompt(seed, 64, vocab))
        for length in map(int, args.prefix_lens.split(",")):
            full, suffix, ship = [], [], []
            for _ in range(args.repeats):
                seed += 1
                prefix = prompt(seed, length, vocab)
                full.append(
                    timed_prefill(engine, f"f{seed}", prefix + prompt(-seed, SUFFIX, vocab))
                )
                suffix.append(
                    timed_prefill(engine, f"s{seed}", prefix + prompt(seed + 10**6, SUFFIX, vocab))
                )
                seconds, nbytes = ship_seconds(rt, receiver, sender, length)
                ship.append(seconds)
            f, s, sh = (statistics.median(x) for x in (full, suffix, ship))
            rows.append({"prefix": length, "full_ms": f * 1e3, "suffix_ms": s * 1e3,
                         "recompute_ms": (f - s) * 1e3, "ship_ms": sh * 1e3,
                         "kv_mb": nbytes / 1e6, "recompute_over_ship": (f - s) / sh})  # fmt: skip
        # A decode batch of 8 running requests, then each n-token prefill joining it.
        batch = [prompt(10**7 + i, 64, vocab) for i in range(8)]
        for i, p in enumerate(batch):
            engine.add_request(f"run{i}", p, SamplingParams(max_tokens=10**4, ignore_eos=True))
        for _ in range(3):
            engine.step()
        decode_steps = []
        for _ in range(5):
            start = time.perf_counter()
            engine.step()
            decode_steps.append(time.perf_counter() - start)
        decode_step = statistics.median(decode_steps)
        local = []
        for n in map(int, args.local_lens.split(",")):
            steps = []
            for r in range(args.repeats):
                engine.add_request(f"loc{n}-{r}", prompt(10**8 + n * 10 + r, n, vocab), PARAMS)
                start = time.perf_counter()
                engine.step()  # 8 decodes + this prompt's whole prefill
                steps.append(time.perf_counter() - start)
            local.append({"uncached": n, "step_ms": statistics.median(steps) * 1e3})
    finally:
        sender.close()
        receiver.close()
    remote_ms = 3 * rtt * 1e3
    # Prefilling locally pays when it stalls the batch no more than the remote path's control
    # round trips would delay this request, or than a tenth of a decode step (noise level).
    budget_ms = max(remote_ms, 0.1 * decode_step * 1e3)
    threshold = 0
    for r in local:  # the longest n such that every measured n' <= n is within budget
        if r["step_ms"] - decode_step * 1e3 > budget_ms:
            break
        threshold = r["uncached"]
    print(f"model {model.name}, 1 thread, suffix {SUFFIX} tokens")
    print(f"{'prefix':>7} {'full ms':>9} {'suffix ms':>10} {'recompute ms':>13} {'ship ms':>8} "
          f"{'KV MB':>7} {'recompute/ship':>15}")  # fmt: skip
    for r in rows:
        print(f"{r['prefix']:>7} {r['full_ms']:>9.1f} {r['suffix_ms']:>10.1f} "
              f"{r['recompute_ms']:>13.1f} {r['ship_ms']:>8.2f} {r['kv_mb']:>7.2f} "
              f"{r['recompute_over_ship']:>15.1f}")  # fmt: skip
    print(
        f"decode step, batch 8: {decode_step * 1e3:.1f} ms; 3 NATS round trips: {remote_ms:.2f} ms"
    )
    for r in local:
        extra = r["step_ms"] - decode_step * 1e3
        print(f"  local prefill of {r['uncached']:>4} tokens in that step: {r['step_ms']:.1f} ms "
              f"(+{extra:.1f} ms on every running decode)")  # fmt: skip
    print(f"local prefill within budget ({budget_ms:.1f} ms) up to n = {threshold} tokens")
    if args.json:
        args.json.write_text(json.dumps({"prefix": rows, "decode_step_ms": decode_step * 1e3,
                                         "nats_rtt_ms": rtt * 1e3, "local": local,
                                         "threshold": threshold}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
