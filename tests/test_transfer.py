"""KV transfer protocol: real ZeroMQ sockets on 127.0.0.1, sender and receiver in one process."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import msgpack
import msgspec
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disagg.kernels.kv_pack import pack_kv
from disagg.shared.protocol.descriptor import TransferDescriptor, model_fingerprint
from disagg.shared.protocol.kv_wire import (
    DoneHeader,
    FrameError,
    LayerHeader,
    TransferError,
    check_payloads,
    parse_header,
)
from disagg.shared.transfer.receiver import ReceiverCore, TransferResult
from disagg.shared.transfer.sockets import KVReceiver, KVSender

FP = "0123456789abcdef"
LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 3, 16, 4, 2, 8
SRC_IDS = [3, 7, 1, 12, 5]
DST_IDS = [10, 2, 14, 0, 9]
SENTINEL = -7.0
WAIT_S = 10.0


def make_cache(dtype: torch.dtype = torch.float32, fill: str = "random", **dims: int):
    """[layers, 2, blocks, block_size, heads, head_dim], random or filled with SENTINEL."""
    shape = (
        dims.get("layers", LAYERS),
        2,
        dims.get("blocks", BLOCKS),
        dims.get("block_size", BLOCK_SIZE),
        dims.get("heads", HEADS),
        dims.get("head_dim", HEAD_DIM),
    )
    if fill == "random":
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    return torch.full(shape, SENTINEL, dtype=dtype)


def make_desc(address: str = "tcp://127.0.0.1:1", **overrides) -> TransferDescriptor:
    fields = dict(
        address=address,
        block_ids=DST_IDS,
        block_size=BLOCK_SIZE,
        num_layers=LAYERS,
        wire_dtype="float32",
        model_fingerprint=FP,
        deadline_s=30.0,
    )
    fields.update(overrides)
    return TransferDescriptor.new(**fields)


def wait_results(receiver, *transfer_ids: str) -> dict[str, TransferResult]:
    """Poll until every id has its result; a result for any other id fails the test."""
    results: dict[str, TransferResult] = {}
    deadline = time.monotonic() + WAIT_S
    while len(results) < len(transfer_ids):
        if time.monotonic() >= deadline:
            pytest.fail(f"results for {sorted(results)} only")
        for result in receiver.poll_completed(timeout=0.1):
            assert result.transfer_id in transfer_ids, result
            results[result.transfer_id] = result
    return results


def wait_result(receiver, transfer_id: str) -> TransferResult:
    return wait_results(receiver, transfer_id)[transfer_id]


def wait_dropped(receiver, reason: str, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while receiver.dropped.get(reason, 0) < count:
        if time.monotonic() >= deadline:
            pytest.fail(f"dropped={receiver.dropped}, want {reason}>={count}")
        time.sleep(0.01)


def run_transfer(sender: KVSender, desc, src, src_ids=SRC_IDS, first_token: int = 7):
    handle = sender.begin(desc, src_ids, src)
    for layer in range(desc.num_layers):
        handle.send_layer(layer)
    handle.finish(first_token)
    return handle.wait(WAIT_S)


def assert_landed(dst, src, dst_ids=DST_IDS, src_ids=SRC_IDS) -> None:
    """Reserved blocks hold the source blocks exactly; every other block is untouched."""
    assert torch.equal(dst[:, :, dst_ids], src[:, :, src_ids].to(dst.dtype))
    others = [b for b in range(dst.shape[2]) if b not in dst_ids]
    assert (dst[:, :, others] == SENTINEL).all()


@pytest.fixture
def receiver() -> Iterator[KVReceiver]:
    with KVReceiver("127.0.0.1", 0) as rx:
        yield rx


@pytest.fixture
def sender() -> Iterator[KVSender]:
    with KVSender(FP, send_timeout_s=5.0) as tx:
        yield tx


@pytest.fixture
def push(receiver) -> Iterator[zmq.Socket]:
    """A raw PUSH socket to the receiver, for hand-made (forged, broken) messages."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 5000)
    sock.connect(receiver.address)
    yield sock
    sock.close(linger=0)
    ctx.term()


