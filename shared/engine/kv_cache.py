"""The paged KV tensor [layers, 2, blocks, block_size, kv_heads, head_dim] and its sizing."""

from __future__ import annotations

import torch


def kv_bytes_per_block(
    num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one block takes across all layers, K and V."""
    _check_positive(
        num_layers=num_layers, block_size=block_size, kv_heads=kv_heads, head_dim=head_dim
    )
    return num_layers * 2 * block_size * kv_heads * head_dim * dtype.itemsize


def num_blocks_for_budget(
    budget_bytes: int,
    num_layers: int,
    block_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> int:
    """How many whole blocks fit in ``budget_bytes``; ValueError if not even one does."""
    per_block = kv_bytes_per_block(num_layers, block_size, kv_heads, head_dim, dtype)
    num_blocks = budget_bytes // per_block
    if num_blocks < 1:
        raise ValueError(
            f"KV budget of {budget_bytes} bytes holds no block: one block of {block_size} tokens "
            f"takes {per_block} bytes ({num_layers} layers, {kv_heads} kv heads, "
            f"head_dim {head_dim}, {dtype})"
        )
    return num_blocks


class KVCache:
    """Owns the paged KV tensor [layers, 2, num_blocks, block_size, kv_heads, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        """Allocate the zeroed KV tensor; dimension 1 is 0 for K, 1 for V."""
        _check_positive(
            num_layers=num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            kv_heads=kv_heads,
            head_dim=head_dim,
        )
        shape = (num_layers, 2, num_blocks, block_size, kv_heads, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, i: int) -> torch.Tensor:
        """View of layer ``i``: [2, num_blocks, block_size, kv_heads, head_dim]."""
        return self.data[i]

    @property
    def num_layers(self) -> int:
        """Number of transformer layers."""
        return self.data.shape[0]

    @property
    def num_blocks(self) -> int:
        """Number of blocks per layer."""
        return self.data.shape[2]

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self.data.shape[3]

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads."""
        return self.data.shape[4]

    @property
    def head_dim(self) -> int:
        """Size of one head."""
        return self.data.shape[5]

    @property
    def dtype(self) -> torch.dtype:
        """Element type of the cache."""
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        """Device holding the cache."""
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Total bytes of the KV tensor."""
        return self.data.numel() * self.data.element_size()


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
