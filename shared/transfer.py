"""ZeroMQ KV-cache transfer: prefill pushes each layer's KV blocks into decode's reserved blocks.

Flow: the decode worker reserves blocks and builds a ``TransferDescriptor`` (NATS carries it to
the prefill worker). The prefill worker calls ``KVSender.begin``, then ``SendHandle.send_layer``
after each layer is computed (the sender thread pushes it while the next layer computes), then
``SendHandle.finish`` with the first sampled token. ``KVReceiver`` (shell: a PULL socket and a
thread) feeds ``ReceiverCore`` (validation, bookkeeping and writes; no sockets).

Wire format. Every message is one ZeroMQ multipart message (delivered whole or not at all):

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

Ownership of the decode-side blocks (the ids in ``TransferDescriptor.block_ids``):

- the decode worker reserves them before the descriptor exists and owns them throughout;
- between ``ReceiverCore.expect`` and the transfer's end the receiver only *writes* into them;
- the transfer ends exactly once: completed or failed (a ``TransferResult`` from
  ``poll_completed``), expired (an id returned by ``expire``) or cancelled (``cancel``). After
  that the receiver never touches the blocks again and the decode worker adopts them (completed)
  or frees them (every other end). The receiver never frees a block.

The prefill-side blocks (``local_block_ids``) stay the prefill worker's: they are only read
inside ``send_layer``, which copies one layer into a send buffer owned by the ``SendHandle``, so
the prefill worker may free them once ``send_layer`` of the last layer has returned.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import queue
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import msgpack
import torch
import zmq
from disagg.kernels.kv_pack import pack_kv, unpack_kv
from disagg.shared.log import get_logger

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 4096
DEFAULT_MAX_CHUNK_BYTES = 4 << 20
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
}

_MAX_ID_LEN = 128
_MAX_FINGERPRINT_LEN = 64
_MAX_LAYERS = 4096
_MAX_BLOCKS = 1 << 20
_MAX_DIM = 1 << 31
_MAX_TOKEN_ID = (1 << 31) - 1
_SCALE_BYTES = 4  # float32
_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ADDRESS_SCHEMES = ("tcp://", "ipc://")
_RECENT_IDS = 4096  # finished ids remembered so late frames count as closed, not unknown
_IDLE_POLL_S = 0.05
_SNDTIMEO_MS = 100  # a blocked send wakes this often to check close() and its time limit

_log = get_logger(__name__)


class TransferError(Exception):
    """A transfer cannot proceed: refused at begin/expect, failed while sending, or timed out."""


class FrameError(TransferError):
    """One received frame is invalid; ``reason`` is its key in ``ReceiverCore.dropped``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


# --- descriptor -------------------------------------------------------------------------------


def _check_str(name: str, value: Any, max_len: int = _MAX_ID_LEN) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        raise ValueError(f"{name} must be a non-empty string of at most {max_len} chars")


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r:.60}")


