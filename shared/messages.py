"""Every internal NATS message of disagg, its msgpack codec, and every subject name.

A message is a frozen dataclass whose field annotations are its schema: ``Annotated`` types carry
the bounds (``Range``, ``Length``, ``OneOf``, ``SUBJECT_ID``). One generic validator reads those
annotations, so an instance is valid from the moment it is built, on the sending side as on the
receiving one.

Wire form: a msgpack map of the fields plus ``"v": 1``. ``decode`` bounds the payload size,
checks the version, requires every field without a default, and ignores unknown keys (a newer
peer may add fields; a field with a default may be absent, so an older peer may omit it).
Nested values travel as maps: ``SamplingParams`` (``sampling_to_dict``), ``TransferDescriptor``
(its ``to_dict``) and nested messages (``ErrorBody``). Anything a peer sends that does not fit
raises ``MessageError`` and nothing else.

The public API (``disagg.v1.*``) is JSON and lives in the gateway; only its subject names are here.
"""

from __future__ import annotations

import functools
import math
import re
import secrets
import types
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin, get_type_hints

import msgpack

from disagg.shared.sampling import SamplingParams
from disagg.shared.transfer import WIRE_DTYPES, TransferDescriptor

VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20  # NATS's default max_payload
MAX_TOKENS = 1 << 20  # prompt + output tokens of one request
MAX_TOKEN_ID = (1 << 31) - 1
MAX_COUNT = (1 << 63) - 1
MAX_HASHES = 1 << 16  # prefix block hashes in one message
MAX_EXCLUDED = 1024
MAX_STOP_TOKENS = 256
MAX_ID_LEN = 64

ROLES = ("prefill", "decode", "both")
FINISH_REASONS = ("stop", "length", "abort", "error")

_ID_RE = re.compile(r"[A-Za-z0-9_-]+")


class MessageError(ValueError):
    """A message (or a subject id) that fails validation; the text names the field."""


# --- constraints: metadata of Annotated field types ---


@dataclass(frozen=True)
class Range:
    """A number in [lo, hi]."""

    lo: float
    hi: float

    def __call__(self, path: str, value: float) -> None:
        if not self.lo <= value <= self.hi:
            raise MessageError(f"{path} must be in [{self.lo}, {self.hi}], got {value!r:.60}")


@dataclass(frozen=True)
class Length:
    """A string or list with lo..hi items."""

    lo: int
    hi: int

    def __call__(self, path: str, value: str | list[Any]) -> None:
        if not self.lo <= len(value) <= self.hi:
            raise MessageError(f"{path} length must be in [{self.lo}, {self.hi}], got {len(value)}")


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values."""

    choices: tuple[Any, ...]

    def __call__(self, path: str, value: Any) -> None:
        if value not in self.choices:
            raise MessageError(f"{path} must be one of {list(self.choices)}, got {value!r:.60}")


@dataclass(frozen=True)
class SubjectId:
    """A string usable as one NATS subject token: it can never add tokens or wildcards."""

    def __call__(self, path: str, value: str) -> None:
        if len(value) > MAX_ID_LEN or not _ID_RE.fullmatch(value):
            raise MessageError(
                f"{path} must be 1..{MAX_ID_LEN} chars of [A-Za-z0-9_-], got {value!r:.80}"
            )


SUBJECT_ID = SubjectId()

Id = Annotated[str, SUBJECT_ID]
TokenId = Annotated[int, Range(0, MAX_TOKEN_ID)]
Count = Annotated[int, Range(0, MAX_COUNT)]
BlockHash = Annotated[int, Range(0, (1 << 64) - 1)]  # kv.hash_block_tokens: 8-byte unsigned
Text = Annotated[str, Length(0, 1024)]
Prompt = Annotated[list[TokenId], Length(1, MAX_TOKENS)]
Hashes = Annotated[list[BlockHash], Length(0, MAX_HASHES)]


def check_id(name: str, value: Any) -> str:
    """Return ``value`` if it is a valid id (worker, request, gateway); else raise MessageError."""
    return _check_value(name, Id, value)


# --- the generic validator ---


def _split_annotated(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    if get_origin(hint) is Annotated:
        base, *checks = get_args(hint)
        return base, tuple(checks)
    return hint, ()


def _optional_arg(hint: Any) -> Any | None:
    """``X`` for ``X | None``, else None."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(get_args(hint)) == 2:
            return args[0]
    return None


