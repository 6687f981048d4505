"""The transfer descriptor (what NATS carries so one prefill worker may fill a decode worker's
reserved blocks) and the model fingerprint both sides must share."""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from disagg.shared.protocol.types import FINITE_MAX, WireDtype

MAX_SECRET_LEN = 128  # transfer ids and tokens
MAX_FINGERPRINT_LEN = 64
MAX_LAYERS = 4096
MAX_BLOCKS = 1 << 20
MAX_DIM = 1 << 31

Secret = Annotated[str, Meta(min_length=1, max_length=MAX_SECRET_LEN)]
Fingerprint = Annotated[str, Meta(min_length=1, max_length=MAX_FINGERPRINT_LEN)]
BlockId = Annotated[int, Meta(ge=0, le=MAX_DIM - 1)]


class TransferDescriptor(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the decode worker hands out so one prefill worker may fill its reserved blocks.

    ``block_ids`` are the decode worker's reserved blocks in sequence order; it owns them (see
    ``disagg.shared.transfer.receiver``). ``first_block`` is the sequence index of
    ``block_ids[0]``: the decode worker already holds the blocks before it (a prefix-cache hit),
    so only the prompt's blocks from ``first_block`` on are shipped. ``block_size`` is tokens
    per block, which the caches of both sides must share. ``deadline_s`` counts from the
    receiver's ``expect``. ``address`` is the receiver's ZeroMQ endpoint (``inproc://`` for the
    in-process loopback).
    """

    transfer_id: Secret
    token: Secret
    address: Annotated[str, Meta(pattern=r"^(tcp|ipc|inproc)://", max_length=256)]
    block_ids: Annotated[tuple[BlockId, ...], Meta(min_length=1, max_length=MAX_BLOCKS)]
    block_size: Annotated[int, Meta(ge=1, le=MAX_DIM)]
    num_layers: Annotated[int, Meta(ge=1, le=MAX_LAYERS)]
    wire_dtype: WireDtype
    model_fingerprint: Fingerprint
    deadline_s: Annotated[float, Meta(gt=0.0, le=FINITE_MAX)]
    first_block: Annotated[int, Meta(ge=0, le=MAX_BLOCKS)] = 0

    @classmethod
    def new(cls, *, block_ids: Sequence[int], **fields: Any) -> TransferDescriptor:
        """A descriptor with a fresh random transfer id and one-time token."""
        return cls(
            transfer_id=uuid.uuid4().hex,
            token=secrets.token_hex(16),
            block_ids=tuple(block_ids),
            **fields,
        )


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
