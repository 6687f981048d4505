"""The transfer descriptor (the control-plane message NATS carries) and the model fingerprint."""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any

import torch

from disagg.shared.transfer.wire import (
    MAX_BLOCKS,
    MAX_DIM,
    MAX_FINGERPRINT_LEN,
    MAX_ID_LEN,
    MAX_LAYERS,
    WIRE_DTYPES,
    TransferError,
)

_ADDRESS_SCHEMES = ("tcp://", "ipc://")


def _check_str(name: str, value: Any, max_len: int = MAX_ID_LEN) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        raise ValueError(f"{name} must be a non-empty string of at most {max_len} chars")


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r:.60}")


@dataclass(frozen=True)
class TransferDescriptor:
    """What the decode worker hands out so one prefill worker may fill its reserved blocks.

    ``block_ids`` are the decode worker's reserved blocks in sequence order; it owns them (see
    ``disagg.shared.transfer.receiver``). ``first_block`` is the sequence index of
    ``block_ids[0]``: the decode worker already holds the blocks before it (a prefix-cache hit),
    so only the prompt's blocks from ``first_block`` on are shipped. ``block_size`` is tokens
    per block, which the caches of both sides must share. ``deadline_s`` counts from the
    receiver's ``expect``.
    """

    transfer_id: str
    token: str
    address: str
    block_ids: tuple[int, ...]
    block_size: int
    num_layers: int
    wire_dtype: str
    model_fingerprint: str
    deadline_s: float
    first_block: int = 0

    def __post_init__(self) -> None:
        _check_str("transfer_id", self.transfer_id)
        _check_str("token", self.token)
        _check_str("address", self.address, 256)
        if not self.address.startswith(_ADDRESS_SCHEMES):
            raise ValueError(f"address must start with one of {_ADDRESS_SCHEMES}")
        if not isinstance(self.block_ids, (tuple, list)) or not 0 < len(self.block_ids) <= (
            MAX_BLOCKS
        ):
            raise ValueError(f"block_ids must be a list of 1..{MAX_BLOCKS} block ids")
        for block_id in self.block_ids:
            _check_int("block id", block_id, 0, MAX_DIM - 1)
        object.__setattr__(self, "block_ids", tuple(self.block_ids))
        _check_int("block_size", self.block_size, 1, MAX_DIM)
        _check_int("num_layers", self.num_layers, 1, MAX_LAYERS)
        if not isinstance(self.wire_dtype, str) or self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}")
        _check_str("model_fingerprint", self.model_fingerprint, MAX_FINGERPRINT_LEN)
        deadline = self.deadline_s
        if type(deadline) not in (int, float) or not (math.isfinite(deadline) and deadline > 0):
            raise ValueError(f"deadline_s must be a positive finite number, got {deadline!r:.60}")
        object.__setattr__(self, "deadline_s", float(deadline))
        _check_int("first_block", self.first_block, 0, MAX_BLOCKS)

    @classmethod
    def new(
        cls,
        *,
        address: str,
        block_ids: Sequence[int],
        block_size: int,
        num_layers: int,
        wire_dtype: str,
        model_fingerprint: str,
        deadline_s: float,
        first_block: int = 0,
    ) -> TransferDescriptor:
        """A descriptor with a fresh random transfer id and one-time token."""
        return cls(
            transfer_id=uuid.uuid4().hex,
            token=secrets.token_hex(16),
            address=address,
            block_ids=tuple(block_ids),
            block_size=block_size,
            num_layers=num_layers,
            wire_dtype=wire_dtype,
            model_fingerprint=model_fingerprint,
            deadline_s=deadline_s,
            first_block=first_block,
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
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing, unexpected = required - data.keys(), data.keys() - names
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


def check_cache_layout(kv_cache: torch.Tensor, desc: TransferDescriptor, side: str) -> None:
    """Raise ``TransferError`` unless ``kv_cache`` is [num_layers, 2, blocks, block_size, ...].

    ``side`` names whose cache it is ("local", "receiver") in the message.
    """
    shape = tuple(kv_cache.shape)
    if kv_cache.dim() != 6 or shape[0] != desc.num_layers or shape[1] != 2:
        raise TransferError(f"cache shape {shape} is not [{desc.num_layers}, 2, blocks, ...]")
    if shape[3] != desc.block_size:
        raise TransferError(
            f"block size mismatch: {side} cache has {shape[3]} tokens per block, "
            f"descriptor says {desc.block_size}"
        )
