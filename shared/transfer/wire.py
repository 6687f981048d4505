"""Wire format of the KV transfer: limits, errors, header frames and their strict parsing.

Every message is one ZeroMQ multipart message (delivered whole or not at all):

    layer chunk: [header, data]          data: wire-dtype bytes of
                                               [2, nblocks, block_size, kv_heads, head_dim]
                 [header, data, scales]  int8 only; scales: float32 bytes of
                                               [2, nblocks, block_size, kv_heads]
    done:        [header]

``header`` is a msgpack map of at most ``MAX_HEADER_BYTES``:

    every frame: v (=1), tid, tok, kind ("layer" | "done")
    layer:       layer, chunk, nchunks, first_block, nblocks, dtype, shape, nbytes,
                 scales_nbytes (present iff dtype is int8)
    done:        first_token, fingerprint

A layer is split along the block dimension into ``nchunks`` chunks; chunk ``c`` covers the
descriptor's block list ``[first_block, first_block + nblocks)``. Chunks of a layer arrive in
order and tile the whole list; layers arrive in order 0..L-1; ``done`` comes last.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import torch
import zmq

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 4096
DEFAULT_MAX_CHUNK_BYTES = 4 << 20
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
}

MAX_ID_LEN = 128
MAX_FINGERPRINT_LEN = 64
MAX_LAYERS = 4096
MAX_BLOCKS = 1 << 20
MAX_DIM = 1 << 31
MAX_TOKEN_ID = (1 << 31) - 1
SCALE_BYTES = 4  # float32
IDLE_POLL_S = 0.05  # how often the sender and receiver threads check for close()


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


_COMMON_KEYS = frozenset({"v", "tid", "tok", "kind"})
_LAYER_KEYS = _COMMON_KEYS | {
    "layer", "chunk", "nchunks", "first_block", "nblocks", "dtype", "shape", "nbytes",
}  # fmt: skip
_DONE_KEYS = _COMMON_KEYS | {"first_token", "fingerprint"}


def _common_fields(transfer_id: str, token: str, kind: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "tid": transfer_id, "tok": token, "kind": kind}


@dataclass(frozen=True)
class LayerHeader:
    """Header of one chunk of one layer's KV (see the module docstring for the fields)."""

    transfer_id: str
    token: str
    layer: int
    chunk: int
    nchunks: int
    first_block: int
    nblocks: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    scales_nbytes: int | None = None

    def encode(self) -> bytes:
        """msgpack bytes of the header frame."""
        header = _common_fields(self.transfer_id, self.token, "layer") | {
            "layer": self.layer,
            "chunk": self.chunk,
            "nchunks": self.nchunks,
            "first_block": self.first_block,
            "nblocks": self.nblocks,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
        }
        if self.scales_nbytes is not None:
            header["scales_nbytes"] = self.scales_nbytes
        return msgpack.packb(header)


@dataclass(frozen=True)
class DoneHeader:
    """Header of the final frame: the first sampled token and the sender's model fingerprint."""

    transfer_id: str
    token: str
    first_token: int
    fingerprint: str

    def encode(self) -> bytes:
        """msgpack bytes of the header frame."""
        header = _common_fields(self.transfer_id, self.token, "done") | {
            "first_token": self.first_token,
            "fingerprint": self.fingerprint,
        }
        return msgpack.packb(header)


