"""What both ends of a KV transfer check of a cache: dtypes and layout against a descriptor."""

from __future__ import annotations

import torch

from disagg.shared.protocol.descriptor import TransferDescriptor
from disagg.shared.protocol.kv_wire import TransferError

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
}
CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
