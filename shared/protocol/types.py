"""The field types every wire message is declared with: bounds as ``msgspec.Meta``, ids, roles.

A bound written here is checked by msgspec on every decode, so a message read off a socket is
valid the moment it exists. Nothing here imports torch.
"""

from __future__ import annotations

import enum
import re
import secrets
import sys
from typing import Annotated, Literal

from msgspec import Meta

MAX_TOKENS = 1 << 20  # prompt + output tokens of one request
MAX_TOKEN_ID = (1 << 31) - 1
MAX_COUNT = (1 << 63) - 1
MAX_HASHES = 1 << 16  # prefix block hashes in one message
MAX_EXCLUDED = 1024
MAX_STOP_TOKENS = 256
MAX_ID_LEN = 64
DEFAULT_BLOCK_SIZE = 16  # tokens per KV block; prompts are hashed at the decode workers' size
FINITE_MAX = sys.float_info.max  # `le=FINITE_MAX` refuses inf and NaN

ID_PATTERN = rf"^[A-Za-z0-9_-]{{1,{MAX_ID_LEN}}}\Z"
_ID_RE = re.compile(ID_PATTERN)


class Role(enum.StrEnum):
    """What a worker does: prefill only, decode only, or both (aggregated)."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    @property
    def prefills(self) -> bool:
        return self is not Role.DECODE

    @property
    def decodes(self) -> bool:
        return self is not Role.PREFILL


# A string usable as one NATS subject token: it can never add tokens or wildcards.
Id = Annotated[str, Meta(pattern=ID_PATTERN)]
TokenId = Annotated[int, Meta(ge=0, le=MAX_TOKEN_ID)]
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
Seconds = Annotated[float, Meta(ge=0.0, le=FINITE_MAX)]
BlockHash = Annotated[int, Meta(ge=0)]  # 8 bytes (block_pool.hash_block_tokens); msgpack bounds it
BlockSize = Annotated[int, Meta(ge=1, le=1 << 16)]
Text = Annotated[str, Meta(max_length=1024)]
Prompt = Annotated[list[TokenId], Meta(min_length=1, max_length=MAX_TOKENS)]
TokenIds = Annotated[list[TokenId], Meta(max_length=MAX_TOKENS)]
Hashes = Annotated[list[BlockHash], Meta(max_length=MAX_HASHES)]
FinishReason = Literal["stop", "length", "abort", "error"]
WireDtype = Literal["float32", "bfloat16", "float16", "int8"]
WIRE_ITEMSIZE: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


class MessageError(ValueError):
    """A message (or a subject id) that fails validation; the text names the field."""


def check_id(name: str, value: object) -> str:
    """Return ``value`` if it is a valid id (worker, request, gateway); else raise MessageError."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        shown = repr(value)[:80]
        raise MessageError(f"{name} must be 1..{MAX_ID_LEN} chars of [A-Za-z0-9_-], got {shown}")
    return value


def new_request_id() -> str:
    """A fresh random request id (96 bits, url-safe, valid in subjects)."""
    return secrets.token_urlsafe(12)


def new_worker_id(role: str) -> str:
    """A fresh random worker id such as "decode-Xy3_k9Qa"."""
    try:
        role = Role(role)
    except ValueError:
        raise MessageError(f"role must be one of {[r.value for r in Role]}, got {role!r}") from None
    return f"{role}-{secrets.token_urlsafe(6)}"