def layer_message(desc, src, layer: int = 0, **overrides) -> list[bytes]:
    """A well-formed single-chunk float32 layer message for ``desc``, then ``overrides``.

    The payload is a bytearray, writable like the ZeroMQ frames the receiver gets.
    """
    data, _ = pack_kv(src[min(layer, len(src) - 1)], torch.tensor(SRC_IDS))
    fields = dict(
        transfer_id=desc.transfer_id,
        token=desc.token,
        layer=layer,
        chunk=0,
        nchunks=1,
        first_block=0,
        nblocks=len(SRC_IDS),
        dtype="float32",
        shape=tuple(data.shape),
        nbytes=data.numel() * 4,
    )
    fields.update(overrides)
    return [LayerHeader(**fields).encode(), bytearray(data.numpy().tobytes())]


def done_message(desc, first_token: int = 1, fingerprint: str = FP) -> list[bytes]:
    header = DoneHeader(
        transfer_id=desc.transfer_id, token=desc.token, first_token=first_token,
        fingerprint=fingerprint,
    )  # fmt: skip
    return [header.encode()]


# --- end to end -------------------------------------------------------------------------------


def test_full_transfer_lands_bit_exact_in_reserved_blocks(receiver, sender):
    src, dst = make_cache(), make_cache(fill="sentinel")
    desc = make_desc(receiver.address)
    receiver.expect(desc, dst)
    stats = run_transfer(sender, desc, src, first_token=42)
    result = wait_result(receiver, desc.transfer_id)
    assert result.ok and result.error is None
    assert result.first_token == 42
    assert result.bytes_received == stats.payload_bytes == src[:, :, SRC_IDS].numel() * 4
    assert stats.bytes_sent > stats.payload_bytes
    assert_landed(dst, src)
    assert receiver.dropped == {}


def test_chunked_layers_land_exact(receiver):
    src, dst = make_cache(), make_cache(fill="sentinel")
    block_bytes = 2 * BLOCK_SIZE * HEADS * HEAD_DIM * 4
    with KVSender(FP, max_chunk_bytes=2 * block_bytes) as tx:
        desc = make_desc(receiver.address)
        receiver.expect(desc, dst)
        handle = tx.begin(desc, SRC_IDS, src)
        assert len(handle.chunks) == 3  # 5 blocks in chunks of 2, 2, 1
        for layer in range(LAYERS):
            handle.send_layer(layer)
        handle.finish(3)
        handle.wait(WAIT_S)
        assert wait_result(receiver, desc.transfer_id).ok
    assert_landed(dst, src)


def test_zero_copy_buffer_reuse_with_one_buffer_stays_exact(receiver):
    """Buffers above ZeroMQ's copy threshold go zero-copy; a pool of one must wait on trackers."""
    dims = dict(layers=12, blocks=8, block_size=16, heads=4, head_dim=64)
    src, dst = make_cache(**dims), make_cache(fill="sentinel", **dims)
    ids = list(range(8))
    with KVSender(FP, pool_size=1, max_chunk_bytes=128 << 10) as tx:
        desc = make_desc(receiver.address, block_ids=ids[::-1], block_size=16, num_layers=12)
        receiver.expect(desc, dst)
        run_transfer(tx, desc, src, src_ids=ids)
        assert wait_result(receiver, desc.transfer_id).ok
    assert torch.equal(dst[:, :, ids[::-1]], src[:, :, ids])


def test_bf16_sender_to_fp32_receiver_converts(receiver, sender):
    src = make_cache(torch.bfloat16)
    dst = make_cache(fill="sentinel")
    desc = make_desc(receiver.address, wire_dtype="bfloat16")
    receiver.expect(desc, dst)
    stats = run_transfer(sender, desc, src)
    assert wait_result(receiver, desc.transfer_id).ok
    assert stats.payload_bytes == src[:, :, SRC_IDS].numel() * 2
    assert_landed(dst, src)


