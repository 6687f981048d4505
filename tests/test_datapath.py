"""Disaggregated data path across two real processes: prefill pushes KV over ZeroMQ into the blocks
decode reserved; decode continues. Greedy output must equal transformers token for token."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import msgspec
import pytest
import torch
import zmq

from disagg.kernels.kv_pack import pack_kv, unpack_kv
from disagg.services.workers.decode import AdmitError, DecodeWorker
from disagg.shared.engine.runtime import RuntimeConfig, build_runtime
from disagg.shared.model.batch import ForwardBatch
from disagg.shared.protocol.sampling import SamplingParams
from disagg.shared.transfer.sockets import KVReceiver
from tests.conftest import assert_pool_full, hf_greedy

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 4
TIMEOUT_S = 60.0


class PrefillProcess:
    """`tests/prefill_proc.py` in a child process, driven by JSON lines; killed by PID at exit."""

    def __init__(self, model: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "tests.prefill_proc", "--model", str(model)]
        cmd += ["--block-size", str(BLOCK), *extra]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.events: queue.Queue = queue.Queue(maxsize=10_000)
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.expect("ready")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def send(self, **msg) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")

    def job(self, request_id, prompt, params, transfer) -> None:
        params = msgspec.to_builtins(params)
        self.send(
            op="job",
            request_id=request_id,
            prompt=prompt,
            params=params,
            transfer=msgspec.to_builtins(transfer),
        )

    def expect(self, event: str, timeout: float = TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.events.get(timeout=left)
            except queue.Empty:
                break
            if msg["event"] == event:
                return msg
        raise AssertionError(f"prefill process sent no {event!r} within {timeout} s")

    def drain(self) -> list[dict]:
        out = []
        while not self.events.empty():
            out.append(self.events.get_nowait())
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send(op="quit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        self.kill()


@pytest.fixture
def decode_side(request):
    """Build (model path, **overrides) -> DecodeWorker with a real KVReceiver on 127.0.0.1."""
    made = []

    def make(
        model: Path,
        *,
        blocks: int = 128,
        deadline_s: float = 30.0,
        wire_dtype=None,
        dtype="float32",
    ):
        rt = build_runtime(
            RuntimeConfig(model=model, dtype=dtype, num_blocks=blocks, block_size=BLOCK)
        )
        receiver = KVReceiver("127.0.0.1")
        worker = DecodeWorker(
            rt.engine, receiver, fingerprint=rt.fingerprint, transfer_deadline_s=deadline_s,
            wire_dtype=wire_dtype,
        )  # fmt: skip
        made.append(receiver)
        return worker

    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture
def prefill_procs():
    procs = []

    def start(model: Path, *extra: str) -> PrefillProcess:
        procs.append(PrefillProcess(model, *extra))
        return procs[-1]

    yield start
    for proc in procs:
        proc.close()


def run_decode(decode: DecodeWorker, request_ids, timeout: float = TIMEOUT_S):
    """Step decode until every request finished; returns (tokens, finish outputs) per id."""
    tokens = {rid: {} for rid in request_ids}
    finals = {}
    deadline = time.monotonic() + timeout
    while len(finals) < len(request_ids):
        if time.monotonic() >= deadline:
            pytest.fail(f"unfinished: {set(request_ids) - set(finals)}")
        outs = decode.step()
        if not outs:
            time.sleep(0.002)
        for out in outs:
            for i, t in enumerate(out.new_token_ids):
                tokens[out.request_id][out.index + i] = t
            if out.finished:
                finals[out.request_id] = out
    as_list = {rid: [seq[i] for i in sorted(seq)] for rid, seq in tokens.items()}
    return as_list, finals


def disagg_generate(decode, prefill, prompts, params):
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        prefill.job(rid, prompt, params, decode.admit(rid, prompt, params))
    tokens, finals = run_decode(decode, ids)
    firsts = {}
    for _ in ids:
        msg = prefill.expect("first_token")
        firsts[msg["request_id"]] = msg["first_token"]
    return [tokens[r] for r in ids], finals, [firsts[r] for r in ids]


def prompts_of(lens, seed=0, vocab=380):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_two_processes_equal_transformers(checkpoints, decode_side, prefill_procs, arch):
    model = checkpoints(arch=arch)
    decode = decode_side(model)
    prefill = prefill_procs(model, "--budget", "8")  # chunked prefill on the prefill side too
    prompts = prompts_of((1, 5, 19, 9))  # a single token, and one longer than 4 blocks
    params = SamplingParams(max_tokens=10)
    outs, finals, firsts = disagg_generate(decode, prefill, prompts, params)
    for prompt, out, first in zip(prompts, outs, firsts):
        assert out == hf_greedy(model, prompt, 10)
        assert out[0] == first  # the first token straight from prefill equals decode's
    assert all(f.finish_reason in ("stop", "length") for f in finals.values())
    assert_pool_full(decode.pool)


def test_heterogeneous_bf16_prefill_into_fp32_decode(checkpoints, decode_side, prefill_procs):
    model = checkpoints(arch="llama")
    decode = decode_side(model, dtype="float32")
    prefill = prefill_procs(model, "--dtype", "bfloat16")
    prompts = prompts_of((7, 13), seed=1)
    outs, _, _ = disagg_generate(decode, prefill, prompts, SamplingParams(max_tokens=8))
    for prompt, out in zip(prompts, outs):
        assert len(out) == 8 or out[-1] in decode.engine.scheduler.eos_ids
        ref = hf_greedy(model, prompt, 8)
        assert out[0] == ref[0]  # bf16 prompt KV, fp32 decode: at least the first token agrees
    assert_pool_full(decode.pool)


def test_fingerprint_mismatch_is_refused(checkpoints, decode_side, prefill_procs):
    decode = decode_side(checkpoints(arch="llama"))
    prefill = prefill_procs(checkpoints(arch="llama", num_layers=3))
    prompt = [1, 2, 3]
    prefill.job("x", prompt, SamplingParams(), decode.admit("x", prompt, SamplingParams()))
    msg = prefill.expect("first_token")
    assert msg["first_token"] is None and "fingerprint mismatch" in msg["error"]
    decode.abort("x")
    assert_pool_full(decode.pool)


def test_int8_wire_agrees_with_fp32(checkpoints, decode_side, prefill_procs):
    # Measured (2026-11-24, this CPU): 16/16 greedy tokens agree for each of the 3 prompts with INT8
    # KV on the wire (per-token, per-head scales). The bound asserted is looser, 0.9 on average, so
    # a harmless rounding change elsewhere cannot fail it; a broken scale layout fails it at once.
    # The logit error INT8 KV causes is measured and bounded in test_int8_kv_logit_error.
    model = checkpoints(arch="qwen2")
    prompts = prompts_of((6, 17, 11), seed=2)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    fp32 = decode_side(model)
    ref, _, _ = disagg_generate(fp32, prefill_procs(model), prompts, params)
    int8 = decode_side(model, wire_dtype="int8")
    got, _, _ = disagg_generate(int8, prefill_procs(model), prompts, params)
    agree = [sum(a == b for a, b in zip(r, g)) / 16 for r, g in zip(ref, got)]
    assert min(agree) >= 0.75, agree
    assert sum(agree) / len(agree) >= 0.9, agree
    assert_pool_full(fp32.pool)
    assert_pool_full(int8.pool)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int8_kv_logit_error(checkpoints, arch):
    # Measured (2026-11-24): INT8 prompt KV moves the next-step logits by at most 0.13 (llama) and
    # 0.18 (qwen2) at logit magnitudes of 20-30 (under 1%), top-1 unchanged for all 4 prompts.
    rt = build_runtime(
        RuntimeConfig(
            dtype="float32", model=checkpoints(arch=arch), num_blocks=32, block_size=BLOCK
        )
    )
    for prompt in prompts_of((6, 17, 11, 25), seed=2):
        n = -(-len(prompt) // BLOCK)
        table = list(range(n + 1))
        rt.cache.data.zero_()
        rt.model(ForwardBatch.build([(prompt, 0, table[:n])], [], BLOCK, [True]), rt.cache)
        exact = rt.cache.data.clone()
        ids = torch.tensor(table[:n])
        for layer in range(rt.cache.num_layers):
            data, scales = pack_kv(rt.cache.data[layer], ids, quantize=True)
            unpack_kv(rt.cache.data[layer], ids, data, scales)
        probe = ForwardBatch.build([], [(prompt[-1], len(prompt), table)], BLOCK, [])
        with_int8 = rt.model(probe, rt.cache)
        rt.cache.data.copy_(exact)
        with_exact = rt.model(probe, rt.cache)
        assert (with_int8 - with_exact).abs().max() < 0.5
        assert with_int8.argmax() == with_exact.argmax()


def test_overlap_layer_sends_interleave_with_compute(checkpoints, decode_side, prefill_procs):
    model = checkpoints(arch="llama", hidden_size=256, intermediate_size=768, num_layers=6)
    decode = decode_side(model, blocks=256)
    prefill = prefill_procs(model, "--blocks", "256")
    prompt = prompts_of((300,), seed=3)[0]
    params = SamplingParams(max_tokens=2)
    prefill.job("big", prompt, params, decode.admit("big", prompt, params))
    run_decode(decode, ["big"])
    stats = prefill.expect("sent")["stats"]
    called, sent = stats["layer_called_at"], stats["layer_sent_at"]
    # Layer i's KV left while later layers were still computing: its last byte went out before
    # the last layer's KV was even written.
    assert sent[0] < called[-1], (sent, called)
    assert sorted(called) == called and sorted(sent) == sent
    assert stats["done_sent_at"] >= stats["finish_called_at"]
    assert_pool_full(decode.pool)


# -- fault paths: each ends with decode's pool full --------------------------------------------


def test_sender_killed_mid_transfer(checkpoints, decode_side, prefill_procs):
    model = checkpoints(arch="llama")
    decode = decode_side(model, deadline_s=3.0)
    prefill = prefill_procs(model, "--layer-delay-s", "1.0")  # 2 layers: 2 s per prompt
    prompt, params = list(range(30)), SamplingParams(max_tokens=4)
    prefill.job("k", prompt, params, decode.admit("k", prompt, params))
    time.sleep(0.5)  # inside the first layer's delay: layer 0 is on the wire, layer 1 is not
    prefill.kill()
    _, finals = run_decode(decode, ["k"], timeout=30)
    assert finals["k"].finish_reason == "error" and "deadline" in finals["k"].error
    assert_pool_full(decode.pool)


def test_deadline_passes_without_a_sender(checkpoints, decode_side):
    decode = decode_side(checkpoints(arch="llama"), deadline_s=0.5)
    decode.admit("lonely", [1, 2, 3, 4, 5], SamplingParams())
    assert decode.pool.num_free < decode.pool.num_blocks
    _, finals = run_decode(decode, ["lonely"], timeout=10)
    assert finals["lonely"].finish_reason == "error"
    assert_pool_full(decode.pool)


def raw_push(address: str, parts: list[bytes]) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(address)
    sock.send_multipart(parts)
    sock.close()
    ctx.term()


def layer_header(transfer, token: str, nbytes: int, nblocks: int) -> bytes:
    geometry = [2, nblocks, BLOCK, 2, 16]  # tiny llama: 2 kv heads, head_dim 16
    return msgpack.packb({
        "v": 1, "tid": transfer.transfer_id, "tok": token, "kind": "layer", "layer": 0,
        "chunk": 0, "nchunks": 1, "first_block": 0, "nblocks": nblocks, "dtype": "float32",
        "shape": geometry, "nbytes": nbytes,
    })  # fmt: skip


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.01)


def test_forged_and_broken_frames(checkpoints, decode_side, prefill_procs):
    model = checkpoints(arch="llama")
    decode = decode_side(model, deadline_s=20.0)
    receiver = decode.receiver
    params = SamplingParams(max_tokens=6)
    prompt = prompts_of((8,), seed=4)[0]
    good = decode.admit("good", prompt, params)
    nblocks = len(good.block_ids)
    nbytes = 2 * nblocks * BLOCK * 2 * 16 * 4
    before = torch.clone(decode.engine.kv_cache.data)
    # A frame with the wrong token: dropped, nothing written, the transfer lives on.
    raw_push(good.address, [layer_header(good, "0" * 32, nbytes, nblocks), b"\x01" * nbytes])
    # A frame for a transfer nobody expects: dropped.
    other = decode.admit("other", [1, 2, 3], params)
    decode.abort("other")
    raw_push(good.address, [layer_header(other, other.token, 48 * 4, 1), b"\x00" * 48 * 4])
    wait_for(
        lambda: (
            receiver.dropped.get("bad_token")
            and (
                receiver.dropped.get("closed_transfer") or receiver.dropped.get("unknown_transfer")
            )
        )
    )
    assert torch.equal(before, decode.engine.kv_cache.data)
    # The real prefill still completes the good transfer, token for token.
    prefill = prefill_procs(model)
    prefill.job("good", prompt, params, good)
    tokens, _ = run_decode(decode, ["good"])
    assert tokens["good"] == hf_greedy(model, prompt, 6)
    # A truncated frame from the rightful sender (right token) fails that transfer.
    victim = decode.admit("victim", prompt, params)
    raw_push(victim.address, [layer_header(victim, victim.token, nbytes, nblocks), b"\x00" * 10])
    _, finals = run_decode(decode, ["victim"], timeout=10)
    assert finals["victim"].finish_reason == "error"
    assert_pool_full(decode.pool)


def test_abort_mid_transfer(checkpoints, decode_side, prefill_procs):
    model = checkpoints(arch="llama")
    decode = decode_side(model)
    prefill = prefill_procs(model, "--layer-delay-s", "0.5")
    prompt, params = list(range(20)), SamplingParams(max_tokens=4)
    prefill.job("a", prompt, params, decode.admit("a", prompt, params))
    time.sleep(0.3)  # layer 0 sent, layer 1 computing
    assert decode.abort("a")
    assert_pool_full(decode.pool)  # freed at once, before any late frame
    prefill.expect("first_token")  # prefill finishes its side; its late frames are dropped
    wait_for(lambda: sum(decode.receiver.dropped.values()) >= 1)
    assert not decode.has_work()
    assert_pool_full(decode.pool)


def test_admit_refuses_when_full_and_bad_prompts(checkpoints, decode_side):
    decode = decode_side(checkpoints(arch="llama"), blocks=4)  # 16 token slots
    with pytest.raises(AdmitError) as err:
        decode.admit("long", list(range(40)), SamplingParams())
    assert err.value.status == 400
    held = decode.admit("a", list(range(12)), SamplingParams())
    with pytest.raises(AdmitError) as err:
        decode.admit("b", list(range(8)), SamplingParams())
    assert err.value.status == 429
    with pytest.raises(AdmitError):
        decode.admit("a", [1], SamplingParams())  # duplicate id
    assert decode.abort("a") and held.transfer_id
    assert_pool_full(decode.pool)
