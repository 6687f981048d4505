"""NATS message codec: round trips, strict validation of untrusted input, subjects, ids."""

from __future__ import annotations

import contextlib
import math

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec import NODEFAULT
from msgspec.structs import fields, replace

from disagg.shared.protocol.codec import (
    ErrorBody,
    ErrorReply,
    Message,
    decode,
    decode_reply,
    encode,
)
from disagg.shared.protocol.descriptor import TransferDescriptor
from disagg.shared.protocol.messages import (
    AbortReply,
    AbortRequest,
    AdmitReply,
    AdmitRequest,
    Heartbeat,
    JobReply,
    PlaceReply,
    PlaceRequest,
    PrefillJob,
    StreamChunk,
    TransferReport,
)
from disagg.shared.protocol.sampling import SamplingParams
from disagg.shared.protocol.subjects import Subjects
from disagg.shared.protocol.types import (
    MAX_ID_LEN,
    MAX_TOKENS,
    MessageError,
    check_id,
    new_request_id,
    new_worker_id,
)

SAMPLING = SamplingParams(
    max_tokens=32, temperature=0.7, top_p=0.9, top_k=50, seed=7, stop_token_ids=(2, 13)
)
DESCRIPTOR = TransferDescriptor.new(
    address="tcp://10.0.0.2:5555",
    block_ids=[4, 9, 1],
    block_size=16,
    num_layers=2,
    wire_dtype="int8",
    model_fingerprint="0123456789abcdef",
    deadline_s=5.0,
)
HEARTBEAT = Heartbeat(
    worker_id="decode-abc",
    role="decode",
    zmq_address="tcp://10.0.0.2:5555",
    model="tiny-llama",
    fingerprint="0123456789abcdef",
    block_size=16,
    total_blocks=1000,
    free_blocks=250,
    running=3,
    waiting=1,
    queued_prefill_tokens=512,
    max_model_len=4096,
    prefix_hashes=[0, 17, (1 << 64) - 1],
    sent_at=1_700_000_000.25,
    draining=False,
)
ERROR = ErrorBody(message="no decode worker", type="service_unavailable", code=503, param=None)
ADMIT = AdmitRequest(
    request_id="r1",
    gateway_id="gw-1",
    prompt=[1, 2, 3],
    sampling=SAMPLING,
    prefill_id="prefill-x",
    wire_dtype="bfloat16",
    num_generated=0,
)
CHUNK = StreamChunk(
    request_id="r1",
    worker_id="decode-abc",
    index=1,
    token_ids=[5, 6],
    finish_reason=None,
    num_prompt_tokens=3,
    num_cached_tokens=0,
    error=None,
)
EXAMPLES: list[Message] = [
    HEARTBEAT,
    replace(HEARTBEAT, role="both", zmq_address="", prefix_hashes=[], draining=True),
    PlaceRequest(
        request_id="r1",
        prompt_len=3,
        prefix_hashes=[42],
        exclude=["decode-old"],
        hash_block_size=16,
    ),
    PlaceRequest(request_id="r1", prompt_len=3, prefix_hashes=[], exclude=[], hash_block_size=4),
    PlaceReply(request_id="r1", decode_id="decode-abc", prefill_id="prefill-x"),
    PlaceReply(request_id="r1", decode_id="both-abc", prefill_id=None),
    ADMIT,
    replace(ADMIT, prefill_id=None, sampling=SamplingParams(), num_generated=7),
    AdmitReply(request_id="r1", transfer=DESCRIPTOR),
    AdmitReply(request_id="r1", transfer=None),
    PrefillJob(
        request_id="r1",
        gateway_id="gw-1",
        prompt=[1, 2, 3],
        sampling=SAMPLING,
        transfer=DESCRIPTOR,
        decode_id="decode-abc",
    ),
    JobReply(request_id="r1", accepted=True),
    AbortRequest(request_id="r1", reason="client disconnected"),
    AbortReply(request_id="r1", found=False),
    ERROR,
    ErrorReply(error=replace(ERROR, code=400, param="max_tokens")),
    CHUNK,
    replace(CHUNK, token_ids=[], finish_reason="error", error=ERROR),
    replace(CHUNK, token_ids=[9], finish_reason="length"),
]
EXAMPLES.append(
    TransferReport(
        request_id="r1",
        worker_id="prefill-1",
        payload_bytes=1 << 20,
        seconds=0.5,
        exposed_seconds=0.001,
        ok=True,
    )
)
MESSAGE_TYPES = sorted({type(m) for m in EXAMPLES}, key=lambda cls: cls.__name__)


def wire(msg: Message) -> dict:
    return msgpack.unpackb(encode(msg))