def _check_value(path: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against ``hint``; return it normalized (tuples to lists, ints to floats)."""
    base, checks = _split_annotated(hint)
    inner = _optional_arg(base)
    if inner is not None:
        return None if value is None else _check_value(path, inner, value)
    value = _check_type(path, base, value)
    for check in checks:
        check(path, value)
    return value


def _check_type(path: str, base: Any, value: Any) -> Any:
    if get_origin(base) is list:
        return _check_list(path, get_args(base)[0], value)
    if base is float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise MessageError(f"{path} must be a finite number, got {value!r:.60}")
        return float(value)
    if base in (bool, int, str):
        if type(value) is not base:  # exact: a bool is not an int, a float is not an int
            raise MessageError(f"{path} must be {base.__name__}, got {type(value).__name__}")
        return value
    if not isinstance(value, base):
        raise MessageError(f"{path} must be {base.__name__}, got {type(value).__name__}")
    if base is SamplingParams:  # not ours: its own checks are looser than the wire's
        _check_fields(path, _SAMPLING_SCHEMA, vars(value))
    return value


def _check_list(path: str, item_hint: Any, value: Any) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise MessageError(f"{path} must be a list, got {type(value).__name__}")
    ranges = _int_ranges(item_hint)
    if ranges is not None and _ints_within(value, ranges):
        return list(value)  # fast path for token lists; the slow path names the bad item
    return [_check_value(f"{path}[{i}]", item_hint, item) for i, item in enumerate(value)]


@functools.cache
def _int_ranges(hint: Any) -> tuple[Range, ...] | None:
    base, checks = _split_annotated(hint)
    if base is int and all(isinstance(c, Range) for c in checks):
        return checks
    return None


def _ints_within(values: list[Any] | tuple[Any, ...], ranges: tuple[Range, ...]) -> bool:
    if not all(type(v) is int for v in values):
        return False
    if not values:
        return True
    lo, hi = min(values), max(values)
    return all(r.lo <= lo and hi <= r.hi for r in ranges)


def _check_fields(owner: str, schema: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    for name, hint in schema.items():
        _check_value(f"{owner}.{name}", hint, values[name])


# --- messages ---


class Message:
    """Base of every message: validates (and normalizes) its fields on construction."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name, hint in _schema(type(self)).items():
            value = _check_value(f"{owner}.{name}", hint, getattr(self, name))
            object.__setattr__(self, name, value)


M = TypeVar("M", bound=Message)


@functools.cache
def _schema(cls: type[Message]) -> dict[str, Any]:
    hints = get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in fields(cls)}


@dataclass(frozen=True)
class Heartbeat(Message):
    """A worker's state, published every second on ``Subjects.heartbeat``.

    ``zmq_address`` is where the worker's KV receiver listens ("" when it has none, role both).
    ``prefix_hashes`` is a bounded summary of cached block hashes and may be empty.
    ``prefill_tokens`` (prompt tokens computed), ``sampled_tokens`` and ``busy_s`` (seconds
    spent in compute steps) are cumulative since the worker started: rates come from deltas.
    """

    worker_id: Id
    role: Annotated[str, OneOf(ROLES)]
    zmq_address: Annotated[str, Length(0, 256)]
    model: Annotated[str, Length(1, 1024)]
    fingerprint: Annotated[str, Length(1, 256)]
    block_size: Annotated[int, Range(1, 1 << 16)]
    total_blocks: Count
    free_blocks: Count
    running: Count
    waiting: Count
    queued_prefill_tokens: Count
    max_model_len: Annotated[int, Range(1, MAX_TOKENS)]
    prefix_hashes: Hashes
    sent_at: Annotated[float, Range(0.0, math.inf)]  # unix time
    draining: bool
    prefill_tokens: Count = 0
    sampled_tokens: Count = 0
    busy_s: Annotated[float, Range(0.0, math.inf)] = 0.0


@dataclass(frozen=True)
class TransferReport(Message):
    """A prefill worker's account of one KV transfer, published on ``Subjects.transfer_stats``.

    Times are the sender's: ``seconds`` from the transfer's start to its done frame leaving,
    ``exposed_seconds`` the part of that after the prompt's compute ended (not hidden by it).
    """

    request_id: Id
    worker_id: Id
    payload_bytes: Count
    seconds: Annotated[float, Range(0.0, math.inf)]
    exposed_seconds: Annotated[float, Range(0.0, math.inf)]
    ok: bool


