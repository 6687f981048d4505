"""Prefill side of the KV transfer: ``KVSender`` (sockets, one thread) and ``SendHandle``.

The prefill-side blocks (``local_block_ids``) stay the prefill worker's: they are only read
inside ``send_layer``, which copies one layer into a send buffer owned by the ``SendHandle``, so
the prefill worker may free them once ``send_layer`` of the last layer has returned.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from disagg.kernels.kv_pack import pack_kv
from disagg.shared.log import get_logger
from disagg.shared.transfer.descriptor import TransferDescriptor, check_cache_layout
from disagg.shared.transfer.wire import (
    DEFAULT_MAX_CHUNK_BYTES,
    IDLE_POLL_S,
    MAX_TOKEN_ID,
    SCALE_BYTES,
    WIRE_DTYPES,
    DoneHeader,
    LayerHeader,
    TransferError,
    same_secret,
)

_SNDTIMEO_MS = 100  # a blocked send wakes this often to check close() and its time limit

_log = get_logger(__name__)


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
    def finished(self) -> bool:
        """True once the done frame was handed to ZeroMQ or the transfer failed."""
        return self._done.is_set()

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
        if type(first_token) is not int or not 0 <= first_token <= MAX_TOKEN_ID:
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
                scales_nbytes=None if scales is None else scales.numel() * SCALE_BYTES,
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
        count mismatch, or a cache whose layout or block size does not match the descriptor.
        """
        if self._stop.is_set():
            raise TransferError("sender is closed")
        if not same_secret(desc.model_fingerprint, self.fingerprint):
            raise TransferError(
                f"model fingerprint mismatch: decode serves {desc.model_fingerprint}, "
                f"this prefill worker serves {self.fingerprint}"
            )
        ids = torch.as_tensor(local_block_ids, dtype=torch.int64).to(kv_cache.device).flatten()
        if ids.numel() != len(desc.block_ids):
            raise TransferError(
                f"{ids.numel()} local blocks for {len(desc.block_ids)} destination blocks"
            )
        check_cache_layout(kv_cache, desc, "local")
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
                    item = self._queue.get(timeout=IDLE_POLL_S)
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
