"""Prefill side of the KV transfer, with no sockets: ``SenderCore`` and its ``SendHandle``s.

A handle packs each layer into a send buffer of its own and hands the frames to a ``Link``
(``sockets.KVSender``'s thread over ZeroMQ, or ``loopback.Loopback`` in memory), which reports
each item back as delivered or abandoned.

The prefill-side blocks (``local_block_ids``) stay the prefill worker's: they are only read
inside ``send_layer``, which copies one layer into a send buffer owned by the handle, so the
prefill worker may free them once ``send_layer`` of the last layer has returned.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from disagg.kernels.kv_pack import pack_kv
from disagg.shared.log import get_logger
from disagg.shared.protocol.descriptor import TransferDescriptor
from disagg.shared.protocol.kv_wire import (
    SCALE_BYTES,
    DoneHeader,
    LayerHeader,
    TransferError,
    same_secret,
)
from disagg.shared.protocol.sampling import Logprob
from disagg.shared.protocol.types import MAX_TOKEN_ID
from disagg.shared.transfer.layout import WIRE_DTYPES, check_cache_layout

DEFAULT_MAX_CHUNK_BYTES = 4 << 20

_log = get_logger(__name__)


class Release(Protocol):
    """How a link tells that it no longer reads a send buffer (ZeroMQ's zero-copy tracker)."""

    def wait(self, timeout: float) -> bool: ...


class Link(Protocol):
    """Where a handle's frames go. It calls ``item.delivered`` or ``item.abandoned`` once."""

    closed: bool

    def enqueue(self, item: Outgoing, deadline: float) -> None: ...


@dataclass
class TransferStats:
    """Timeline of one sent transfer, all ``time.perf_counter()`` values.

    ``layer_called_at[i]``: ``send_layer(i)`` entered (≈ layer i's compute end);
    ``layer_enqueued_at[i]``: it returned (pack copy done, compute resumes);
    ``layer_sent_at[i]``: the link handed layer i's last byte on.
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
    """One layer's send buffer; busy from packing until the link releases its frames."""

    def __init__(self, data: torch.Tensor, scales: torch.Tensor | None) -> None:
        self.data = data  # flat, wire dtype, every chunk of one layer back to back
        self.scales = scales  # flat float32 (int8 wire only)
        self._sent = threading.Event()
        self._sent.set()
        self._release: Release | None = None

    def claim(self, deadline: float) -> None:
        """Wait until the link no longer reads this buffer, then mark it busy."""
        if not self._sent.wait(max(0.0, deadline - time.monotonic())):
            raise TransferError("send buffer was not sent before the deadline")
        release, self._release = self._release, None
        if release is not None and not release.wait(max(0.0, deadline - time.monotonic())):
            raise TransferError("the link did not release a send buffer in time")
        self._sent.clear()

    def release(self, release: Release | None) -> None:
        """The frames were handed on (``release`` tells when their bytes are no longer read)."""
        self._release = release
        self._sent.set()


@dataclass
class Outgoing:
    """One link item: a layer's chunk messages, or the done message (``layer is None``)."""

    handle: SendHandle
    layer: int | None
    messages: list[list[Any]]
    slot: _Slot | None
    nbytes: int
    payload_bytes: int

    def delivered(self, now: float, release: Release | None = None) -> None:
        """Every message was handed on; ``release`` says when the buffers are free again."""
        if self.slot is not None:
            self.slot.release(release)
        self.handle._on_sent(self, now)

    def abandoned(self, reason: str, release: Release | None = None) -> None:
        """The item (and so its transfer) failed; ``release`` covers what was handed on."""
        if self.slot is not None:
            self.slot.release(release)
        self.handle.fail(reason)


def chunk_plan(num_blocks: int, block_bytes: int, max_chunk_bytes: int) -> list[tuple[int, int]]:
    """``(first_block, nblocks)`` per chunk, each at most ``max_chunk_bytes`` (or one block)."""
    per_chunk = max(1, max_chunk_bytes // block_bytes)
    return [
        (first, min(per_chunk, num_blocks - first)) for first in range(0, num_blocks, per_chunk)
    ]


def _wire_view(flat: torch.Tensor) -> Any:
    """Zero-copy buffer of a flat contiguous CPU tensor (uint8 view: numpy has no bfloat16)."""
    return flat.view(torch.uint8).numpy()


class SendHandle:
    """One outgoing transfer. Methods run on the compute thread; the link sends.

    ``send_layer(i)`` for i = 0..L-1 in order, then ``finish(first_token)``, then ``wait``.
    Memory is bounded by ``pool_size`` layer buffers; a buffer is reused only after the link has
    released it, so ``send_layer`` blocks (bounded by the deadline) when the wire falls behind.
    ``chunks`` is how each layer is split: ``(first_block, nblocks)`` per message.
    """

    def __init__(
        self,
        core: SenderCore,
        desc: TransferDescriptor,
        local_block_ids: torch.Tensor,
        kv_cache: torch.Tensor,
    ) -> None:
        self.desc = desc
        self._core = core
        self._local_ids = local_block_ids
        self._kv_cache = kv_cache
        self._geometry = tuple(kv_cache.shape[3:])  # block_size, kv_heads, head_dim
        self._wire_dtype = WIRE_DTYPES[desc.wire_dtype]
        block_bytes = 2 * math.prod(self._geometry) * self._wire_dtype.itemsize
        self.chunks = chunk_plan(len(desc.block_ids), block_bytes, core.max_chunk_bytes)
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
        """True once the done frame was handed on or the transfer failed."""
        return self._done.is_set()

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
            self._core.link.enqueue(self._pack_layer(layer, slot), self.deadline)
        except BaseException as exc:
            slot.release(None)
            self.fail(f"send_layer({layer}): {exc}")
            raise
        self._next_layer += 1
        self.stats.layer_enqueued_at[layer] = time.perf_counter()

    def finish(self, first_token: int, first_logprob: Logprob | None = None) -> None:
        """Queue the done frame carrying the first sampled token (and its logprobs, when the
        request asks: the decode worker reports token 0 too); all layers must be sent."""
        self._check_open()
        if self._next_layer != self.desc.num_layers:
            raise TransferError(f"finish after {self._next_layer}/{self.desc.num_layers} layers")
        if type(first_token) is not int or not 0 <= first_token <= MAX_TOKEN_ID:
            raise TransferError(f"first_token must be a non-negative int, got {first_token!r}")
        self.stats.finish_called_at = time.perf_counter()
        header = DoneHeader(
            transfer_id=self.desc.transfer_id,
            token=self.desc.token,
            first_token=first_token,
            fingerprint=self._core.fingerprint,
            first_logprob=first_logprob,
        ).encode()
        self._finished = True
        try:
            self._core.link.enqueue(
                Outgoing(self, None, [[header]], None, len(header), 0), self.deadline
            )
        except TransferError as exc:
            self.fail(str(exc))
            raise

    def wait(self, timeout: float | None = None) -> TransferStats:
        """Block until the done frame is handed on; raises ``TransferError`` on failure."""
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
        index = layer % self._core.pool_size
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

    def _pack_layer(self, layer: int, slot: _Slot) -> Outgoing:
        messages, nbytes, payload = [], 0, 0
        for chunk, (first, nblocks) in enumerate(self.chunks):
            data, scales = self._pack_chunk(layer, slot, first, nblocks)
            header = LayerHeader(
                transfer_id=self.desc.transfer_id,
                token=self.desc.token,
                layer=layer,
                chunk=chunk,
                nchunks=len(self.chunks),
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
        return Outgoing(self, layer, messages, slot, nbytes, payload)

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

    def _on_sent(self, item: Outgoing, now: float) -> None:
        """The link handed every message of ``item`` on."""
        self.stats.bytes_sent += item.nbytes
        self.stats.payload_bytes += item.payload_bytes
        if item.layer is None:
            self.stats.done_sent_at = now
            self._done.set()
        else:
            self.stats.layer_sent_at[item.layer] = now


class SenderCore:
    """Starts transfers of this worker's model (``fingerprint``) over ``link``."""

    def __init__(
        self,
        fingerprint: str,
        link: Link,
        *,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        pool_size: int = 2,
    ) -> None:
        if max_chunk_bytes < 1 or pool_size < 1:
            raise ValueError("max_chunk_bytes and pool_size must be >= 1")
        self.fingerprint, self.link = fingerprint, link
        self.max_chunk_bytes, self.pool_size = max_chunk_bytes, pool_size

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
        if self.link.closed:
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