def test_fp32_cache_on_bf16_wire_is_converted_by_the_sender(receiver, sender):
    src, dst = make_cache(), make_cache(fill="sentinel")
    desc = make_desc(receiver.address, wire_dtype="bfloat16")
    receiver.expect(desc, dst)
    run_transfer(sender, desc, src)
    assert wait_result(receiver, desc.transfer_id).ok
    assert torch.equal(dst[:, :, DST_IDS], src[:, :, SRC_IDS].bfloat16().float())


@pytest.mark.parametrize("chunk_blocks", [2, BLOCKS])
def test_int8_wire_error_within_half_a_scale_and_quarter_bytes(receiver, chunk_blocks):
    src, dst = make_cache(), make_cache(fill="sentinel")
    desc = make_desc(receiver.address, wire_dtype="int8")
    receiver.expect(desc, dst)
    int8_block_bytes = 2 * BLOCK_SIZE * HEADS * HEAD_DIM
    with KVSender(FP, max_chunk_bytes=chunk_blocks * int8_block_bytes) as tx:
        stats = run_transfer(tx, desc, src)
        assert len(tx.begin(desc, SRC_IDS, src).chunks) == (3 if chunk_blocks == 2 else 1)
    assert wait_result(receiver, desc.transfer_id).ok
    for layer in range(LAYERS):
        _, scales = pack_kv(src[layer], torch.tensor(SRC_IDS), quantize=True)
        err = (dst[layer][:, DST_IDS] - src[layer][:, SRC_IDS]).abs()
        assert (err <= scales[..., None] / 2 * (1 + 1e-5)).all()
    fp32_bytes = src[:, :, SRC_IDS].numel() * 4
    scales_bytes = fp32_bytes // HEAD_DIM  # one float32 per head_dim values
    assert stats.payload_bytes == fp32_bytes // 4 + scales_bytes


def test_concurrent_transfers_interleaved(receiver, sender):
    src_a, src_b = make_cache(), make_cache() * 3
    dst = make_cache(fill="sentinel")
    desc_a = make_desc(receiver.address, block_ids=[0, 1, 2, 3, 4])
    desc_b = make_desc(receiver.address, block_ids=[15, 14, 13, 12, 11])
    receiver.expect(desc_a, dst)
    receiver.expect(desc_b, dst)
    handles = [sender.begin(desc_a, SRC_IDS, src_a), sender.begin(desc_b, SRC_IDS, src_b)]
    for layer in range(LAYERS):
        for handle in handles:
            handle.send_layer(layer)
    handles[1].finish(2)
    handles[0].finish(1)
    for handle in handles:
        handle.wait(WAIT_S)
    results = wait_results(receiver, desc_a.transfer_id, desc_b.transfer_id)
    assert results[desc_a.transfer_id].first_token == 1
    assert results[desc_b.transfer_id].first_token == 2
    assert torch.equal(dst[:, :, list(desc_a.block_ids)], src_a[:, :, SRC_IDS])
    assert torch.equal(dst[:, :, list(desc_b.block_ids)], src_b[:, :, SRC_IDS])


def test_stats_prove_layer_sends_overlap_compute(receiver, sender):
    src, dst = make_cache(), make_cache(fill="sentinel")
    desc = make_desc(receiver.address)
    receiver.expect(desc, dst)
    handle = sender.begin(desc, SRC_IDS, src)
    for layer in range(LAYERS):
        time.sleep(0.1)  # stands in for computing this layer
        handle.send_layer(layer)
    time.sleep(0.1)  # sampling the first token
    handle.finish(5)
    stats = handle.wait(WAIT_S)
    for layer in range(LAYERS):
        assert stats.layer_called_at[layer] <= stats.layer_enqueued_at[layer]
        assert stats.layer_enqueued_at[layer] <= stats.layer_sent_at[layer]
    for layer in range(LAYERS - 1):
        # Each layer was on the wire before the next one finished computing.
        assert stats.layer_sent_at[layer] < stats.layer_called_at[layer + 1]
    assert stats.layer_sent_at[-1] < stats.finish_called_at <= stats.done_sent_at
    assert 0 <= stats.exposed_s == stats.done_sent_at - stats.finish_called_at
    assert wait_result(receiver, desc.transfer_id).ok