def pack(body: object) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def required_fields(cls: type[Message]) -> list[str]:
    return [
        f.name for f in fields(cls) if f.default is NODEFAULT and f.default_factory is NODEFAULT
    ]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    data = encode(msg)
    assert msgpack.unpackb(data)["v"] == 1
    assert decode(type(msg), data) == msg


def test_round_trip_keeps_nested_types() -> None:
    job = decode(PrefillJob, encode(next(m for m in EXAMPLES if isinstance(m, PrefillJob))))
    assert isinstance(job.sampling, SamplingParams) and job.sampling.stop_token_ids == (2, 13)
    assert isinstance(job.transfer, TransferDescriptor) and job.transfer.block_ids == (4, 9, 1)
    erring = next(m for m in EXAMPLES if isinstance(m, StreamChunk) and m.error is not None)
    chunk = decode(StreamChunk, encode(erring))
    assert chunk.error == ERROR


def test_encoding_normalizes_and_validates() -> None:
    assert decode(AdmitRequest, encode(replace(ADMIT, prompt=(1, 2)))).prompt == [1, 2]
    assert decode(Heartbeat, encode(replace(HEARTBEAT, sent_at=5))).sent_at == 5.0
    with pytest.raises(MessageError, match="Heartbeat.role"):
        encode(replace(HEARTBEAT, role="master"))
    # A sender bug surfaces where it happens, not as a rejection on the receiving worker.
    with pytest.raises(MessageError, match="stop_token_ids"):
        encode(replace(ADMIT, sampling=SamplingParams(stop_token_ids=(-1,))))


@pytest.mark.parametrize("version", [0, 2, True, 1.0, "1", None])
def test_wrong_version_rejected(version: object) -> None:
    body = wire(CHUNK) | {"v": version}
    with pytest.raises(MessageError, match="version"):
        decode(StreamChunk, pack(body))


def test_missing_version_rejected() -> None:
    body = wire(CHUNK)
    del body["v"]
    with pytest.raises(MessageError, match="version"):
        decode(StreamChunk, pack(body))


@pytest.mark.parametrize("msg", EXAMPLES[::2], ids=lambda m: type(m).__name__)
def test_every_missing_required_field_rejected(msg: Message) -> None:
    for name in required_fields(type(msg)):
        body = wire(msg)
        del body[name]
        with pytest.raises(MessageError, match=f"{type(msg).__name__}.{name} is missing"):
            decode(type(msg), pack(body))


def test_fields_with_defaults_may_be_absent() -> None:
    body = wire(ADMIT)
    del body["num_generated"]
    assert decode(AdmitRequest, pack(body)).num_generated == 0
    body = wire(CHUNK)
    del body["error"]
    assert decode(StreamChunk, pack(body)).error is None


PLACE = PlaceRequest(request_id="r", prompt_len=1, prefix_hashes=[], exclude=[], hash_block_size=1)
BAD_FIELDS = [
    (HEARTBEAT, "total_blocks", "1000"),  # str for int
    (HEARTBEAT, "running", True),  # bool for int
    (HEARTBEAT, "free_blocks", -1),  # negative count
    (HEARTBEAT, "block_size", 0),
    (HEARTBEAT, "draining", 1),  # int for bool
    (HEARTBEAT, "sent_at", "now"),
    (HEARTBEAT, "sent_at", math.nan),
    (HEARTBEAT, "sent_at", math.inf),
    (HEARTBEAT, "role", "leader"),
    (HEARTBEAT, "worker_id", "decode.abc"),  # would inject a subject token
    (HEARTBEAT, "prefix_hashes", [1, -1]),
    (HEARTBEAT, "prefix_hashes", 17),
    (CHUNK, "index", 1.0),  # float for int
    (CHUNK, "index", -1),
    (CHUNK, "request_id", 5),  # int for str
    (CHUNK, "token_ids", [1, -2]),  # token id < 0
    (CHUNK, "token_ids", [1, True]),
    (CHUNK, "token_ids", [1, 2.0]),
    (CHUNK, "token_ids", [1, 1 << 31]),
    (CHUNK, "finish_reason", "done"),
    (CHUNK, "error", "boom"),
    (CHUNK, "error", {"message": "x", "type": "t", "code": 200.5}),
    (ADMIT, "prompt", []),
    (ADMIT, "prompt", "1 2 3"),
    (ADMIT, "wire_dtype", "float64"),
    (ADMIT, "num_generated", -1),
    (ADMIT, "prefill_id", ""),
    (PLACE, "exclude", ["ok", "bad id"]),
    (PLACE, "exclude", ["x"] * 1025),  # huge list
    (PLACE, "hash_block_size", 0),
    (JobReply(request_id="r", accepted=True), "accepted", "yes"),
    (ERROR, "code", 42),
]


