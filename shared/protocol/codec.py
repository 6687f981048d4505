"""The one codec of every NATS message: msgspec structs as msgpack maps carrying ``"v": 1``.

``Message`` is the base struct: frozen, keyword-only, tagged with ``v`` = ``VERSION`` (msgspec
writes the tag; decoding requires it and checks its value). ``decode`` bounds the payload
size, validates every declared bound, requires every field without a default and ignores
unknown keys (a newer peer may add fields; an older one may omit a field that has a default).
``encode`` validates too, by decoding what it wrote: a sender bug surfaces at the sender, not
as a refusal on the peer. Anything a peer sends that does not fit raises ``MessageError`` and
nothing else, with the field named (``StreamChunk.token_ids[1]: Expected int >= 0``).
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta

from disagg.shared.protocol.types import MessageError

VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20  # NATS's default max_payload


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="v", tag=VERSION):
    """Base of every NATS message."""


class _OtherVersion(msgspec.Struct, frozen=True, tag_field="v", tag=0):
    """Decoded beside each message so that msgspec requires the version tag (a lone tagged
    struct would default it)."""


class _ErrorProbe(msgspec.Struct):
    error: Any = msgspec.UNSET


M = TypeVar("M", bound=Message)
_encoder = msgspec.msgpack.Encoder()
_MISSING = re.compile(r"Object missing required field `(\w+)`")


def encode(msg: Message, *, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """msgpack bytes of ``msg``; MessageError if invalid or longer than ``max_bytes``."""
    try:
        data = _encoder.encode(msg)
    except (OverflowError, TypeError) as err:  # an int beyond 64 bits, a value of no wire type
        raise MessageError(f"{type(msg).__name__} cannot be encoded: {err}") from None
    if len(data) > max_bytes:
        raise MessageError(f"{type(msg).__name__} is {len(data)} bytes, over {max_bytes}")
    decode(type(msg), data, max_bytes=max_bytes)
    return data


def decode(cls: type[M], data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Parse and validate a ``cls`` message; MessageError on anything else."""
    _check_size(data, max_bytes)
    try:
        msg = _decoder(cls).decode(data)
    except msgspec.ValidationError as err:
        raise _explain(cls, str(err)) from None
    except (msgspec.DecodeError, TypeError) as err:
        raise MessageError(f"message is not valid msgpack: {err}") from None
    if not isinstance(msg, cls):
        raise MessageError(f"message version must be {VERSION}, got 0")
    return msg


def decode_reply(
    cls: type[M], data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES
) -> M | ErrorReply:
    """Like ``decode``, but a map with an "error" key (``cls`` having no such field) is an
    ``ErrorReply``."""
    if "error" not in cls.__struct_fields__:
        _check_size(data, max_bytes)
        try:
            probe = msgspec.msgpack.decode(data, type=_ErrorProbe)
        except (msgspec.ValidationError, msgspec.DecodeError, TypeError) as err:
            raise MessageError(f"message is not a valid msgpack map: {err}") from None
        if probe.error is not msgspec.UNSET:
            return decode(ErrorReply, data, max_bytes=max_bytes)
    return decode(cls, data, max_bytes=max_bytes)


@functools.cache
def _decoder(cls: type[M]) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(cls | _OtherVersion)


def _check_size(data: object, max_bytes: int) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"message must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MessageError(f"message is {len(data)} bytes, over {max_bytes}")


def _explain(cls: type, text: str) -> MessageError:
    """msgspec's "Expected `int`, got `str` - at `$.a[1]`" as "Cls.a[1]: Expected `int`, ..."."""
    detail, sep, where = text.rpartition(" - at `")
    if not sep:
        detail, where = text, "$`"
    path = cls.__name__ + where[1:-1]
    missing = _MISSING.fullmatch(detail)
    if missing and missing[1] == "v" and path == cls.__name__ or where.startswith("$.v`"):
        return MessageError(f"message version must be {VERSION}: {detail}")
    if missing:
        return MessageError(f"{path}.{missing[1]} is missing")
    return MessageError(f"{path}: {detail}")


class ErrorBody(Message):
    """The OpenAI error body; ``code`` is an HTTP status (400, 404, 429, 503, 504, ...)."""

    message: Annotated[str, Meta(max_length=8192)]
    type: Annotated[str, Meta(max_length=128)]
    code: Annotated[int, Meta(ge=100, le=599)]
    param: Annotated[str, Meta(max_length=256)] | None = None


class ErrorReply(Message):
    """Any request/reply may answer with this instead of its normal reply (see decode_reply)."""

    error: ErrorBody


def error_reply(message: str, status: int, *, kind: str | None = None, param=None) -> bytes:
    """An encoded ErrorReply; ``kind`` defaults by status class."""
    kind = kind or ("invalid_request_error" if status < 500 else "service_unavailable")
    body = ErrorBody(message=message[:8192], type=kind, code=status, param=param)
    return encode(ErrorReply(error=body))