@dataclass(frozen=True)
class SchedulerStats(Message):
    """A scheduler's rate matching, published every second on ``Subjects.scheduler_stats``.

    ``held`` placements wait for decode KV room now. ``holds`` (placements ever held),
    ``hold_timeouts`` (refused after ``max_hold_s``), ``hold_overflows`` (refused with the hold
    queue full) and ``hold_seconds`` (time spent held, summed) are cumulative since this
    scheduler started: several run in the queue group, so readers keep them per
    ``scheduler_id``. ``decode_kv_usage`` counts placements not yet in the heartbeats (1.0 with
    no decode worker). ``prefill_decode_ratio`` is the recommended number of prefill workers
    per decode worker, None until both phases were measured.
    """

    scheduler_id: Id
    held: Count
    holds: Count
    hold_timeouts: Count
    hold_overflows: Count
    hold_seconds: Annotated[float, Range(0.0, math.inf)]
    max_hold_s: Annotated[float, Range(0.0, math.inf)]
    decode_kv_usage: Annotated[float, Range(0.0, 1.0)]
    prefill_bound: bool
    prefill_decode_ratio: Annotated[float, Range(0.0, math.inf)] | None = None


@dataclass(frozen=True)
class PlaceRequest(Message):
    """Gateway -> scheduler: where should this request run? ``exclude``: workers to avoid.
    ``prefix_hashes`` are the prompt's chained block hashes at ``hash_block_size`` tokens per
    block; only workers with that block size can match them."""

    request_id: Id
    prompt_len: Annotated[int, Range(1, MAX_TOKENS)]
    prefix_hashes: Hashes
    exclude: Annotated[list[Id], Length(0, MAX_EXCLUDED)]
    hash_block_size: Annotated[int, Range(1, 1 << 16)] = 16


@dataclass(frozen=True)
class PlaceReply(Message):
    """Scheduler -> gateway. ``prefill_id`` None: the decode worker prefills locally."""

    request_id: Id
    decode_id: Id
    prefill_id: Id | None


@dataclass(frozen=True)
class AdmitRequest(Message):
    """Gateway -> decode worker: reserve blocks for a request (``prefill_id`` None: prefill
    locally). ``num_generated`` counts tokens already generated before a migration; they are
    the tail of ``prompt``."""

    request_id: Id
    gateway_id: Id
    prompt: Prompt
    sampling: SamplingParams
    prefill_id: Id | None
    wire_dtype: Annotated[str, OneOf(tuple(WIRE_DTYPES))]
    num_generated: Count = 0


@dataclass(frozen=True)
class AdmitReply(Message):
    """Decode worker -> gateway: where prefill pushes the KV (None when prefilling locally)."""

    request_id: Id
    transfer: TransferDescriptor | None


@dataclass(frozen=True)
class PrefillJob(Message):
    """Gateway -> prefill worker: compute ``prompt`` and push its KV per ``transfer``."""

    request_id: Id
    gateway_id: Id
    prompt: Prompt
    sampling: SamplingParams
    transfer: TransferDescriptor
    decode_id: Id


@dataclass(frozen=True)
class JobReply(Message):
    """Prefill worker -> gateway: the job was queued (False: refused, place it elsewhere)."""

    request_id: Id
    accepted: bool


@dataclass(frozen=True)
class AbortRequest(Message):
    """Gateway -> worker: stop a request and free what it holds."""

    request_id: Id
    reason: Text


@dataclass(frozen=True)
class AbortReply(Message):
    """Worker -> gateway: whether the worker knew the request."""

    request_id: Id
    found: bool


@dataclass(frozen=True)
class ErrorBody(Message):
    """The OpenAI error body; ``code`` is an HTTP status (400, 404, 429, 503, 504, ...)."""

    message: Annotated[str, Length(0, 8192)]
    type: Annotated[str, Length(0, 128)]
    code: Annotated[int, Range(100, 599)]
    param: Annotated[str, Length(0, 256)] | None = None


@dataclass(frozen=True)
class ErrorReply(Message):
    """Any request/reply may answer with this instead of its normal reply (see decode_reply)."""

    error: ErrorBody