# --- refusals, drops and failures -------------------------------------------------------------


def test_fingerprint_mismatch_and_block_count_refused_at_begin(sender):
    src = make_cache()
    with pytest.raises(TransferError, match="fingerprint mismatch"):
        sender.begin(make_desc(model_fingerprint="ffffffffffffffff"), SRC_IDS, src)
    with pytest.raises(TransferError, match="4 local blocks for 5"):
        sender.begin(make_desc(), SRC_IDS[:4], src)
    with pytest.raises(TransferError, match="outside"):
        sender.begin(make_desc(), [0, 1, 2, 3, BLOCKS], src)


def test_begin_refuses_block_size_mismatch(sender):
    src = make_cache(block_size=BLOCK_SIZE * 2)
    with pytest.raises(TransferError, match="block size mismatch: local cache has 8 .* says 4"):
        sender.begin(make_desc(), SRC_IDS, src)


def test_expect_refuses_block_size_mismatch(receiver):
    dst = make_cache(fill="sentinel", block_size=BLOCK_SIZE * 2)
    for expecting in (receiver, receiver.core):
        with pytest.raises(TransferError, match="block size mismatch: receiver cache has 8"):
            expecting.expect(make_desc(receiver.address), dst)
    assert receiver.core.num_pending == 0


def test_wrong_token_dropped_then_real_transfer_completes(receiver, sender, push):
    src, dst = make_cache(), make_cache(fill="sentinel")
    desc = make_desc(receiver.address)
    receiver.expect(desc, dst)
    push.send_multipart(layer_message(desc, src * 0 + 99.0, token="f" * 32))
    wait_dropped(receiver, "bad_token", 1)
    assert (dst == SENTINEL).all()
    run_transfer(sender, desc, src)
    assert wait_result(receiver, desc.transfer_id).ok
    assert_landed(dst, src)


def test_unknown_transfer_dropped(receiver, push):
    src, dst = make_cache(), make_cache(fill="sentinel")
    receiver.expect(make_desc(receiver.address), dst)
    push.send_multipart(layer_message(make_desc(receiver.address), src))
    wait_dropped(receiver, "unknown_transfer", 1)
    assert (dst == SENTINEL).all()
    assert receiver.poll_completed() == []


def test_truncated_payload_fails_transfer_and_receiver_survives(receiver, sender, push):
    src, dst = make_cache(), make_cache(fill="sentinel")
    desc = make_desc(receiver.address)
    receiver.expect(desc, dst)
    header, data = layer_message(desc, src)
    push.send_multipart([header, data[:-4]])
    result = wait_result(receiver, desc.transfer_id)
    assert not result.ok and result.error.startswith("bad_payload")
    assert (dst == SENTINEL).all()
    assert receiver.dropped == {"bad_payload": 1}
    other = make_desc(receiver.address, block_ids=[4, 5, 6, 7, 8])
    receiver.expect(other, dst)
    run_transfer(sender, other, src)
    assert wait_result(receiver, other.transfer_id).ok


def test_out_of_order_layer_fails_transfer(receiver, push):
    src, dst = make_cache(), make_cache(fill="sentinel")
    desc = make_desc(receiver.address)
    receiver.expect(desc, dst)
    push.send_multipart(layer_message(desc, src, layer=1))
    result = wait_result(receiver, desc.transfer_id)
    assert not result.ok and result.error.startswith("out_of_order")
    assert (dst == SENTINEL).all()
    push.send_multipart(layer_message(desc, src, layer=0))
    wait_dropped(receiver, "closed_transfer", 1)
    assert (dst == SENTINEL).all()


def test_garbage_dropped_and_counted(receiver, push):
    dst = make_cache(fill="sentinel")
    desc = make_desc(receiver.address)
    receiver.expect(desc, dst)
    push.send_multipart([b"\xc1garbage", b"payload"])
    push.send(msgpack.packb([1, 2, 3]))
    push.send(b"")
    push.send(msgpack.packb({"tid": desc.transfer_id, "tok": desc.token, "pad": "x" * 5000}))
    push.send(msgpack.packb({"v": 1, "kind": "layer"}))  # no identity
    wait_dropped(receiver, "bad_header", 5)
    assert receiver.poll_completed() == []
    assert receiver.core.num_pending == 1


