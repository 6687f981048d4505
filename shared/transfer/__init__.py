"""ZeroMQ KV-cache transfer: prefill pushes each layer's KV blocks into decode's reserved blocks.

Flow: the decode worker reserves blocks and builds a ``TransferDescriptor`` (NATS carries it to
the prefill worker). The prefill worker calls ``KVSender.begin``, then ``SendHandle.send_layer``
after each layer is computed (the sender thread pushes it while the next layer computes), then
``SendHandle.finish`` with the first sampled token. ``KVReceiver`` (shell: a PULL socket and a
thread) feeds ``ReceiverCore`` (validation, bookkeeping and writes; no sockets).

Modules: ``wire`` (frame format, limits, errors, strict parsing), ``descriptor`` (the
descriptor and the model fingerprint), ``receiver`` (decode side, and who owns the reserved
blocks when), ``sender`` (prefill side, and when its local blocks may be freed).
"""

from disagg.shared.transfer.descriptor import TransferDescriptor, model_fingerprint
from disagg.shared.transfer.receiver import KVReceiver, ReceiverCore, TransferResult
from disagg.shared.transfer.sender import KVSender, SendHandle, TransferStats
from disagg.shared.transfer.wire import (
    DEFAULT_MAX_CHUNK_BYTES,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    DoneHeader,
    FrameError,
    LayerHeader,
    TransferError,
    as_buffer,
    check_payloads,
    header_identity,
    parse_header,
    unpack_header_map,
)

__all__ = [
    "DEFAULT_MAX_CHUNK_BYTES",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "WIRE_DTYPES",
    "DoneHeader",
    "FrameError",
    "KVReceiver",
    "KVSender",
    "LayerHeader",
    "ReceiverCore",
    "SendHandle",
    "TransferDescriptor",
    "TransferError",
    "TransferResult",
    "TransferStats",
    "as_buffer",
    "check_payloads",
    "header_identity",
    "model_fingerprint",
    "parse_header",
    "unpack_header_map",
]