@dataclass(frozen=True)
class StreamChunk(Message):
    """Worker -> gateway on ``Subjects.stream``: output tokens from position ``index`` on.

    Chunks from prefill and decode may arrive out of order; the gateway reorders by ``index``.
    A chunk with ``finish_reason`` set is the request's last from that worker.
    """

    request_id: Id
    worker_id: Id
    index: Count
    token_ids: Annotated[list[TokenId], Length(0, MAX_TOKENS)]
    finish_reason: Annotated[str, OneOf(FINISH_REASONS)] | None
    num_prompt_tokens: Count
    num_cached_tokens: Count
    error: ErrorBody | None = None


# --- nested values ---

_SAMPLING_SCHEMA: dict[str, Any] = {
    "max_tokens": Annotated[int, Range(1, MAX_TOKENS)],
    "temperature": Annotated[float, Range(0.0, math.inf)],
    "top_p": Annotated[float, Range(0.0, 1.0)],
    "top_k": Annotated[int, Range(-1, MAX_TOKEN_ID)],
    "seed": Annotated[int, Range(-(1 << 63), (1 << 64) - 1)] | None,  # torch.manual_seed's range
    "stop_token_ids": Annotated[list[TokenId], Length(0, MAX_STOP_TOKENS)],
    "ignore_eos": bool,
}


def sampling_to_dict(p: SamplingParams) -> dict[str, Any]:
    """Wire form of ``p`` (``stop_token_ids`` as a list)."""
    return {name: getattr(p, name) for name in _SAMPLING_SCHEMA} | {
        "stop_token_ids": list(p.stop_token_ids)
    }


def sampling_from_dict(d: Any) -> SamplingParams:
    """Parse ``sampling_to_dict`` output; absent keys take SamplingParams' defaults."""
    if not isinstance(d, dict):
        raise MessageError(f"SamplingParams must be a map, got {type(d).__name__}")
    kwargs = {
        name: _check_value(f"SamplingParams.{name}", hint, d[name])
        for name, hint in _SAMPLING_SCHEMA.items()
        if name in d
    }
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise MessageError(f"SamplingParams: {exc}") from None


def _descriptor_from_dict(d: Any) -> TransferDescriptor:
    try:
        return TransferDescriptor.from_dict(d)
    except ValueError as exc:
        raise MessageError(f"TransferDescriptor: {exc}") from None


def _to_wire(value: Any) -> Any:
    if isinstance(value, Message):
        return {name: _to_wire(getattr(value, name)) for name in _schema(type(value))}
    if isinstance(value, SamplingParams):
        return sampling_to_dict(value)
    if isinstance(value, TransferDescriptor):
        return value.to_dict()
    return value


def _from_wire(path: str, hint: Any, value: Any) -> Any:
    """Turn nested maps into their objects; everything else is checked by the constructor."""
    base, _ = _split_annotated(hint)
    inner = _optional_arg(base)
    if inner is not None:
        return None if value is None else _from_wire(path, inner, value)
    if not isinstance(value, dict):
        return value
    try:
        if isinstance(base, type) and issubclass(base, Message):
            return _from_map(base, value)
        if base is SamplingParams:
            return sampling_from_dict(value)
        if base is TransferDescriptor:
            return _descriptor_from_dict(value)
    except MessageError as exc:
        raise MessageError(f"{path}: {exc}") from None
    return value


def _from_map(cls: type[M], body: dict[Any, Any]) -> M:
    kwargs = {}
    for f in fields(cls):
        if f.name in body:
            kwargs[f.name] = _from_wire(
                f"{cls.__name__}.{f.name}", _schema(cls)[f.name], body[f.name]
            )
        elif f.default is MISSING and f.default_factory is MISSING:
            raise MessageError(f"{cls.__name__}.{f.name} is missing")
    return cls(**kwargs)


# --- codec ---