def test_deadline_expiry_returns_id_and_drops_later_frames(receiver, push):
    src, dst = make_cache(), make_cache(fill="sentinel")
    desc = make_desc(receiver.address, deadline_s=5.0)
    receiver.expect(desc, dst)
    now = time.monotonic()  # expire() takes the clock as an argument: no waiting involved
    assert receiver.expire(now=now) == []
    assert receiver.expire(now=now + 6.0) == [desc.transfer_id]
    assert receiver.expire(now=now + 6.0) == []
    push.send_multipart(layer_message(desc, src))
    wait_dropped(receiver, "closed_transfer", 1)
    assert (dst == SENTINEL).all()
    with pytest.raises(TransferError, match="already known"):
        receiver.expect(desc, dst)


def test_cancel_mid_transfer_drops_later_frames(receiver, sender):
    src, dst = make_cache(), make_cache(fill="sentinel")
    desc = make_desc(receiver.address)
    receiver.expect(desc, dst)
    handle = sender.begin(desc, SRC_IDS, src)
    handle.send_layer(0)
    assert receiver.cancel(desc.transfer_id)
    assert not receiver.cancel(desc.transfer_id)
    for layer in range(1, LAYERS):
        handle.send_layer(layer)
    handle.finish(1)
    handle.wait(WAIT_S)
    wait_dropped(receiver, "closed_transfer", LAYERS)  # layers 1.. and done, maybe layer 0
    assert (dst[1:] == SENTINEL).all()
    assert receiver.poll_completed() == []


def test_unreachable_destination_fails_within_send_timeout():
    with KVSender(FP, send_timeout_s=0.3) as tx:
        # Nothing listens on port 1, so the connection is refused and never becomes ready.
        handle = tx.begin(make_desc("tcp://127.0.0.1:1"), SRC_IDS, make_cache())
        handle.send_layer(0)
        with pytest.raises(TransferError, match="did not accept"):
            handle.wait(WAIT_S)
        with pytest.raises(TransferError, match="failed"):
            handle.send_layer(1)


def test_send_layer_order_and_finish_checked(sender):
    handle = sender.begin(make_desc(), SRC_IDS, make_cache())
    with pytest.raises(TransferError, match="out of order"):
        handle.send_layer(1)
    with pytest.raises(TransferError, match="finish after 0/3"):
        handle.finish(1)


def test_expect_refuses_bad_cache_and_capacity():
    core = ReceiverCore(max_transfers=1)
    with pytest.raises(TransferError, match="cache shape"):
        core.expect(make_desc(), make_cache(layers=2))
    with pytest.raises(TransferError, match="block id 16"):
        core.expect(make_desc(block_ids=[16]), make_cache())
    with pytest.raises(TransferError, match="twice"):
        core.expect(make_desc(block_ids=[1, 1]), make_cache())
    core.expect(make_desc(), make_cache())
    with pytest.raises(TransferError, match="full"):
        core.expect(make_desc(), make_cache())


# --- the receiving core, fed directly ---------------------------------------------------------


