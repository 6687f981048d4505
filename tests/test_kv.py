"""Unit tests of the paged KV cache: block pool, prefix hashes, budget math, KV tensor views."""

from __future__ import annotations

import random

import pytest
import torch

from disagg.shared.engine.block_pool import (
    BlockPool,
    NoFreeBlocksError,
    hash_block_tokens,
    prefix_block_hashes,
)
from disagg.shared.engine.kv_cache import KVCache, kv_bytes_per_block, num_blocks_for_budget
from disagg.shared.model.batch import slots_for_positions

# --- allocation and free ------------------------------------------------------------------------


def test_bad_sizes_raise() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(4, 0)


def test_allocate_is_all_or_nothing() -> None:
    pool = BlockPool(4, 16)
    first = pool.allocate(3)
    assert len(set(first)) == 3 and pool.num_free == 1 and pool.num_used == 3
    assert not pool.can_allocate(2)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.num_free == 1 and pool.num_used == 3
    assert all(pool.refcount(b) == 1 for b in first)
    (last,) = pool.allocate(1)
    assert last not in first
    pool.check_integrity()


def test_allocate_zero_and_negative() -> None:
    pool = BlockPool(2, 4)
    assert pool.allocate(0) == [] and pool.num_free == 2
    with pytest.raises(ValueError):
        pool.allocate(-1)


def test_free_returns_blocks() -> None:
    pool = BlockPool(4, 16)
    blocks = pool.allocate(4)
    pool.free(blocks[:2])
    assert pool.num_free == 2 and pool.num_used == 2
    assert sorted(pool.allocate(2)) == sorted(blocks[:2])
    pool.check_integrity()


def test_double_free_raises_and_leaves_pool_unchanged() -> None:
    pool = BlockPool(4, 16)
    a, b = pool.allocate(2)
    pool.free([a])
    with pytest.raises(ValueError, match="double free"):
        pool.free([b, a])
    assert pool.refcount(b) == 1  # all or nothing: b was not freed either
    with pytest.raises(ValueError, match="double free"):
        pool.free([b, b])
    assert pool.refcount(b) == 1
    pool.check_integrity()


def test_unknown_block_id_raises() -> None:
    pool = BlockPool(4, 16)
    for bad in (4, -1):
        with pytest.raises(ValueError, match="unknown block id"):
            pool.free([bad])
        with pytest.raises(ValueError, match="unknown block id"):
            pool.refcount(bad)


def test_refcount_sharing() -> None:
    pool = BlockPool(4, 16)
    (block,) = pool.allocate(1)
    pool.incref([block])
    assert pool.refcount(block) == 2
    pool.free([block])
    assert pool.refcount(block) == 1 and pool.num_used == 1
    pool.free([block])
    assert pool.refcount(block) == 0 and pool.num_free == 4
    with pytest.raises(ValueError):
        pool.free([block])


def test_incref_of_free_block_raises() -> None:
    pool = BlockPool(4, 16)
    with pytest.raises(ValueError, match="free block"):
        pool.incref([0])
    assert pool.num_free == 4


# --- prefix cache -------------------------------------------------------------------------------


def _held_committed(pool: BlockPool, hashes: list[int]) -> list[int]:
    blocks = pool.allocate(len(hashes))
    for block, block_hash in zip(blocks, hashes, strict=True):
        pool.commit_full_block(block, block_hash)
    return blocks


def test_committed_block_is_cached_at_refcount_zero() -> None:
    pool = BlockPool(4, 16)
    blocks = _held_committed(pool, [11, 22])
    assert pool.lookup_prefix([11, 22]) == blocks  # held blocks are findable too
    pool.free(blocks)
    assert (pool.num_blocks, pool.num_free, pool.num_used, pool.num_cached) == (4, 4, 0, 2)
    assert pool.lookup_prefix([11, 22, 33]) == blocks
    assert pool.refcount(blocks[0]) == 0  # lookup takes no reference
    pool.check_integrity()


