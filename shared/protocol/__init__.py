"""The wire contracts, declared once: every NATS message, every subject name and every ZeroMQ
KV frame header, as typed msgspec structs whose bounds are checked on decode.

- ``types``: field types with their bounds, ids, roles, ``MessageError``.
- ``codec``: the ``Message`` base, ``encode``/``decode``/``decode_reply``, error replies.
- ``sampling``: ``SamplingParams``, the sampling part of a request.
- ``descriptor``: ``TransferDescriptor`` and the model fingerprint.
- ``messages``: the NATS messages (heartbeats, placement, admit, prefill job, stream chunks).
- ``subjects``: every NATS subject name.
- ``kv_wire``: the ZeroMQ frame headers of a KV transfer and their strict parsing.

Nothing here touches a socket, torch or asyncio.
"""