@pytest.fixture
def core_setup():
    core = ReceiverCore()
    src, dst = make_cache(), make_cache(fill="sentinel")
    desc = make_desc()
    core.expect(desc, dst)
    return core, desc, src, dst


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (dict(dtype="float16", nbytes=5 * 2 * BLOCK_SIZE * HEADS * HEAD_DIM * 2), "bad_payload"),
        (dict(shape=(2, 5, BLOCK_SIZE, HEADS * 2, HEAD_DIM // 2)), "bad_geometry"),
        (dict(nblocks=4, shape=(2, 4, BLOCK_SIZE, HEADS, HEAD_DIM)), "bad_payload"),
        (dict(first_block=1), "bad_block_range"),
        (dict(nchunks=2), "bad_block_range"),
        (dict(chunk=1, nchunks=2), "out_of_order"),
        (dict(layer=LAYERS), "out_of_order"),
    ],
)
def test_core_fails_transfer_on_protocol_violation(core_setup, overrides, reason):
    core, desc, src, dst = core_setup
    core.handle_message(layer_message(desc, src, **overrides))
    [result] = core.poll_completed()
    assert not result.ok and result.error.startswith(reason)
    assert core.dropped == {reason: 1}
    assert (dst == SENTINEL).all()


def test_core_wrong_dtype_fails(core_setup):
    core, desc, src, _ = core_setup
    data = src[0][:, SRC_IDS].half().contiguous()
    header = layer_message(desc, src, dtype="float16", nbytes=data.numel() * 2)[0]
    core.handle_message([header, bytearray(data.numpy().tobytes())])
    [result] = core.poll_completed()
    assert result.error.startswith("bad_dtype")


def test_core_done_checks_layers_and_fingerprint(core_setup):
    core, desc, src, dst = core_setup
    core.handle_message(done_message(desc))
    [result] = core.poll_completed()
    assert result.error.startswith("early_done")
    again = make_desc()
    core.expect(again, dst)
    for layer in range(LAYERS):
        core.handle_message(layer_message(again, src, layer=layer))
    core.handle_message(done_message(again, fingerprint="0000000000000000"))
    [result] = core.poll_completed()
    assert result.error.startswith("bad_fingerprint")


def test_core_extra_payload_on_done_fails(core_setup):
    core, desc, src, _ = core_setup
    for layer in range(LAYERS):
        core.handle_message(layer_message(desc, src, layer=layer))
    core.handle_message(done_message(desc) + [b"extra"])
    [result] = core.poll_completed()
    assert result.error.startswith("bad_payload")


def _header_values() -> st.SearchStrategy:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(allow_nan=True),
        st.text(max_size=20),
        st.binary(max_size=20),
        st.sampled_from(["layer", "done", "float32", "int8", "bfloat16"]),
    )
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=6), max_leaves=12)


_FUZZ_DESC = TransferDescriptor(
    transfer_id="TID", token="TOK", address="tcp://127.0.0.1:1", block_ids=(1, 2),
    block_size=BLOCK_SIZE, num_layers=LAYERS, wire_dtype="float32", model_fingerprint=FP,
    deadline_s=5,
)  # fmt: skip
_FUZZ_BYTES = 2 * 2 * BLOCK_SIZE * HEADS * HEAD_DIM * 4  # two float32 blocks
_FUZZ_VALID = {
    "v": 1, "tid": "TID", "tok": "TOK", "kind": "layer", "layer": 0, "chunk": 0, "nchunks": 1,
    "first_block": 0, "nblocks": 2, "dtype": "float32", "nbytes": _FUZZ_BYTES,
    "shape": [2, 2, BLOCK_SIZE, HEADS, HEAD_DIM],
}  # fmt: skip
_KEYS = sorted([*_FUZZ_VALID, "scales_nbytes", "first_token", "fingerprint", "extra"])
_KEYS.remove("tid")  # keep the identity so most messages reach the checks behind auth


@st.composite
def multipart_messages(draw) -> list[bytes | bytearray]:
    """Mostly a valid layer header with a few keys changed or removed; else random bytes/msgpack."""
    mode = draw(st.sampled_from(["bytes", "msgpack", "near", "near", "near", "near"]))
    if mode == "bytes":
        header = draw(st.binary(max_size=64))
    elif mode == "msgpack":
        header = msgpack.packb(draw(_header_values()))
    else:
        changed = draw(st.dictionaries(st.sampled_from(_KEYS), _header_values(), max_size=3))
        removed = draw(st.sets(st.sampled_from(_KEYS), max_size=1))
        near = {k: v for k, v in {**_FUZZ_VALID, **changed}.items() if k not in removed}
        header = msgpack.packb(near)
    payload = st.one_of(
        st.sampled_from([_FUZZ_BYTES, _FUZZ_BYTES - 1, 128, 256]).map(bytearray),
        st.binary(max_size=64).map(bytearray),
    )
    return [header, *draw(st.lists(payload, max_size=3))]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(multipart_messages())