@pytest.mark.parametrize(("msg", "name", "value"), BAD_FIELDS, ids=lambda x: str(x)[:20])
def test_bad_field_rejected_and_named(msg: Message, name: str, value: object) -> None:
    body = wire(msg) | {name: value}
    with pytest.raises(MessageError, match=f"{type(msg).__name__}.{name}"):
        decode(type(msg), pack(body))


BAD_SAMPLING = [
    ("max_tokens", 0),
    ("max_tokens", True),
    ("temperature", -0.5),
    ("temperature", "hot"),
    ("top_p", 0.0),  # SamplingParams' own check: top_p in (0, 1]
    ("top_p", 1.5),
    ("top_k", -2),
    ("seed", 1.5),
    ("seed", False),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", list(range(257))),
    ("ignore_eos", 0),
]


@pytest.mark.parametrize(("name", "value"), BAD_SAMPLING, ids=str)
def test_bad_sampling_rejected(name: str, value: object) -> None:
    body = wire(ADMIT)
    body["sampling"][name] = value
    with pytest.raises(MessageError, match=f"AdmitRequest.sampling.{name}"):
        decode(AdmitRequest, pack(body))


def test_sampling_wire_form_and_defaults() -> None:
    body = wire(ADMIT)
    d = body["sampling"]
    assert d["stop_token_ids"] == [2, 13] and d["seed"] == 7
    assert decode(AdmitRequest, pack(body)).sampling == SAMPLING
    sampled = lambda sampling: decode(AdmitRequest, pack(body | {"sampling": sampling})).sampling
    assert sampled({"temperature": 0.5}) == SamplingParams(temperature=0.5)
    assert sampled(d | {"seed": None, "future": 1}).seed is None
    with pytest.raises(MessageError):
        sampled([1, 2])


@pytest.mark.parametrize(
    "change", [{"address": "http://x"}, {"block_ids": []}, {"token": 5}, {"extra": 1}]
)
def test_bad_descriptor_rejected(change: dict) -> None:
    body = wire(AdmitReply(request_id="r1", transfer=DESCRIPTOR))
    body["transfer"] |= change
    with pytest.raises(MessageError, match="AdmitReply.transfer"):
        decode(AdmitReply, pack(body))


def test_descriptor_with_missing_key_or_not_a_map_rejected() -> None:
    body = wire(AdmitReply(request_id="r1", transfer=DESCRIPTOR))
    del body["transfer"]["token"]
    with pytest.raises(MessageError, match="token"):
        decode(AdmitReply, pack(body))
    with pytest.raises(MessageError, match="AdmitReply.transfer"):
        decode(AdmitReply, pack(body | {"transfer": [1, 2]}))


def test_long_prompt_rejected_by_length_not_only_by_size() -> None:
    body = wire(ADMIT) | {"prompt": [0] * (MAX_TOKENS + 1)}
    with pytest.raises(MessageError, match="AdmitRequest.prompt: Expected `array` of length"):
        decode(AdmitRequest, pack(body), max_bytes=8 << 20)


@pytest.mark.parametrize(
    "payload",
    [
        pack([1, 2]),
        pack(7),
        pack("v"),
        pack(None),
        b"",
        b"\xc1",  # never-used msgpack byte
        encode(CHUNK)[:-1],  # truncated
        encode(CHUNK) + b"\x00",  # trailing data
        pack({1: 2}),  # non-string map key
        b"\x81\xa1v" + b"\x91" * 5000 + b"\x01",  # nested deeper than msgpack allows
        b"\xa3\xff\xfe\xfd",  # invalid utf-8 string
        b"\xd4\xff\x00",  # timestamp ext of a bad length
        "not bytes",
    ],
)
def test_garbage_rejected(payload: bytes) -> None:
    with pytest.raises(MessageError):
        decode(StreamChunk, payload)


def test_oversized_payload_rejected() -> None:
    data = encode(replace(CHUNK, token_ids=list(range(1000))))
    assert decode(StreamChunk, data, max_bytes=len(data)).token_ids == list(range(1000))
    with pytest.raises(MessageError, match="bytes"):
        decode(StreamChunk, data, max_bytes=len(data) - 1)
    with pytest.raises(MessageError, match="bytes"):
        encode(replace(CHUNK, token_ids=list(range(1000))), max_bytes=100)