def test_incref_revives_cached_block() -> None:
    pool = BlockPool(2, 16)
    (block,) = _held_committed(pool, [7])
    pool.free([block])
    pool.incref(pool.lookup_prefix([7]))
    assert pool.refcount(block) == 1
    assert (pool.num_blocks, pool.num_free, pool.num_used, pool.num_cached) == (2, 1, 1, 0)
    (other,) = pool.allocate(1)  # the revived block must not be handed out again
    assert other != block
    assert not pool.can_allocate(1)
    pool.check_integrity()


def test_eviction_prefers_free_blocks_then_lru_and_drops_hash() -> None:
    pool = BlockPool(4, 16)
    a, b, c = _held_committed(pool, [1, 2, 3])
    pool.free([b])
    pool.free([a, c])  # LRU order now b, a, c
    (plain,) = pool.allocate(1)
    assert plain not in (a, b, c)
    assert pool.lookup_prefix([1]) == [a] and pool.lookup_prefix([2]) == [b]
    assert pool.allocate(1) == [b]
    assert pool.block_hash(b) is None and pool.lookup_prefix([2]) == []
    assert pool.allocate(2) == [a, c]
    assert pool.lookup_prefix([1]) == [] and pool.lookup_prefix([3]) == []
    pool.check_integrity()


def test_revived_and_refreed_block_moves_to_lru_tail() -> None:
    pool = BlockPool(2, 16)
    a, b = _held_committed(pool, [1, 2])
    pool.free([a, b])
    pool.incref([a])
    pool.free([a])  # LRU order now b, a
    assert pool.allocate(1) == [b]


def test_lookup_prefix_stops_at_first_miss() -> None:
    pool = BlockPool(8, 16)
    a, b, _ = _held_committed(pool, [1, 2, 4])
    assert pool.lookup_prefix([1, 2, 3, 4]) == [a, b]
    assert pool.lookup_prefix([9, 1, 2]) == []
    assert pool.lookup_prefix([]) == []


def test_commit_first_writer_wins() -> None:
    pool = BlockPool(4, 16)
    a, b = pool.allocate(2)
    pool.commit_full_block(a, 5)
    pool.commit_full_block(b, 5)
    assert pool.lookup_prefix([5]) == [a] and pool.block_hash(b) is None
    pool.free([b])
    assert pool.num_cached == 0  # the loser was never cached
    pool.commit_full_block(a, 5)  # re-committing the same hash is harmless
    with pytest.raises(ValueError, match="already committed"):
        pool.commit_full_block(a, 6)
    pool.check_integrity()


def test_commit_of_unheld_block_raises() -> None:
    pool = BlockPool(2, 16)
    with pytest.raises(ValueError, match="nobody holds"):
        pool.commit_full_block(0, 1)


def test_check_integrity_catches_corruption() -> None:
    pool = BlockPool(4, 16)
    (block,) = pool.allocate(1)
    pool._free.append(block)  # a block both held and free
    with pytest.raises(AssertionError, match="free"):
        pool.check_integrity()


# --- hashes -------------------------------------------------------------------------------------


def test_hash_is_pinned_across_processes() -> None:
    # Pinned values: a changed encoding would silently split caches across a fleet.
    assert hash_block_tokens(None, [1, 2, 3, 4]) == 1026957209017209168
    assert prefix_block_hashes(list(range(10)), 4, b"llama") == [
        13652715477911493176,
        18118186647855590140,
    ]


def test_hash_chaining() -> None:
    block = [5, 6, 7, 8]
    first = prefix_block_hashes([1, 2, 3, 4] + block, 4)
    second = prefix_block_hashes([9, 2, 3, 4] + block, 4)
    assert first[1] != second[1]  # same tokens under a different prefix
    assert first[1] == hash_block_tokens(first[0], block)
    assert hash_block_tokens(None, block) != hash_block_tokens(0, block)