def encode(msg: Message, *, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """msgpack bytes of ``msg`` with ``"v": 1``; MessageError if longer than ``max_bytes``."""
    data = msgpack.packb({"v": VERSION, **_to_wire(msg)}, use_bin_type=True)
    if len(data) > max_bytes:
        raise MessageError(f"{type(msg).__name__} is {len(data)} bytes, over {max_bytes}")
    return data


def decode(cls: type[M], data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Parse and validate a ``cls`` message; MessageError on anything else."""
    return _from_map(cls, _load(data, max_bytes))


def decode_reply(
    cls: type[M], data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES
) -> M | ErrorReply:
    """Like ``decode``, but a map with an "error" key (``cls`` having no such field) is an
    ``ErrorReply``."""
    body = _load(data, max_bytes)
    if "error" in body and "error" not in _schema(cls):
        return _from_map(ErrorReply, body)
    return _from_map(cls, body)


def _load(data: Any, max_bytes: int) -> dict[Any, Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"message must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MessageError(f"message is {len(data)} bytes, over {max_bytes}")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack documents that malformed input may raise anything
        raise MessageError(f"message is not valid msgpack: {exc!r:.200}") from None
    if not isinstance(body, dict):
        raise MessageError(f"message must be a map, got {type(body).__name__}")
    version = body.get("v")
    if type(version) is not int or version != VERSION:
        raise MessageError(f"message version must be {VERSION}, got {version!r:.20}")
    return body


# --- subjects and ids ---


@dataclass(frozen=True)
class Subjects:
    """Every NATS subject name. ``prefix`` is one or more dot-separated id tokens ("disagg",
    "staging.disagg"), so two deployments can share a NATS cluster."""

    prefix: str = "disagg"

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or len(self.prefix) > 128:
            raise MessageError("subject prefix must be a string of at most 128 chars")
        for token in self.prefix.split("."):
            check_id("subject prefix token", token)

    @property
    def completions(self) -> str:
        """Public completions API (JSON)."""
        return f"{self.prefix}.v1.completions"

    @property
    def chat_completions(self) -> str:
        """Public chat completions API (JSON)."""
        return f"{self.prefix}.v1.chat.completions"

    @property
    def api_abort(self) -> str:
        """Public abort (JSON ``{"id": ...}`` or ``{"reply": <inbox>}``) of a NATS API request."""
        return f"{self.prefix}.v1.abort"

    @property
    def place(self) -> str:
        """Scheduler placement (request/reply, queue group ``scheduler_queue``)."""
        return f"{self.prefix}.sched.place"

    @property
    def scheduler_queue(self) -> str:
        """Queue group the schedulers share, so each placement is answered once."""
        return f"{self.prefix}.sched"

    @property
    def scheduler_stats(self) -> str:
        """SchedulerStats from every scheduler (publish), for the gateways' metrics."""
        return f"{self.prefix}.sched.stats"

    @property
    def heartbeat(self) -> str:
        """Worker heartbeats (publish)."""
        return f"{self.prefix}.worker.heartbeat"

    @property
    def transfer_stats(self) -> str:
        """TransferReports from prefill workers (publish), for the gateways' metrics."""
        return f"{self.prefix}.transfer.stats"

    def admit(self, decode_id: str) -> str:
        """A decode worker's admit endpoint."""
        return f"{self.prefix}.decode.{check_id('decode_id', decode_id)}.admit"

    def abort(self, worker_id: str) -> str:
        """A worker's abort endpoint (prefill or decode)."""
        return f"{self.prefix}.worker.{check_id('worker_id', worker_id)}.abort"

    def job(self, prefill_id: str) -> str:
        """A prefill worker's job endpoint."""
        return f"{self.prefix}.prefill.{check_id('prefill_id', prefill_id)}.job"

    def stream(self, gateway_id: str, request_id: str) -> str:
        """Where workers publish a request's StreamChunks."""
        gateway, request = check_id("gateway_id", gateway_id), check_id("request_id", request_id)
        return f"{self.prefix}.stream.{gateway}.{request}"

    def stream_wildcard(self, gateway_id: str) -> str:
        """A gateway's one subscription for the streams of all its requests."""
        return f"{self.prefix}.stream.{check_id('gateway_id', gateway_id)}.*"


def new_request_id() -> str:
    """A fresh random request id (96 bits, url-safe, valid in subjects)."""
    return secrets.token_urlsafe(12)


def new_worker_id(role: str) -> str:
    """A fresh random worker id such as "decode-Xy3_k9Qa"."""
    _check_value("role", Annotated[str, OneOf(ROLES)], role)
    return f"{role}-{secrets.token_urlsafe(6)}"