def test_unknown_keys_ignored() -> None:
    body = wire(replace(CHUNK, error=ERROR)) | {"priority": 3, "trace": {"a": [1]}}
    body["error"]["retry_after"] = 2
    assert decode(StreamChunk, pack(body)) == replace(CHUNK, error=ERROR)


def test_decode_reply_detects_error_reply() -> None:
    reply = ErrorReply(error=ErrorBody(message="full", type="overloaded", code=429))
    assert decode_reply(AdmitReply, encode(reply)) == reply
    ok = AdmitReply(request_id="r1", transfer=None)
    assert decode_reply(AdmitReply, encode(ok)) == ok
    # A message with an "error" field of its own is not an error reply.
    chunk = replace(CHUNK, finish_reason="error", error=ERROR)
    assert decode_reply(StreamChunk, encode(chunk)) == chunk
    with pytest.raises(MessageError, match="ErrorReply.error"):
        decode_reply(AdmitReply, pack({"v": 1, "error": "boom"}))
    with pytest.raises(MessageError, match="version"):
        decode_reply(AdmitReply, pack({"error": wire(reply)["error"]}))


def test_subjects_exact_names() -> None:
    s = Subjects()
    assert s.completions == "disagg.v1.completions"
    assert s.chat_completions == "disagg.v1.chat.completions"
    assert s.api_abort == "disagg.v1.abort"
    assert s.place == "disagg.sched.place"
    assert s.heartbeat == "disagg.worker.heartbeat"
    assert s.transfer_stats == "disagg.transfer.stats"
    assert s.admit("decode-1") == "disagg.decode.decode-1.admit"
    assert s.abort("prefill_2") == "disagg.worker.prefill_2.abort"
    assert s.job("prefill-1") == "disagg.prefill.prefill-1.job"
    assert s.stream("gw-1", "Req_9") == "disagg.stream.gw-1.Req_9"
    assert s.stream_wildcard("gw-1") == "disagg.stream.gw-1.*"
    assert Subjects("staging.disagg").admit("d") == "staging.disagg.decode.d.admit"


BAD_IDS = ["", "a.b", "*", ">", "a b", "a\tb", "a\n", "é", "x" * (MAX_ID_LEN + 1), 5, None]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_subject_injection_rejected(bad: object) -> None:
    s = Subjects()
    for build in (s.admit, s.abort, s.job, s.stream_wildcard):
        with pytest.raises(MessageError):
            build(bad)
    with pytest.raises(MessageError, match="request_id"):
        s.stream("gw", bad)
    with pytest.raises(MessageError, match="gateway_id"):
        s.stream(bad, "r1")


@pytest.mark.parametrize("prefix", ["", "a..b", "disagg.", "a.*", "a b", ">", "x" * 129, 3])
def test_bad_subject_prefix_rejected(prefix: object) -> None:
    with pytest.raises(MessageError):
        Subjects(prefix)


def test_new_ids_are_valid_unique_and_labelled() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(check_id("id", i) == i for i in ids)
    worker = new_worker_id("decode")
    assert worker.startswith("decode-") and check_id("id", worker) == worker
    assert Subjects().abort(worker) == f"disagg.worker.{worker}.abort"
    with pytest.raises(MessageError):
        new_worker_id("master")


# --- fuzzing: whatever a peer sends, only MessageError escapes ---

FIELD_NAMES = sorted(
    {f.encode_name for cls in MESSAGE_TYPES for f in fields(cls)}
    | {f.name for f in fields(SamplingParams)}
    | {f.name for f in fields(TransferDescriptor)}
    | {"v"}
)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4))
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), inner, max_size=6)
    ),
    max_leaves=16,
)


def assert_only_message_error(data: bytes) -> None:
    for cls in MESSAGE_TYPES:
        for parse in (decode, decode_reply):
            with contextlib.suppress(MessageError):
                parse(cls, data)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=64))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    assert_only_message_error(data)


@FUZZ
@given(values, st.booleans())
def test_fuzz_arbitrary_structures(body: object, versioned: bool) -> None:
    if versioned and isinstance(body, dict):
        body["v"] = 1
    assert_only_message_error(pack(body))


@FUZZ
@given(st.sampled_from(EXAMPLES), st.data())
def test_fuzz_one_field_of_a_valid_message(msg: Message, data: st.DataObject) -> None:
    body = wire(msg)
    target = body
    nested = [k for k, v in body.items() if isinstance(v, dict)]
    if nested and data.draw(st.booleans()):
        target = body[data.draw(st.sampled_from(nested))]
    target[data.draw(st.sampled_from(sorted(target)))] = data.draw(values)
    for parse in (decode, decode_reply):
        with contextlib.suppress(MessageError):
            parse(type(msg), pack(body))
