"""An in-memory KV link: a ``SenderCore`` whose frames go straight into a ``ReceiverCore``.

The same frames, checks and writes as over ZeroMQ, without sockets or threads: the worker
cores' tests and the benchmarks that measure compute run prefill and decode in one process
through it. Delivery is synchronous: ``send_layer`` returns once the receiver has written the
layer, so a send buffer is free again at once.
"""

from __future__ import annotations

import time

from disagg.shared.transfer.receiver import ReceiverCore
from disagg.shared.transfer.sender import DEFAULT_MAX_CHUNK_BYTES, Outgoing, SenderCore


class Loopback:
    """``sender`` (prefill side) and ``receiver`` (decode side) joined in memory."""

    closed = False

    def __init__(
        self,
        fingerprint: str,
        *,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_transfers: int = 1024,
    ) -> None:
        self.receiver = ReceiverCore("inproc://loopback", max_transfers=max_transfers)
        self.sender = SenderCore(fingerprint, self, max_chunk_bytes=max_chunk_bytes)

    def enqueue(self, item: Outgoing, deadline: float) -> None:
        """Deliver every message of ``item`` now (the ``Link`` of ``sender``)."""
        for parts in item.messages:
            self.receiver.handle_message(parts)
        item.delivered(time.perf_counter())