def test_parser_raises_only_frame_error(parts):
    try:
        header = parse_header(parts[0])
        check_payloads(header, [memoryview(p) for p in parts[1:]])
    except FrameError as err:
        assert err.reason


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(multipart_messages())
def test_core_never_raises_and_counts_every_rejection(parts):
    core = ReceiverCore()
    dst = make_cache(fill="sentinel")
    core.expect(_FUZZ_DESC, dst)
    core.handle_message(parts)
    results = core.poll_completed()
    if sum(core.dropped.values()) == 0:  # accepted: exactly the valid chunk, written
        assert core.num_pending == 1 and results == []
        assert (dst[0][:, [1, 2]] != SENTINEL).all()
    else:
        assert sum(core.dropped.values()) == 1
        assert all(not r.ok for r in results)
        assert (dst == SENTINEL).all()


# --- descriptor and fingerprint ---------------------------------------------------------------


def test_descriptor_round_trips_through_msgpack_and_json():
    desc = make_desc(wire_dtype="int8")
    packed = msgpack.packb(msgspec.to_builtins(desc))
    assert msgspec.msgpack.decode(packed, type=TransferDescriptor) == desc
    assert (
        msgspec.json.decode(json.dumps(msgspec.to_builtins(desc)), type=TransferDescriptor) == desc
    )
    assert len(desc.token) == 32 and desc.token != make_desc().token


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("token"), "missing required field `token`"),
        (lambda d: d.update(extra=1), "unknown field `extra`"),
        (lambda d: d.update(wire_dtype="fp8"), "wire_dtype"),
        (lambda d: d.update(wire_dtype=["int8"]), "wire_dtype"),
        (lambda d: d.update(block_ids=[1, -1]), "block_ids\\[1\\]"),
        (lambda d: d.update(block_ids=[]), "block_ids"),
        (lambda d: d.update(block_ids="12"), "block_ids"),
        (lambda d: d.update(num_layers=True), "num_layers"),
        (lambda d: d.pop("block_size"), "missing required field `block_size`"),
        (lambda d: d.update(block_size=0), "block_size"),
        (lambda d: d.update(block_size=4.0), "block_size"),
        (lambda d: d.update(deadline_s=0), "deadline_s"),
        (lambda d: d.update(deadline_s=float("inf")), "deadline_s"),
        (lambda d: d.update(address="http://x"), "address"),
        (lambda d: d.update(transfer_id=""), "transfer_id"),
        (lambda d: d.update(model_fingerprint=7), "model_fingerprint"),
    ],
)
def test_descriptor_validation_errors_are_readable(change, message):
    data = msgspec.to_builtins(make_desc())
    change(data)
    with pytest.raises(ValueError, match=message):
        msgspec.convert(data, TransferDescriptor)


def test_descriptor_from_non_map_rejected():
    with pytest.raises(ValueError, match="Expected `object`, got `array`"):
        msgspec.convert([1, 2], TransferDescriptor)


def test_model_fingerprint_tracks_architecture_and_shapes():
    config = {"model_type": "llama", "hidden_size": 64, "num_key_value_heads": 2, "foo": 1}
    shapes = {"a.weight": (64, 64), "b.weight": (128, 64)}
    fp = model_fingerprint(config, shapes)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert model_fingerprint({**config, "foo": 2}, dict(reversed(shapes.items()))) == fp
    assert model_fingerprint({**config, "num_key_value_heads": 4}, shapes) != fp
    assert model_fingerprint(config, {**shapes, "b.weight": (64, 64)}) != fp
    assert model_fingerprint(config, shapes, revision="ft-1") != fp


def test_close_is_idempotent_and_refuses_new_work():
    tx = KVSender(FP)
    rx = KVReceiver()
    for _ in range(2):
        tx.close()
        rx.close()
    with pytest.raises(TransferError, match="closed"):
        tx.begin(make_desc(), SRC_IDS, make_cache())
