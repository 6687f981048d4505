"""What one forward pass computes: a flat run of tokens from many sequences over the paged cache.

Prefill chunks come first, decode tokens (one per sequence) after them. Every token's K/V is written
to its cache slot (`slot_mapping`) before attention reads the cache, so a chunk attends to the
earlier chunks of its own sequence through the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefillSegment:
    """One sequence's prefill chunk inside the flat token run."""

    start: int  # index of the chunk's first token in the flat run
    length: int  # tokens in this chunk
    context_len: int  # tokens in the cache for this sequence once this chunk is written
    block_table: torch.Tensor  # int64 [blocks covering context_len]

    @property
    def is_whole_prompt(self) -> bool:
        """True when nothing of this sequence was cached before (plain causal attention)."""
        return self.context_len == self.length


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # int64 [tokens]
    positions: torch.Tensor  # int64 [tokens]
    slot_mapping: torch.Tensor  # int64 [tokens]: block * block_size + offset
    prefills: tuple[PrefillSegment, ...]
    num_prefill_tokens: int
    decode_block_tables: torch.Tensor | None  # int32 [decodes, max_blocks]
    decode_context_lens: torch.Tensor | None  # int32 [decodes]
    logits_indices: torch.Tensor  # int64 [outputs]: flat positions whose logits are needed

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_decodes(self) -> int:
        return 0 if self.decode_context_lens is None else int(self.decode_context_lens.shape[0])

    @classmethod
    def build(
        cls,
        prefills: list[tuple[list[int], int, list[int]]],
        decodes: list[tuple[int, int, list[int]]],
        block_size: int,
        logits_for_prefill: list[bool],
        device: torch.device | str = "cpu",
        all_logits: list[bool] | None = None,
    ) -> ForwardBatch:
        """Lay out a step.

        prefills: (chunk token ids, position of the chunk's first token, block table) per sequence.
        decodes: (token id, its position, block table) per sequence.
        logits_for_prefill: whether each prefill chunk ends its prompt (its last token is sampled).
        all_logits: whether a chunk wants the logits of every token (prompt logprobs).
        """
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        segments: list[PrefillSegment] = []
        logits_at: list[int] = []
        every = all_logits or [False] * len(prefills)
        for (chunk, start_pos, table), wants_logits, wants_all in zip(
            prefills, logits_for_prefill, every, strict=True
        ):
            end_pos = start_pos + len(chunk)
            used_blocks = -(-end_pos // block_size)
            segments.append(
                PrefillSegment(
                    start=len(ids),
                    length=len(chunk),
                    context_len=end_pos,
                    block_table=torch.tensor(table[:used_blocks], dtype=torch.int64, device=device),
                )
            )
            ids.extend(chunk)
            positions.extend(range(start_pos, end_pos))
            slots.extend(slots_for_positions(table, start_pos, end_pos, block_size))
            if wants_all:
                logits_at.extend(range(len(ids) - len(chunk), len(ids)))
            elif wants_logits:
                logits_at.append(len(ids) - 1)
        num_prefill = len(ids)
        for token, pos, _ in decodes:
            ids.append(token)
            positions.append(pos)
            logits_at.append(len(ids) - 1)
        slots.extend(
            slots_for_positions(table, pos, pos + 1, block_size)[0] for _, pos, table in decodes
        )
        tables, lens = _decode_tables(decodes, device)
        as_long = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
        return cls(
            input_ids=as_long(ids),
            positions=as_long(positions),
            slot_mapping=as_long(slots),
            prefills=tuple(segments),
            num_prefill_tokens=num_prefill,
            decode_block_tables=tables,
            decode_context_lens=lens,
            logits_indices=as_long(logits_at),
        )


def slots_for_positions(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Slot index (block * block_size + offset) of each token position in [start, end)."""
    if not 0 <= start <= end <= len(table) * block_size:
        raise ValueError(
            f"positions [{start}, {end}) outside the {len(table) * block_size} slots of a "
            f"{len(table)}-block table"
        )
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def _decode_tables(
    decodes: list[tuple[int, int, list[int]]], device: torch.device | str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not decodes:
        return None, None
    width = max(len(table) for _, _, table in decodes)
    rows = [table + [0] * (width - len(table)) for _, _, table in decodes]
    tables = torch.tensor(rows, dtype=torch.int32, device=device)
    lens = torch.tensor([pos + 1 for _, pos, _ in decodes], dtype=torch.int32, device=device)
    return tables, lens
