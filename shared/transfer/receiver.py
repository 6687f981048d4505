"""Decode side of the KV transfer, with no sockets: ``ReceiverCore`` validates and applies frames
(``sockets.KVReceiver`` feeds it from a PULL socket, ``loopback.Loopback`` from memory).

Ownership of the decode-side blocks (the ids in ``TransferDescriptor.block_ids``):

- the decode worker reserves them before the descriptor exists and owns them throughout;
- between ``ReceiverCore.expect`` and the transfer's end the receiver only *writes* into them;
- the transfer ends exactly once: completed or failed (a ``TransferResult`` from
  ``poll_completed``), expired (an id returned by ``expire``) or cancelled (``cancel``). After
  that the receiver never touches the blocks again and the decode worker adopts them (completed)
  or frees them (every other end). The receiver never frees a block.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from disagg.kernels.kv_pack import unpack_kv
from disagg.shared.log import get_logger
from disagg.shared.protocol.descriptor import TransferDescriptor
from disagg.shared.protocol.kv_wire import (
    SCALE_BYTES,
    DoneHeader,
    FrameError,
    LayerHeader,
    TransferError,
    byte_view,
    check_payloads,
    parse_header,
    read_identity,
    same_secret,
)
from disagg.shared.protocol.sampling import Logprob
from disagg.shared.transfer.layout import CACHE_DTYPES, WIRE_DTYPES, check_cache_layout

_RECENT_IDS = 4096  # finished ids remembered so late frames count as closed, not unknown

_log = get_logger(__name__)


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
    first_logprob: Logprob | None = None


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
        scales = 2 * header.nblocks * block_size * kv_heads * SCALE_BYTES
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
        if not same_secret(header.fingerprint, self.desc.model_fingerprint):
            raise FrameError("bad_fingerprint", f"sender model {header.fingerprint!r}")


class ReceiverCore:
    """Receiving-side bookkeeping: registered transfers, frame validation, writes, results.

    No sockets: ``KVReceiver`` feeds it from its thread, tests feed it directly. Thread-safe;
    one lock covers registration and every write, so once ``cancel``/``expire`` return, no
    write into that transfer's blocks is in progress or will ever start.
    """

    def __init__(self, address: str = "inproc://kv", *, max_transfers: int = 1024) -> None:
        """``address`` is what descriptors carry (where senders reach this receiver);
        ``max_transfers`` bounds registered transfers plus unpolled results together."""
        if max_transfers < 1:
            raise ValueError(f"max_transfers must be >= 1, got {max_transfers}")
        self.address = address
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
        cancel) the receiver may write into them. Raises ``TransferError`` when refused (a
        cache whose layout or block size does not match ``desc``, a known id, or no room).
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
            tid, tok = read_identity(parts[0])
        except FrameError as err:
            self._drop(None, err)
            return
        with self._lock:
            inbound = self._inbound.get(tid)
            if inbound is None:
                reason = "closed_transfer" if tid in self._recent else "unknown_transfer"
                self._drop_locked(tid, FrameError(reason, "no such registered transfer"))
            elif not same_secret(tok, inbound.desc.token):
                # A foreign sender must not be able to fail someone else's transfer: drop only.
                self._drop_locked(tid, FrameError("bad_token", "token mismatch"))
            else:
                self._apply_locked(inbound, parts[0], parts[1:])

    def _apply_locked(self, inbound: _Inbound, raw: Any, parts: Sequence[Any]) -> None:
        try:
            header = parse_header(raw)
            payloads = [byte_view(p, "bad_payload") for p in parts]
            check_payloads(header, payloads)
            if isinstance(header, DoneHeader):
                inbound.check_done(header)
                self._finish_locked(inbound, header.first_token, None, header.first_logprob)
            else:
                inbound.check_layer(header)
                inbound.write(header, payloads)
        except FrameError as err:
            self._drop_locked(inbound.desc.transfer_id, err)
            self._finish_locked(inbound, None, str(err))
        except Exception as exc:  # a failed write must fail the transfer, not the thread
            self._drop_locked(inbound.desc.transfer_id, FrameError("write_error", repr(exc)))
            self._finish_locked(inbound, None, f"write_error: {exc!r}")

    def _finish_locked(
        self,
        inbound: _Inbound,
        first_token: int | None,
        error: str | None,
        first_logprob: Logprob | None = None,
    ) -> None:
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
            first_logprob=first_logprob,
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
    check_cache_layout(kv_cache, desc, "receiver")
    shape = tuple(kv_cache.shape)
    if kv_cache.dtype not in CACHE_DTYPES:
        raise TransferError(f"cache dtype {kv_cache.dtype} is not float32/bfloat16/float16")
    if max(desc.block_ids) >= shape[2]:
        raise TransferError(f"block id {max(desc.block_ids)} >= {shape[2]} cache blocks")
    if len(set(desc.block_ids)) != len(desc.block_ids):
        raise TransferError("descriptor lists a block id twice")