def test_hash_extra_and_partial_blocks() -> None:
    tokens = list(range(11))
    assert len(prefix_block_hashes(tokens, 4)) == 2
    assert prefix_block_hashes(tokens, 4, b"a") != prefix_block_hashes(tokens, 4, b"b")
    assert prefix_block_hashes(tokens[:3], 4) == []
    assert prefix_block_hashes(tokens[:8], 4) == prefix_block_hashes(tokens, 4)


# --- randomized pool model ----------------------------------------------------------------------


class _PoolFuzzer:
    """Random allocate/incref/free/commit steps, each checked against a refcount model."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.pool = BlockPool(12, 4)
        self.refs: dict[int, int] = {}

    def step(self) -> None:
        op = self.rng.choice([self.allocate, self.free, self.incref, self.commit, self.revive])
        op()
        self.check()

    def allocate(self) -> None:
        n = self.rng.randint(0, 5)
        free = self.pool.num_blocks - len(self.refs)
        if n > free:
            with pytest.raises(NoFreeBlocksError):
                self.pool.allocate(n)
            return
        for block in self.pool.allocate(n):
            assert block not in self.refs, f"allocated held block {block}"
            self.refs[block] = 1

    def free(self) -> None:
        held = [b for b, rc in self.refs.items() for _ in range(rc)]
        chosen = self.rng.sample(held, self.rng.randint(0, len(held)))
        self.pool.free(chosen)
        for block in chosen:
            self._decref(block)

    def incref(self) -> None:
        if self.refs:
            block = self.rng.choice(list(self.refs))
            self.pool.incref([block])
            self.refs[block] += 1

    def commit(self) -> None:
        if self.refs:
            block, block_hash = self.rng.choice(list(self.refs)), self.rng.randrange(8)
            # few hashes, so first-writer-wins collisions happen
            current = self.pool.block_hash(block)
            if current is not None and current != block_hash:
                with pytest.raises(ValueError, match="already committed"):
                    self.pool.commit_full_block(block, block_hash)
                return
            self.pool.commit_full_block(block, block_hash)
            assert len(self.pool.lookup_prefix([block_hash])) == 1

    def revive(self) -> None:
        hit = self.pool.lookup_prefix([self.rng.randrange(8)])
        self.pool.incref(hit)
        for block in hit:
            self.refs[block] = self.refs.get(block, 0) + 1

    def _decref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            del self.refs[block]

    def check(self) -> None:
        self.pool.check_integrity()
        assert self.pool.num_free + self.pool.num_used == self.pool.num_blocks
        assert self.pool.num_used == len(self.refs)
        for block in range(self.pool.num_blocks):
            assert self.pool.refcount(block) == self.refs.get(block, 0)


@pytest.mark.parametrize("seed", range(20))
def test_random_operations_keep_pool_consistent(seed: int) -> None:
    fuzzer = _PoolFuzzer(seed)
    for _ in range(200):
        fuzzer.step()
    fuzzer.pool.free([b for b, rc in fuzzer.refs.items() for _ in range(rc)])
    fuzzer.pool.check_integrity()
    assert fuzzer.pool.num_free == fuzzer.pool.num_blocks and fuzzer.pool.num_used == 0
    assert len(fuzzer.pool.allocate(fuzzer.pool.num_blocks)) == fuzzer.pool.num_blocks


# --- budget math --------------------------------------------------------------------------------


def test_bytes_per_block() -> None:
    # 2 layers * (K, V) * 16 tokens * 4 heads * 8 dims = 2048 elements
    assert kv_bytes_per_block(2, 16, 4, 8, torch.float32) == 2048 * 4
    assert kv_bytes_per_block(2, 16, 4, 8, torch.bfloat16) == 2048 * 2


def test_num_blocks_for_budget_floors() -> None:
    per_block = kv_bytes_per_block(2, 16, 4, 8, torch.bfloat16)
    assert num_blocks_for_budget(10 * per_block, 2, 16, 4, 8, torch.bfloat16) == 10
    assert num_blocks_for_budget(11 * per_block - 1, 2, 16, 4, 8, torch.bfloat16) == 10
    with pytest.raises(ValueError, match="holds no block"):
        num_blocks_for_budget(per_block - 1, 2, 16, 4, 8, torch.bfloat16)


# --- KV tensor ----------------------------------------------------------------------------------


def test_kv_cache_shapes_and_properties() -> None:
    cache = KVCache(3, 5, 4, 2, 8, dtype=torch.bfloat16)
    assert cache.data.shape == (3, 2, 5, 4, 2, 8)
    assert cache.layer(1).shape == (2, 5, 4, 2, 8)
    assert (cache.num_layers, cache.num_blocks, cache.block_size) == (3, 5, 4)
    assert (cache.kv_heads, cache.head_dim, cache.dtype) == (2, 8, torch.bfloat16)
    assert cache.device == torch.device("cpu")
    assert cache.nbytes == 5 * kv_bytes_per_block(3, 4, 2, 8, torch.bfloat16)
    assert not cache.data.any()


def test_kv_cache_views_share_storage() -> None:
    cache = KVCache(2, 3, 4, 2, 8)
    cache.layer(1)[0, 2, 3] = 1.0
    assert cache.data[1, 0, 2, 3].eq(1.0).all()
    k = cache.layer(0)[0].view(-1, 2, 8)  # the slot view the model writes K through
    assert k.shape == (12, 2, 8)
    k.fill_(2.0)
    assert cache.data[0, 0].eq(2.0).all() and not cache.data[0, 1].any()
    assert not cache.data[1, 0, 0].any()


def test_slot_writes_land_in_block_and_offset() -> None:
    cache = KVCache(2, 4, 4, 1, 2)
    table = [3, 1]
    slots = slots_for_positions(table, 2, 6, 4)
    k, v = (part.view(-1, 1, 2) for part in cache.layer(1))
    values = torch.arange(1, 5, dtype=torch.float32).view(4, 1, 1).expand(4, 1, 2)
    k[slots] = values
    v[slots] = -values
    # positions 2, 3 -> block 3 offsets 2, 3; positions 4, 5 -> block 1 offsets 0, 1
    assert cache.data[1, 0, 3, 2:4, 0, 0].tolist() == [1.0, 2.0]
    assert cache.data[1, 0, 1, 0:2, 0, 0].tolist() == [3.0, 4.0]
    assert cache.data[1, 1, 1, 0:2, 0, 1].tolist() == [-3.0, -4.0]
    assert cache.data[1].count_nonzero() == 16 and not cache.data[0].any()


def test_cache_for_budget() -> None:
    per_block = kv_bytes_per_block(2, 4, 2, 8, torch.float32)
    blocks = num_blocks_for_budget(7 * per_block + 5, 2, 4, 2, 8, torch.float32)
    cache = KVCache(2, blocks, 4, 2, 8, torch.float32, "cpu")
    assert cache.num_blocks == 7 and cache.nbytes == 7 * per_block


def test_bad_cache_sizes_raise() -> None:
    with pytest.raises(ValueError, match="kv_heads"):
        KVCache(1, 1, 1, 0, 8)


# --- slots --------------------------------------------------------------------------------------


def test_slots_for_positions_across_blocks() -> None:
    assert slots_for_positions([7, 2, 5], 0, 9, 4) == [28, 29, 30, 31, 8, 9, 10, 11, 20]
    assert slots_for_positions([7, 2, 5], 3, 5, 4) == [31, 8]
    assert slots_for_positions([7], 2, 2, 4) == []


def test_slots_for_positions_out_of_range() -> None:
    with pytest.raises(ValueError, match="outside"):
        slots_for_positions([0, 1], 0, 9, 4)
    with pytest.raises(ValueError):
        slots_for_positions([0, 1], 3, 2, 4)
