"""Wire format of the KV transfer over ZeroMQ: header frames, their strict parsing, errors.

Every message is one ZeroMQ multipart message (delivered whole or not at all):

    layer chunk: [header, data]          data: wire-dtype bytes of
                                               [2, nblocks, block_size, kv_heads, head_dim]
                 [header, data, scales]  int8 only; scales: float32 bytes of
                                               [2, nblocks, block_size, kv_heads]
    done:        [header]

``header`` is a msgpack map of at most ``MAX_HEADER_BYTES``, a tagged union on ``kind``:

    every frame: v (=1), tid, tok, kind ("layer" | "done")
    layer:       layer, chunk, nchunks, first_block, nblocks, dtype, shape, nbytes,
                 scales_nbytes (set iff dtype is int8)
    done:        first_token, fingerprint, first_logprob (or none)

A layer is split along the block dimension into ``nchunks`` chunks; chunk ``c`` covers the
descriptor's block list ``[first_block, first_block + nblocks)``. Chunks of a layer arrive in
order and tile the whole list; layers arrive in order 0..L-1; ``done`` comes last.

Parsing reads the identity (``tid``, ``tok``, ``v``) first, so a frame is authenticated before
anything else of it is trusted, then the whole header; unknown keys are refused.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from disagg.shared.protocol.descriptor import (
    MAX_BLOCKS,
    MAX_DIM,
    MAX_FINGERPRINT_LEN,
    MAX_LAYERS,
    Secret,
)
from disagg.shared.protocol.sampling import Logprob
from disagg.shared.protocol.types import WIRE_ITEMSIZE, TokenId, WireDtype

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 4096
SCALE_BYTES = 4  # float32

Dim = Annotated[int, Meta(ge=1, le=MAX_DIM)]
Bytes = Annotated[int, Meta(ge=1, le=1 << 40)]
Blocks = Annotated[int, Meta(ge=0, le=MAX_BLOCKS)]


class TransferError(Exception):
    """A transfer cannot proceed: refused at begin/expect, failed while sending, or timed out."""


class FrameError(TransferError):
    """One received frame is invalid; ``reason`` is its key in ``ReceiverCore.dropped``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def same_secret(a: str, b: str) -> bool:
    """Constant-time string equality, for tokens and fingerprints."""
    return hmac.compare_digest(a.encode(), b.encode())


class _Header(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    tag_field="kind",
    forbid_unknown_fields=True,
    rename={"transfer_id": "tid", "token": "tok"},
):
    v: Annotated[int, Meta(ge=PROTOCOL_VERSION, le=PROTOCOL_VERSION)] = PROTOCOL_VERSION
    transfer_id: Secret
    token: Secret

    def encode(self) -> bytes:
        """msgpack bytes of the header frame."""
        return _encoder.encode(self)


class LayerHeader(_Header, frozen=True, tag="layer"):
    """Header of one chunk of one layer's KV (see the module docstring for the fields)."""

    layer: Annotated[int, Meta(ge=0, le=MAX_LAYERS)]
    chunk: Blocks
    nchunks: Annotated[int, Meta(ge=1, le=MAX_BLOCKS)]
    first_block: Blocks
    nblocks: Annotated[int, Meta(ge=1, le=MAX_BLOCKS)]
    dtype: WireDtype
    shape: tuple[Dim, Dim, Dim, Dim, Dim]
    nbytes: Bytes
    scales_nbytes: Bytes | None = None

    def __post_init__(self) -> None:
        if self.chunk >= self.nchunks:
            raise ValueError(f"chunk {self.chunk} of {self.nchunks}")
        if (self.scales_nbytes is not None) != (self.dtype == "int8"):
            raise ValueError("scales_nbytes goes with the int8 wire dtype, and only with it")


class DoneHeader(_Header, frozen=True, tag="done"):
    """Header of the final frame: the first sampled token and the sender's model fingerprint."""

    first_token: TokenId
    fingerprint: Annotated[str, Meta(max_length=MAX_FINGERPRINT_LEN)]
    first_logprob: Logprob | None = None  # when the request asks for logprobs


class _Identity(msgspec.Struct, frozen=True, rename={"transfer_id": "tid", "token": "tok"}):
    transfer_id: Secret
    token: Secret
    v: Any = None


_encoder = msgspec.msgpack.Encoder()
_identity = msgspec.msgpack.Decoder(_Identity)
_header = msgspec.msgpack.Decoder(LayerHeader | DoneHeader)


def read_identity(raw: Any) -> tuple[str, str]:
    """``(transfer_id, token)`` of a header frame: the only fields read before auth. Raises
    ``FrameError("bad_header")`` for anything that is not a small map holding both."""
    ident = _read_identity(raw)
    return ident.transfer_id, ident.token


def parse_header(raw: Any) -> LayerHeader | DoneHeader:
    """The strictly typed header of a frame; raises ``FrameError`` on any deviation."""
    version = _read_identity(raw).v
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise FrameError("bad_version", f"protocol version {version!r:.20}, want 1")
    try:
        return _header.decode(raw)
    except msgspec.ValidationError as err:
        raise FrameError("bad_field", str(err)) from None


def _read_identity(raw: Any) -> _Identity:
    view = byte_view(raw)
    if view.nbytes > MAX_HEADER_BYTES:
        raise FrameError("bad_header", f"header of {view.nbytes} bytes > {MAX_HEADER_BYTES}")
    try:
        return _identity.decode(view)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise FrameError("bad_header", f"no identity: {err}") from None


def byte_view(raw: Any, reason: str = "bad_header") -> memoryview:
    """A flat byte view of one received part (a ZeroMQ frame, bytes, any buffer)."""
    try:
        view = memoryview(raw)
    except TypeError:
        raise FrameError(reason, f"a {type(raw).__name__} is no buffer") from None
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def check_payloads(header: LayerHeader | DoneHeader, payloads: Sequence[memoryview]) -> None:
    """Stateless check that the payload parts match what the header announces."""
    if isinstance(header, DoneHeader):
        if payloads:
            raise FrameError("bad_payload", f"done frame with {len(payloads)} payload parts")
        return
    want = [header.nbytes] + ([header.scales_nbytes] if header.scales_nbytes is not None else [])
    got = [p.nbytes for p in payloads]
    if got != want:
        raise FrameError("bad_payload", f"payload sizes {got[:4]}, header says {want}")
    if math.prod(header.shape) * WIRE_ITEMSIZE[header.dtype] != header.nbytes:
        raise FrameError("bad_payload", f"shape {header.shape} disagrees with nbytes")
    if header.shape[:2] != (2, header.nblocks):
        raise FrameError("bad_payload", f"shape {header.shape} is not [2, nblocks, ...]")
