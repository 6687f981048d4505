"""The ZeroMQ shells of the KV transfer: ``KVSender`` (PUSH sockets, one thread) drives a
``SenderCore``; ``KVReceiver`` (a PULL socket, one thread) feeds a ``ReceiverCore``.

Payload frames go zero-copy: ZeroMQ reads the send buffers in place, and a buffer is reused only
after its tracker says ZeroMQ let go of it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import zmq

from disagg.shared.log import get_logger
from disagg.shared.protocol.descriptor import TransferDescriptor
from disagg.shared.protocol.kv_wire import TransferError
from disagg.shared.transfer.receiver import ReceiverCore
from disagg.shared.transfer.sender import DEFAULT_MAX_CHUNK_BYTES, Outgoing, SenderCore, SendHandle

IDLE_POLL_S = 0.05  # how often the sender and receiver threads check for close()
_SNDTIMEO_MS = 100  # a blocked send wakes this often to check close() and its time limit

_log = get_logger(__name__)


class _Tracked:
    """ZeroMQ's trackers of the zero-copy frames of one item, as a ``Release``."""

    def __init__(self, trackers: list[zmq.MessageTracker]) -> None:
        self._tracker = zmq.MessageTracker(*trackers)

    def wait(self, timeout: float) -> bool:
        try:
            self._tracker.wait(timeout)
        except zmq.NotDone:
            return False
        return True


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
        if queue_size < 1 or max_destinations < 1:
            raise ValueError("queue_size and max_destinations must be >= 1")
        self.core = SenderCore(
            fingerprint, self, max_chunk_bytes=max_chunk_bytes, pool_size=pool_size
        )
        self._sndhwm = sndhwm
        self._linger_ms = int(linger_s * 1000)
        self._send_timeout_s = send_timeout_s
        self._max_destinations = max_destinations
        self._ctx = zmq.Context()
        self._queue: queue.Queue[Outgoing] = queue.Queue(maxsize=queue_size)
        self._sockets: OrderedDict[str, zmq.Socket] = OrderedDict()  # sender thread only
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kv-sender", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def begin(
        self,
        desc: TransferDescriptor,
        local_block_ids: Sequence[int] | torch.Tensor,
        kv_cache: torch.Tensor,
    ) -> SendHandle:
        """See ``SenderCore.begin``."""
        return self.core.begin(desc, local_block_ids, kv_cache)

    def enqueue(self, item: Outgoing, deadline: float) -> None:
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
                    item.abandoned(f"internal error: {exc!r}")
        finally:
            for sock in self._sockets.values():
                sock.close(linger=self._linger_ms)
            self._sockets.clear()

    def _abandon_queued(self, reason: str) -> None:
        while True:
            try:
                self._queue.get_nowait().abandoned(reason)
            except queue.Empty:
                return

    def _deliver(self, item: Outgoing) -> None:
        handle = item.handle
        trackers: list[zmq.MessageTracker] = []
        try:
            if handle.error is None:
                sock = self._socket_for(handle.desc.address)
                limit = min(handle.deadline, time.monotonic() + self._send_timeout_s)
                for parts in item.messages:
                    self._send_message(sock, parts, limit, trackers)
        except (TransferError, zmq.ZMQError) as exc:
            # Even a failed item keeps the trackers of what ZeroMQ did take.
            item.abandoned(f"sending to {handle.desc.address}: {exc}", _Tracked(trackers))
            return
        if handle.error is None:
            item.delivered(time.perf_counter(), _Tracked(trackers))
        else:
            item.abandoned(handle.error, _Tracked(trackers))

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


class KVReceiver:
    """Decode side: a PULL socket bound on ``host`` and one thread feeding ``self.core``.

    The worker's decode core uses ``core`` directly (see ``ReceiverCore`` for block
    ownership); the delegates below serve tests and tools. Frames larger than
    ``max_frame_bytes`` make ZeroMQ drop the peer's connection, so a sender's
    ``max_chunk_bytes`` must stay below it.
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
        self.core = ReceiverCore(self.address, max_transfers=max_transfers)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-receiver", daemon=True)
        self._thread.start()
        _log.info("kv_receiver_listening", address=self.address)

    def __getattr__(self, name: str) -> Any:
        # expect / cancel / expire / poll_completed / dropped / num_pending: the core's.
        if name.startswith("_") or name == "core":
            raise AttributeError(name)
        return getattr(self.core, name)

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
        poll_ms = int(IDLE_POLL_S * 1000)
        while not self._stop.is_set():
            try:
                if not self._sock.poll(poll_ms, zmq.POLLIN):
                    continue
                parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                _log.error("kv_receiver_socket_error", error=str(exc))
                self._stop.wait(IDLE_POLL_S)
                continue
            self.core.handle_message(parts)