def unpack_header_map(raw: Any) -> dict[Any, Any]:
    """msgpack map of a header frame; raises ``FrameError("bad_header")`` on anything else."""
    view = as_buffer(raw)
    if view.nbytes > MAX_HEADER_BYTES:
        raise FrameError("bad_header", f"header of {view.nbytes} bytes > {MAX_HEADER_BYTES}")
    try:
        obj = msgpack.unpackb(view, raw=False, strict_map_key=True)
    except Exception as exc:  # untrusted bytes: msgpack raises several unrelated types
        raise FrameError("bad_header", f"not msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise FrameError("bad_header", f"header is a {type(obj).__name__}, not a map")
    return obj


def header_identity(header: dict[Any, Any]) -> tuple[str, str]:
    """``(transfer_id, token)`` of an unpacked header; the only fields read before auth."""
    tid, tok = header.get("tid"), header.get("tok")
    for value in (tid, tok):
        if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LEN:
            raise FrameError("bad_header", "tid/tok missing or not short strings")
    return tid, tok


def parse_header(header: dict[Any, Any]) -> LayerHeader | DoneHeader:
    """Strictly typed header from an unpacked map; raises ``FrameError`` on any deviation."""
    tid, tok = header_identity(header)
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise FrameError("bad_version", f"protocol version {version!r:.20}, want 1")
    kind = header.get("kind")
    if kind == "layer":
        return _parse_layer(header, tid, tok)
    if kind == "done":
        _require_keys(header, _DONE_KEYS)
        return DoneHeader(
            transfer_id=tid,
            token=tok,
            first_token=_field_int(header, "first_token", 0, MAX_TOKEN_ID),
            fingerprint=_field_str(header, "fingerprint", MAX_FINGERPRINT_LEN),
        )
    raise FrameError("bad_field", f"unknown kind {kind!r:.40}")


def _parse_layer(header: dict[Any, Any], tid: str, tok: str) -> LayerHeader:
    dtype = header.get("dtype")
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise FrameError("bad_field", f"dtype {dtype!r:.40} not one of {sorted(WIRE_DTYPES)}")
    quantized = dtype == "int8"
    _require_keys(header, _LAYER_KEYS | {"scales_nbytes"} if quantized else _LAYER_KEYS)
    nchunks = _field_int(header, "nchunks", 1, MAX_BLOCKS)
    return LayerHeader(
        transfer_id=tid,
        token=tok,
        layer=_field_int(header, "layer", 0, MAX_LAYERS),
        chunk=_field_int(header, "chunk", 0, nchunks - 1),
        nchunks=nchunks,
        first_block=_field_int(header, "first_block", 0, MAX_BLOCKS),
        nblocks=_field_int(header, "nblocks", 1, MAX_BLOCKS),
        dtype=dtype,
        shape=_field_shape(header),
        nbytes=_field_int(header, "nbytes", 1, 1 << 40),
        scales_nbytes=_field_int(header, "scales_nbytes", 1, 1 << 40) if quantized else None,
    )


def _require_keys(header: dict[Any, Any], keys: frozenset[str]) -> None:
    present = set(header)
    if present != keys:
        missing, extra = keys - present, present - keys
        raise FrameError(
            "bad_field",
            f"missing {sorted(missing)}, unexpected {sorted(map(repr, extra))[:8]}",
        )


def _field_int(header: dict[Any, Any], name: str, lo: int, hi: int) -> int:
    value = header.get(name)
    if type(value) is not int or not lo <= value <= hi:
        raise FrameError("bad_field", f"{name}={value!r:.40} not an int in [{lo}, {hi}]")
    return value


def _field_str(header: dict[Any, Any], name: str, max_len: int) -> str:
    value = header.get(name)
    if not isinstance(value, str) or len(value) > max_len:
        raise FrameError("bad_field", f"{name} is not a string of at most {max_len} chars")
    return value


def _field_shape(header: dict[Any, Any]) -> tuple[int, ...]:
    shape = header.get("shape")
    if not isinstance(shape, list) or len(shape) != 5:
        raise FrameError("bad_field", "shape is not a list of 5 ints")
    if not all(type(dim) is int and 1 <= dim <= MAX_DIM for dim in shape):
        raise FrameError("bad_field", f"shape {shape!r:.80} has a non-positive or non-int dim")
    return tuple(shape)


def as_buffer(part: Any) -> memoryview:
    """Byte view of one received part (``zmq.Frame``, bytes, or any buffer)."""
    try:
        view = part.buffer if isinstance(part, zmq.Frame) else memoryview(part)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except (TypeError, ValueError):
        raise FrameError(
            "bad_payload", f"part of type {type(part).__name__} is no buffer"
        ) from None


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
    itemsize = WIRE_DTYPES[header.dtype].itemsize
    if math.prod(header.shape) * itemsize != header.nbytes:
        raise FrameError("bad_payload", f"shape {header.shape} disagrees with nbytes")
    if header.shape[:2] != (2, header.nblocks):
        raise FrameError("bad_payload", f"shape {header.shape} is not [2, nblocks, ...]")