@dataclass(frozen=True)
class TransferDescriptor:
    """What the decode worker hands out so one prefill worker may fill its reserved blocks.

    ``block_ids`` are the decode worker's reserved blocks in sequence order; it owns them (see
    the module docstring). ``deadline_s`` counts from the receiver's ``expect``.
    """

    transfer_id: str
    token: str
    address: str
    block_ids: tuple[int, ...]
    num_layers: int
    wire_dtype: str
    model_fingerprint: str
    deadline_s: float

    def __post_init__(self) -> None:
        _check_str("transfer_id", self.transfer_id)
        _check_str("token", self.token)
        _check_str("address", self.address, 256)
        if not self.address.startswith(_ADDRESS_SCHEMES):
            raise ValueError(f"address must start with one of {_ADDRESS_SCHEMES}")
        if not isinstance(self.block_ids, (tuple, list)) or not 0 < len(self.block_ids) <= (
            _MAX_BLOCKS
        ):
            raise ValueError(f"block_ids must be a list of 1..{_MAX_BLOCKS} block ids")
        for block_id in self.block_ids:
            _check_int("block id", block_id, 0, _MAX_DIM - 1)
        object.__setattr__(self, "block_ids", tuple(self.block_ids))
        _check_int("num_layers", self.num_layers, 1, _MAX_LAYERS)
        if not isinstance(self.wire_dtype, str) or self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}")
        _check_str("model_fingerprint", self.model_fingerprint, _MAX_FINGERPRINT_LEN)
        deadline = self.deadline_s
        if type(deadline) not in (int, float) or not (math.isfinite(deadline) and deadline > 0):
            raise ValueError(f"deadline_s must be a positive finite number, got {deadline!r:.60}")
        object.__setattr__(self, "deadline_s", float(deadline))

    @classmethod
    def new(
        cls,
        *,
        address: str,
        block_ids: Sequence[int],
        num_layers: int,
        wire_dtype: str,
        model_fingerprint: str,
        deadline_s: float,
    ) -> TransferDescriptor:
        """A descriptor with a fresh random transfer id and one-time token."""
        return cls(
            transfer_id=uuid.uuid4().hex,
            token=secrets.token_hex(16),
            address=address,
            block_ids=tuple(block_ids),
            num_layers=num_layers,
            wire_dtype=wire_dtype,
            model_fingerprint=model_fingerprint,
            deadline_s=deadline_s,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain msgpack/JSON-able form (``block_ids`` as a list)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["block_ids"] = list(self.block_ids)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> TransferDescriptor:
        """Parse ``to_dict`` output; raises ``ValueError`` naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"descriptor must be a map, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        missing, unexpected = names - data.keys(), data.keys() - names
        if missing or unexpected:
            raise ValueError(
                f"descriptor keys: missing {sorted(missing)}, unexpected "
                f"{sorted(map(repr, unexpected))}"
            )
        return cls(**data)


_ARCH_FIELDS = (
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "hidden_act",
    "rms_norm_eps", "rope_theta", "rope_scaling", "attention_bias", "tie_word_embeddings",
    "sliding_window", "use_sliding_window",
)  # fmt: skip


def model_fingerprint(
    config: dict[str, Any], weight_shapes: dict[str, tuple[int, ...]], *, revision: str = ""
) -> str:
    """sha256 (first 16 hex chars) of the architecture-defining config fields + weight shapes.

    Equal fingerprints mean the KV layouts and the computation producing them agree; the weight
    *values* are not hashed, so pass ``revision`` (e.g. a checkpoint hash) to tell fine-tunes
    of one architecture apart.
    """
    arch = {name: config.get(name) for name in _ARCH_FIELDS}
    shapes = sorted((name, [int(d) for d in shape]) for name, shape in weight_shapes.items())
    blob = json.dumps([arch, shapes, revision], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- headers ----------------------------------------------------------------------------------

_COMMON_KEYS = frozenset({"v", "tid", "tok", "kind"})
_LAYER_KEYS = _COMMON_KEYS | {
    "layer", "chunk", "nchunks", "first_block", "nblocks", "dtype", "shape", "nbytes",
}  # fmt: skip
_DONE_KEYS = _COMMON_KEYS | {"first_token", "fingerprint"}


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
        header = {
            "v": PROTOCOL_VERSION,
            "tid": self.transfer_id,
            "tok": self.token,
            "kind": "layer",
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
        return msgpack.packb(
            {
                "v": PROTOCOL_VERSION,
                "tid": self.transfer_id,
                "tok": self.token,
                "kind": "done",
                "first_token": self.first_token,
                "fingerprint": self.fingerprint,
            }
        )


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
        if not isinstance(value, str) or not 0 < len(value) <= _MAX_ID_LEN:
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
            first_token=_field_int(header, "first_token", 0, _MAX_TOKEN_ID),
            fingerprint=_field_str(header, "fingerprint", _MAX_FINGERPRINT_LEN),
        )
    raise FrameError("bad_field", f"unknown kind {kind!r:.40}")


def _parse_layer(header: dict[Any, Any], tid: str, tok: str) -> LayerHeader:
    dtype = header.get("dtype")
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise FrameError("bad_field", f"dtype {dtype!r:.40} not one of {sorted(WIRE_DTYPES)}")
    quantized = dtype == "int8"
    _require_keys(header, _LAYER_KEYS | {"scales_nbytes"} if quantized else _LAYER_KEYS)
    nchunks = _field_int(header, "nchunks", 1, _MAX_BLOCKS)
    return LayerHeader(
        transfer_id=tid,
        token=tok,
        layer=_field_int(header, "layer", 0, _MAX_LAYERS),
        chunk=_field_int(header, "chunk", 0, nchunks - 1),
        nchunks=nchunks,
        first_block=_field_int(header, "first_block", 0, _MAX_BLOCKS),
        nblocks=_field_int(header, "nblocks", 1, _MAX_BLOCKS),
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
    if not all(type(dim) is int and 1 <= dim <= _MAX_DIM for dim in shape):
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


# --- receiving side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferResult:
    """End of one transfer on the decode side; ``ok=False`` means the decode worker frees."""

    transfer_id: str
    ok: bool
    first_token: int | None
    bytes_received: int
    wall_s: float
    completed_at: float
    error: str | None = None


class _Inbound:
    """Receive state of one registered transfer: where the next chunk must start."""

    def __init__(self, desc: TransferDescriptor, kv_cache: torch.Tensor, now: float) -> None:
        self.desc = desc
        self.kv_cache = kv_cache
        self.block_ids = torch.tensor(desc.block_ids, dtype=torch.int64, device=kv_cache.device)
        self.expected_at = now
        self.deadline_at = now + desc.deadline_s
        self.next_layer = 0
        self.next_chunk = 0
        self.next_block = 0
        self.nchunks = 0
        self.bytes_received = 0

    def check_layer(self, header: LayerHeader) -> None:
        """Raise ``FrameError`` unless ``header`` is exactly the next chunk this cache accepts."""
        if header.dtype != self.desc.wire_dtype:
            raise FrameError("bad_dtype", f"{header.dtype} != wire dtype {self.desc.wire_dtype}")
        block_size, kv_heads, head_dim = self.kv_cache.shape[3:]
        if header.shape[2:] != (block_size, kv_heads, head_dim):
            raise FrameError("bad_geometry", f"shape {header.shape} vs cache {self.kv_cache.shape}")
        scales = 2 * header.nblocks * block_size * kv_heads * _SCALE_BYTES
        if header.scales_nbytes is not None and header.scales_nbytes != scales:
            raise FrameError("bad_geometry", f"scales_nbytes {header.scales_nbytes} != {scales}")
        if (header.layer, header.chunk) != (self.next_layer, self.next_chunk):
            raise FrameError(
                "out_of_order",
                f"got layer {header.layer} chunk {header.chunk}, "
                f"want layer {self.next_layer} chunk {self.next_chunk}",
            )
        if header.chunk > 0 and header.nchunks != self.nchunks:
            raise FrameError("out_of_order", f"nchunks changed {self.nchunks}->{header.nchunks}")
        self._check_range(header)

    def _check_range(self, header: LayerHeader) -> None:
        end, total = header.first_block + header.nblocks, len(self.desc.block_ids)
        last_chunk = header.chunk == header.nchunks - 1
        if header.first_block != self.next_block or end > total or (end == total) != last_chunk:
            raise FrameError(
                "bad_block_range",
                f"blocks [{header.first_block}, {end}) of {total}, next is {self.next_block}",
            )

    def write(self, header: LayerHeader, payloads: Sequence[memoryview]) -> None:
        """Write a checked chunk into the reserved blocks (converting / dequantizing)."""
        device = self.kv_cache.device
        data = torch.frombuffer(payloads[0], dtype=WIRE_DTYPES[header.dtype]).view(header.shape)
        scales = None
        if header.scales_nbytes is not None:
            scales = torch.frombuffer(payloads[1], dtype=torch.float32).view(header.shape[:4])
            scales = scales.to(device)
        end = header.first_block + header.nblocks
        ids = self.block_ids[header.first_block : end]
        unpack_kv(self.kv_cache[header.layer], ids, data.to(device), scales)
        self.bytes_received += sum(p.nbytes for p in payloads)
        self._advance(header, end)

    def _advance(self, header: LayerHeader, end: int) -> None:
        self.nchunks = header.nchunks
        self.next_block, self.next_chunk = end, header.chunk + 1
        if self.next_chunk == header.nchunks:
            self.next_layer, self.next_chunk, self.next_block = header.layer + 1, 0, 0

    def check_done(self, header: DoneHeader) -> None:
        """Raise ``FrameError`` unless every layer arrived and the fingerprints agree."""
        if self.next_layer != self.desc.num_layers:
            raise FrameError("early_done", f"done after {self.next_layer} layers")
        if not hmac.compare_digest(
            header.fingerprint.encode(), self.desc.model_fingerprint.encode()
        ):
            raise FrameError("bad_fingerprint", f"sender model {header.fingerprint!r}")


class ReceiverCore:
    """Receiving-side bookkeeping: registered transfers, frame validation, writes, results.

    No sockets: ``KVReceiver`` feeds it from its thread, tests feed it directly. Thread-safe;
    one lock covers registration and every write, so once ``cancel``/``expire`` return, no
    write into that transfer's blocks is in progress or will ever start.
    """

    def __init__(self, *, max_transfers: int = 1024) -> None:
        """``max_transfers`` bounds registered transfers plus unpolled results together."""
        if max_transfers < 1:
            raise ValueError(f"max_transfers must be >= 1, got {max_transfers}")
        self.max_transfers = max_transfers
        self._lock = threading.Lock()
        self._results_ready = threading.Condition(self._lock)
        self._inbound: dict[str, _Inbound] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._results: deque[TransferResult] = deque()
        self._dropped: dict[str, int] = {}

    def expect(self, desc: TransferDescriptor, kv_cache: torch.Tensor) -> None:
        """Register a transfer whose ``desc.block_ids`` the caller has reserved in ``kv_cache``.

        The caller keeps owning the blocks; from now until the transfer ends (result, expire or
        cancel) the receiver may write into them. Raises ``TransferError`` when refused.
        """
        _check_cache(kv_cache, desc)
        with self._lock:
            if desc.transfer_id in self._inbound or desc.transfer_id in self._recent:
                raise TransferError(f"transfer {desc.transfer_id} is already known")
            if len(self._inbound) + len(self._results) >= self.max_transfers:
                raise TransferError(f"receiver full ({self.max_transfers} transfers/results)")
            self._inbound[desc.transfer_id] = _Inbound(desc, kv_cache, time.monotonic())

    def cancel(self, transfer_id: str) -> bool:
        """Unregister (abort) a transfer; later frames for it are dropped. True if it was live.

        After this returns the receiver never writes its blocks; the caller frees them.
        """
        with self._lock:
            return self._end_locked(transfer_id) is not None

    def expire(self, now: float | None = None) -> list[str]:
        """Unregister and return every transfer past its deadline (``time.monotonic`` clock).

        The caller frees the blocks of every returned id.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            late = [tid for tid, inb in self._inbound.items() if inb.deadline_at <= now]
            for tid in late:
                self._end_locked(tid)
        for tid in late:
            _log.warning("kv_transfer_expired", transfer_id=tid)
        return late

    def poll_completed(self, timeout: float = 0.0) -> list[TransferResult]:
        """Every finished transfer's result, waiting up to ``timeout`` s for the first one."""
        with self._results_ready:
            if not self._results and timeout > 0:
                self._results_ready.wait(timeout)
            results = list(self._results)
            self._results.clear()
        return results

    @property
    def dropped(self) -> dict[str, int]:
        """Rejected frames so far, by reason (a copy)."""
        with self._lock:
            return dict(self._dropped)

    @property
    def num_pending(self) -> int:
        """Registered transfers that have not ended."""
        with self._lock:
            return len(self._inbound)

    def handle_message(self, parts: Sequence[Any]) -> None:
        """Validate one multipart message and apply it. Never raises."""
        try:
            if not parts:
                raise FrameError("bad_header", "empty message")
            header = unpack_header_map(parts[0])
            tid, tok = header_identity(header)
        except FrameError as err:
            self._drop(None, err)
            return
        with self._lock:
            inbound = self._inbound.get(tid)
            if inbound is None:
                reason = "closed_transfer" if tid in self._recent else "unknown_transfer"
                self._drop_locked(tid, FrameError(reason, "no such registered transfer"))
            elif not hmac.compare_digest(tok.encode(), inbound.desc.token.encode()):
                # A foreign sender must not be able to fail someone else's transfer: drop only.
                self._drop_locked(tid, FrameError("bad_token", "token mismatch"))
            else:
                self._apply_locked(inbound, header, parts[1:])

    def _apply_locked(self, inbound: _Inbound, raw: dict[Any, Any], parts: Sequence[Any]) -> None:
        try:
            header = parse_header(raw)
            payloads = [as_buffer(p) for p in parts]
            check_payloads(header, payloads)
            if isinstance(header, DoneHeader):
                inbound.check_done(header)
                self._finish_locked(inbound, header.first_token, None)
            else:
                inbound.check_layer(header)
                inbound.write(header, payloads)
        except FrameError as err:
            self._drop_locked(inbound.desc.transfer_id, err)
            self._finish_locked(inbound, None, str(err))
        except Exception as exc:  # a failed write must fail the transfer, not the thread
            self._drop_locked(inbound.desc.transfer_id, FrameError("write_error", repr(exc)))
            self._finish_locked(inbound, None, f"write_error: {exc!r}")

    def _finish_locked(self, inbound: _Inbound, first_token: int | None, error: str | None) -> None:
        self._end_locked(inbound.desc.transfer_id)
        now = time.monotonic()
        result = TransferResult(
            transfer_id=inbound.desc.transfer_id,
            ok=error is None,
            first_token=first_token,
            bytes_received=inbound.bytes_received,
            wall_s=now - inbound.expected_at,
            completed_at=now,
            error=error,
        )
        self._results.append(result)
        self._results_ready.notify_all()
        if error is not None:
            _log.warning("kv_transfer_failed", transfer_id=result.transfer_id, error=error)

    def _end_locked(self, transfer_id: str) -> _Inbound | None:
        inbound = self._inbound.pop(transfer_id, None)
        if inbound is not None:
            self._recent[transfer_id] = None
            if len(self._recent) > _RECENT_IDS:
                self._recent.popitem(last=False)
        return inbound

    def _drop(self, transfer_id: str | None, err: FrameError) -> None:
        with self._lock:
            self._drop_locked(transfer_id, err)

    def _drop_locked(self, transfer_id: str | None, err: FrameError) -> None:
        count = self._dropped.get(err.reason, 0) + 1
        self._dropped[err.reason] = count
        if count & (count - 1) == 0:  # log-spaced: a flood of garbage cannot flood the log
            _log.warning(
                "kv_frame_dropped", transfer_id=transfer_id, reason=err.reason, count=count
            )


def _check_cache(kv_cache: torch.Tensor, desc: TransferDescriptor) -> None:
    shape = tuple(kv_cache.shape)
    if kv_cache.dim() != 6 or shape[0] != desc.num_layers or shape[1] != 2:
        raise TransferError(f"cache shape {shape} is not [{desc.num_layers}, 2, blocks, ...]")
    if kv_cache.dtype not in _CACHE_DTYPES:
        raise TransferError(f"cache dtype {kv_cache.dtype} is not float32/bfloat16/float16")
    if max(desc.block_ids) >= shape[2]:
        raise TransferError(f"block id {max(desc.block_ids)} >= {shape[2]} cache blocks")
    if len(set(desc.block_ids)) != len(desc.block_ids):
        raise TransferError("descriptor lists a block id twice")


class KVReceiver:
    """Decode side: a PULL socket bound on ``host`` and one thread feeding ``ReceiverCore``.

    ``expect``/``cancel``/``expire``/``poll_completed``/``dropped`` are the core's (see there
    for block ownership). Frames larger than ``max_frame_bytes`` make ZeroMQ drop the peer's
    connection, so a sender's ``max_chunk_bytes`` must stay below it.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertise_host: str | None = None,
        rcvhwm: int = 64,
        max_frame_bytes: int = 64 << 20,
        max_transfers: int = 1024,
    ) -> None:
        """Bind now (port 0 picks a free port); ``address`` is what descriptors carry."""
        self.core = ReceiverCore(max_transfers=max_transfers)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        try:
            if port == 0:
                port = self._sock.bind_to_random_port(f"tcp://{host}")
            else:
                self._sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError:
            self._sock.close()
            self._ctx.term()
            raise
        self.address = f"tcp://{advertise_host or host}:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-receiver", daemon=True)
        self._thread.start()
        _log.info("kv_receiver_listening", address=self.address)

    def expect(self, desc: TransferDescriptor, kv_cache: torch.Tensor) -> None:
        """See ``ReceiverCore.expect``."""
        self.core.expect(desc, kv_cache)

    def cancel(self, transfer_id: str) -> bool:
        """See ``ReceiverCore.cancel``."""
        return self.core.cancel(transfer_id)

    def expire(self, now: float | None = None) -> list[str]:
        """See ``ReceiverCore.expire``."""
        return self.core.expire(now)

    def poll_completed(self, timeout: float = 0.0) -> list[TransferResult]:
        """See ``ReceiverCore.poll_completed``."""
        return self.core.poll_completed(timeout)

    @property
    def dropped(self) -> dict[str, int]:
        """Rejected frames by reason."""
        return self.core.dropped

    def close(self) -> None:
        """Stop the thread (within one poll interval) and close the socket; safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> KVReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        poll_ms = int(_IDLE_POLL_S * 1000)
        while not self._stop.is_set():
            try:
                if not self._sock.poll(poll_ms, zmq.POLLIN):
                    continue
                parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                _log.error("kv_receiver_socket_error", error=str(exc))
                self._stop.wait(_IDLE_POLL_S)
                continue
            self.core.handle_message(parts)


# --- sending side -----------------------------------------------------------------------------


@dataclass
class TransferStats:
    """Timeline of one sent transfer, all ``time.perf_counter()`` values.

    ``layer_called_at[i]``: ``send_layer(i)`` entered (≈ layer i's compute end);
    ``layer_enqueued_at[i]``: it returned (pack copy done, compute resumes);
    ``layer_sent_at[i]``: the sender thread handed layer i's last byte to ZeroMQ.
    """

    transfer_id: str
    num_layers: int
    begun_at: float
    layer_called_at: list[float]
    layer_enqueued_at: list[float]
    layer_sent_at: list[float]
    finish_called_at: float = math.nan
    done_sent_at: float = math.nan
    bytes_sent: int = 0  # every frame, headers included
    payload_bytes: int = 0  # data and scales frames only

    @property
    def exposed_s(self) -> float:
        """Transfer time not hidden behind compute: done frame sent minus ``finish`` called."""
        return self.done_sent_at - self.finish_called_at

    @property
    def pack_s(self) -> float:
        """Total time the compute thread spent inside ``send_layer``."""
        return sum(e - c for c, e in zip(self.layer_called_at, self.layer_enqueued_at, strict=True))


class _Slot:
    """One layer's send buffer; busy from packing until ZeroMQ releases its frames."""

    def __init__(self, data: torch.Tensor, scales: torch.Tensor | None) -> None:
        self.data = data  # flat, wire dtype, every chunk of one layer back to back
        self.scales = scales  # flat float32 (int8 wire only)
        self._sent = threading.Event()
        self._sent.set()
        self._tracker: zmq.MessageTracker | None = None

    def claim(self, deadline: float) -> None:
        """Wait until ZeroMQ no longer reads this buffer, then mark it busy."""
        if not self._sent.wait(max(0.0, deadline - time.monotonic())):
            raise TransferError("send buffer was not sent before the deadline")
        if self._tracker is not None:
            try:
                self._tracker.wait(max(0.0, deadline - time.monotonic()))
            except zmq.NotDone:
                raise TransferError("ZeroMQ did not release a send buffer in time") from None
        self._tracker = None
        self._sent.clear()

    def release(self, tracker: zmq.MessageTracker | None) -> None:
        """Called by the sender thread once the frames are queued (or abandoned)."""
        self._tracker = tracker
        self._sent.set()


@dataclass
class _Outgoing:
    """One queue item: a layer's chunk messages, or the done message (``layer is None``)."""

    handle: SendHandle
    layer: int | None
    messages: list[list[Any]]
    slot: _Slot | None
    nbytes: int
    payload_bytes: int


def _chunk_plan(num_blocks: int, block_bytes: int, max_chunk_bytes: int) -> list[tuple[int, int]]:
    """``(first_block, nblocks)`` per chunk, each at most ``max_chunk_bytes`` (or one block)."""
    per_chunk = max(1, max_chunk_bytes // block_bytes)
    return [
        (first, min(per_chunk, num_blocks - first)) for first in range(0, num_blocks, per_chunk)
    ]


def _wire_view(flat: torch.Tensor) -> Any:
    """Zero-copy buffer of a flat contiguous CPU tensor (uint8 view: numpy has no bfloat16)."""
    return flat.view(torch.uint8).numpy()


class SendHandle:
    """One outgoing transfer. Methods run on the compute thread; the sender thread sends.

    ``send_layer(i)`` for i = 0..L-1 in order, then ``finish(first_token)``, then ``wait``.
    Memory is bounded by ``pool_size`` layer buffers; a buffer is reused only after ZeroMQ has
    released it, so ``send_layer`` blocks (bounded by the deadline) when the wire falls behind.
    """

    def __init__(
        self,
        sender: KVSender,
        desc: TransferDescriptor,
        local_block_ids: torch.Tensor,
        kv_cache: torch.Tensor,
    ) -> None:
        self.desc = desc
        self._sender = sender
        self._local_ids = local_block_ids
        self._kv_cache = kv_cache
        self._geometry = tuple(kv_cache.shape[3:])  # block_size, kv_heads, head_dim
        self._wire_dtype = WIRE_DTYPES[desc.wire_dtype]
        block_elems = 2 * math.prod(self._geometry)
        self._plan = _chunk_plan(
            len(desc.block_ids), block_elems * self._wire_dtype.itemsize, sender.max_chunk_bytes
        )
        self._slots: list[_Slot] = []
        self._next_layer = 0
        self._finished = False
        self._error: str | None = None
        self._done = threading.Event()
        self.deadline = time.monotonic() + desc.deadline_s
        nan = [math.nan] * desc.num_layers
        self.stats = TransferStats(
            desc.transfer_id, desc.num_layers, time.perf_counter(), list(nan), list(nan), list(nan)
        )

    @property
    def error(self) -> str | None:
        """Why the transfer failed, or None."""
        return self._error

    @property
    def chunks_per_layer(self) -> int:
        """How many messages each layer is split into (``max_chunk_bytes`` bounds each)."""
        return len(self._plan)

    def send_layer(self, layer: int) -> None:
        """Pack layer ``layer``'s blocks into a send buffer and queue them; returns after the copy.

        Call right after the layer's KV is written; layers must come in order 0..L-1. Raises
        ``TransferError`` if the transfer already failed (the caller may stop computing).
        """
        called = time.perf_counter()
        self._check_open()
        if layer != self._next_layer:
            raise TransferError(f"send_layer({layer}) out of order: expected {self._next_layer}")
        self.stats.layer_called_at[layer] = called
        slot = self._slot_for(layer)
        try:
            slot.claim(self.deadline)
        except TransferError as exc:
            self.fail(f"send_layer({layer}): {exc}")
            raise
        try:
            item = self._pack_layer(layer, slot)
            self._sender.enqueue(item, self.deadline)
        except BaseException as exc:
            slot.release(None)
            self.fail(f"send_layer({layer}): {exc}")
            raise
        self._next_layer += 1
        self.stats.layer_enqueued_at[layer] = time.perf_counter()

    def finish(self, first_token: int) -> None:
        """Queue the done frame carrying the first sampled token; all layers must be sent."""
        self._check_open()
        if self._next_layer != self.desc.num_layers:
            raise TransferError(f"finish after {self._next_layer}/{self.desc.num_layers} layers")
        if type(first_token) is not int or not 0 <= first_token <= _MAX_TOKEN_ID:
            raise TransferError(f"first_token must be a non-negative int, got {first_token!r}")
        self.stats.finish_called_at = time.perf_counter()
        header = DoneHeader(
            self.desc.transfer_id, self.desc.token, first_token, self._sender.fingerprint
        ).encode()
        self._finished = True
        item = _Outgoing(self, None, [[header]], None, len(header), 0)
        try:
            self._sender.enqueue(item, self.deadline)
        except TransferError as exc:
            self.fail(str(exc))
            raise

    def wait(self, timeout: float | None = None) -> TransferStats:
        """Block until the done frame is handed to ZeroMQ; raises ``TransferError`` on failure."""
        if not self._done.wait(timeout):
            raise TransferError(f"transfer {self.desc.transfer_id} not sent within {timeout} s")
        if self._error is not None:
            raise TransferError(f"transfer {self.desc.transfer_id} failed: {self._error}")
        return self.stats

    def fail(self, message: str) -> None:
        """Mark the transfer failed; its queued frames are discarded. The first reason sticks."""
        if self._error is None:
            self._error = message
            _log.warning("kv_send_failed", transfer_id=self.desc.transfer_id, error=message)
        self._done.set()

    def _check_open(self) -> None:
        if self._error is not None:
            raise TransferError(f"transfer {self.desc.transfer_id} failed: {self._error}")
        if self._finished:
            raise TransferError(f"transfer {self.desc.transfer_id} is already finished")

    def _slot_for(self, layer: int) -> _Slot:
        index = layer % self._sender.pool_size
        if index == len(self._slots):
            self._slots.append(self._new_slot())
        return self._slots[index]

    def _new_slot(self) -> _Slot:
        blocks = len(self.desc.block_ids)
        block_size, kv_heads, _ = self._geometry
        pin = self._kv_cache.is_cuda
        data = torch.empty(
            2 * blocks * math.prod(self._geometry), dtype=self._wire_dtype, pin_memory=pin
        )
        scales = None
        if self.desc.wire_dtype == "int8":
            scales = torch.empty(2 * blocks * block_size * kv_heads, pin_memory=pin)
        return _Slot(data, scales)

    def _pack_layer(self, layer: int, slot: _Slot) -> _Outgoing:
        messages, nbytes, payload = [], 0, 0
        for chunk, (first, nblocks) in enumerate(self._plan):
            data, scales = self._pack_chunk(layer, slot, first, nblocks)
            header = LayerHeader(
                transfer_id=self.desc.transfer_id,
                token=self.desc.token,
                layer=layer,
                chunk=chunk,
                nchunks=len(self._plan),
                first_block=first,
                nblocks=nblocks,
                dtype=self.desc.wire_dtype,
                shape=(2, nblocks, *self._geometry),
                nbytes=data.numel() * data.element_size(),
                scales_nbytes=None if scales is None else scales.numel() * _SCALE_BYTES,
            ).encode()
            parts = [header, _wire_view(data)] + ([] if scales is None else [_wire_view(scales)])
            chunk_payload = sum(p.nbytes for p in parts[1:])
            messages.append(parts)
            nbytes += len(header) + chunk_payload
            payload += chunk_payload
        return _Outgoing(self, layer, messages, slot, nbytes, payload)

    def _pack_chunk(
        self, layer: int, slot: _Slot, first: int, nblocks: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pack one chunk into its place in ``slot``; returns the flat data/scales views."""
        block_size, kv_heads, _ = self._geometry
        per_block = 2 * math.prod(self._geometry)
        data = slot.data[first * per_block : (first + nblocks) * per_block]
        scales = None
        if slot.scales is not None:
            per_block_scales = 2 * block_size * kv_heads
            scales = slot.scales[first * per_block_scales : (first + nblocks) * per_block_scales]
        ids = self._local_ids[first : first + nblocks]
        kv_layer = self._kv_cache[layer]
        quantize = scales is not None
        data_out = data.view(2, nblocks, *self._geometry)
        scales_out = None if scales is None else scales.view(2, nblocks, block_size, kv_heads)
        if kv_layer.is_cuda or (not quantize and kv_layer.dtype != self._wire_dtype):
            packed, packed_scales = pack_kv(kv_layer, ids, quantize=quantize)
            data_out.copy_(packed)
            if scales_out is not None:
                scales_out.copy_(packed_scales)
        else:
            pack_kv(kv_layer, ids, quantize=quantize, out=data_out, scales_out=scales_out)
        return data, scales

    def _on_sent(self, item: _Outgoing, now: float) -> None:
        """Sender thread: every message of ``item`` was handed to ZeroMQ."""
        self.stats.bytes_sent += item.nbytes
        self.stats.payload_bytes += item.payload_bytes
        if item.layer is None:
            self.stats.done_sent_at = now
            self._done.set()
        else:
            self.stats.layer_sent_at[item.layer] = now


class KVSender:
    """Prefill side: one PUSH socket per decode address and one thread that sends.

    The compute thread packs (``SendHandle.send_layer``) and enqueues into a bounded queue; the
    sender thread owns every socket. A destination that does not accept a message within
    ``send_timeout_s`` fails that transfer (the decode side then expires it).
    """

    def __init__(
        self,
        fingerprint: str,
        *,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        pool_size: int = 2,
        queue_size: int = 64,
        sndhwm: int = 16,
        linger_s: float = 1.0,
        send_timeout_s: float = 5.0,
        max_destinations: int = 64,
    ) -> None:
        """``fingerprint`` is this worker's ``model_fingerprint``; begin() refuses any other."""
        if max_chunk_bytes < 1 or pool_size < 1 or queue_size < 1 or max_destinations < 1:
            raise ValueError(
                "max_chunk_bytes, pool_size, queue_size, max_destinations must be >= 1"
            )
        self.fingerprint = fingerprint
        self.max_chunk_bytes = max_chunk_bytes
        self.pool_size = pool_size
        self._sndhwm = sndhwm
        self._linger_ms = int(linger_s * 1000)
        self._send_timeout_s = send_timeout_s
        self._max_destinations = max_destinations
        self._ctx = zmq.Context()
        self._queue: queue.Queue[_Outgoing] = queue.Queue(maxsize=queue_size)
        self._sockets: OrderedDict[str, zmq.Socket] = OrderedDict()  # sender thread only
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kv-sender", daemon=True)
        self._thread.start()

    def begin(
        self,
        desc: TransferDescriptor,
        local_block_ids: Sequence[int] | torch.Tensor,
        kv_cache: torch.Tensor,
    ) -> SendHandle:
        """Start a transfer of ``kv_cache[:, :, local_block_ids]`` into ``desc.block_ids``.

        The caller keeps owning ``local_block_ids``: they are read only inside ``send_layer``
        (copied into the handle's send buffers), so they may be freed once the last layer's
        ``send_layer`` returns. Raises ``TransferError`` on a model fingerprint mismatch, a block
        count mismatch, or a cache that does not match the descriptor.
        """
        if self._stop.is_set():
            raise TransferError("sender is closed")
        if not hmac.compare_digest(desc.model_fingerprint.encode(), self.fingerprint.encode()):
            raise TransferError(
                f"model fingerprint mismatch: decode serves {desc.model_fingerprint}, "
                f"this prefill worker serves {self.fingerprint}"
            )
        ids = torch.as_tensor(local_block_ids, dtype=torch.int64).to(kv_cache.device).flatten()
        if ids.numel() != len(desc.block_ids):
            raise TransferError(
                f"{ids.numel()} local blocks for {len(desc.block_ids)} destination blocks"
            )
        if kv_cache.dim() != 6 or kv_cache.shape[0] != desc.num_layers or kv_cache.shape[1] != 2:
            raise TransferError(f"cache shape {tuple(kv_cache.shape)} vs {desc.num_layers} layers")
        if ids.min() < 0 or ids.max() >= kv_cache.shape[2]:
            raise TransferError(f"local block ids outside [0, {kv_cache.shape[2]})")
        return SendHandle(self, desc, ids, kv_cache)

    def enqueue(self, item: _Outgoing, deadline: float) -> None:
        """Hand an item to the sender thread, waiting for queue room until ``deadline``."""
        if self._stop.is_set():
            raise TransferError("sender is closed")
        try:
            self._queue.put(item, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            raise TransferError("send queue stayed full until the deadline") from None

    def close(self) -> None:
        """Stop the thread; queued items fail, sent frames get ``linger_s`` to flush. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout=self._send_timeout_s + 5.0)
        self._abandon_queued("sender closed")
        self._ctx.term()

    def __enter__(self) -> KVSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    item = self._queue.get(timeout=_IDLE_POLL_S)
                except queue.Empty:
                    continue
                try:
                    self._deliver(item)
                except Exception as exc:  # a bug in one transfer must not stop all the others
                    _log.exception("kv_sender_error", transfer_id=item.handle.desc.transfer_id)
                    item.handle.fail(f"internal error: {exc!r}")
        finally:
            for sock in self._sockets.values():
                sock.close(linger=self._linger_ms)
            self._sockets.clear()

    def _abandon_queued(self, reason: str) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item.slot is not None:
                item.slot.release(None)
            item.handle.fail(reason)

    def _deliver(self, item: _Outgoing) -> None:
        handle = item.handle
        trackers: list[zmq.MessageTracker] = []
        try:
            if handle.error is None:
                sock = self._socket_for(handle.desc.address)
                limit = min(handle.deadline, time.monotonic() + self._send_timeout_s)
                for parts in item.messages:
                    self._send_message(sock, parts, limit, trackers)
        except (TransferError, zmq.ZMQError) as exc:
            handle.fail(f"sending to {handle.desc.address}: {exc}")
        finally:
            if item.slot is not None:
                # Even a failed item keeps the trackers of what ZeroMQ did take.
                item.slot.release(zmq.MessageTracker(*trackers))
        if handle.error is None:
            handle._on_sent(item, time.perf_counter())

    def _send_message(
        self, sock: zmq.Socket, parts: list[Any], limit: float, trackers: list[zmq.MessageTracker]
    ) -> None:
        """Send one multipart message; its payload parts zero-copy, tracked into ``trackers``."""
        more = zmq.SNDMORE if len(parts) > 1 else 0
        while True:
            try:
                sock.send(parts[0], more)
                break
            except zmq.Again:
                if self._stop.is_set() or time.monotonic() >= limit:
                    raise TransferError("destination did not accept the frame in time") from None
        try:
            for i, part in enumerate(parts[1:], start=1):
                flags = zmq.SNDMORE if i < len(parts) - 1 else 0
                trackers.append(sock.send(part, flags, copy=False, track=True))
        except zmq.ZMQError:
            # A half-sent multipart message would corrupt the next one: drop the socket.
            self._evict(sock)
            raise

    def _socket_for(self, address: str) -> zmq.Socket:
        sock = self._sockets.get(address)
        if sock is not None:
            self._sockets.move_to_end(address)
            return sock
        if len(self._sockets) >= self._max_destinations:
            _, oldest = self._sockets.popitem(last=False)
            oldest.close(linger=self._linger_ms)
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self._sndhwm)
        sock.setsockopt(zmq.LINGER, self._linger_ms)
        sock.setsockopt(zmq.SNDTIMEO, _SNDTIMEO_MS)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections, never for the void
        sock.connect(address)
        self._sockets[address] = sock
        return sock

    def _evict(self, sock: zmq.Socket) -> None:
        for address, cached in list(self._sockets.items()):
            if cached is sock:
                del self._sockets[address]
        sock.close(linger=0)
