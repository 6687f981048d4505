"""The block pool of the paged KV cache: ownership, refcounts, prefix hashes. No torch.

Every block of a ``BlockPool`` is in exactly one of three states:

- free:   refcount 0, no hash; allocatable at no cost.
- cached: refcount 0, holds a content hash; findable by ``lookup_prefix`` and revivable by
  ``incref``, but evicted (hash dropped) by ``allocate`` once the free blocks run out,
  least-recently-freed first.
- held:   refcount > 0; may hold a hash (then it is findable too).

The pool is pure Python bookkeeping: it never touches the KV tensor, sockets or devices.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Sequence

_NO_PARENT = b"\x00"
_HAS_PARENT = b"\x01"


class NoFreeBlocksError(RuntimeError):
    """Raised by ``BlockPool.allocate`` when fewer blocks are allocatable than requested."""


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int], extra: bytes = b"") -> int:
    """Content hash of one block, chained on the hash of the block before it.

    Stable across processes and runs (blake2b, never Python's ``hash``). ``parent_hash`` is None
    for the first block; ``extra`` mixes in e.g. a model id so two models never share blocks.
    """
    h = hashlib.blake2b(digest_size=8)
    if parent_hash is None:
        h.update(_NO_PARENT)
    else:
        h.update(_HAS_PARENT + parent_hash.to_bytes(8, "little"))
    # Length prefixes keep (extra, tokens) splits unambiguous.
    h.update(struct.pack("<I", len(extra)) + extra)
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    return int.from_bytes(h.digest(), "little")


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, extra: bytes = b"") -> list[int]:
    """Chained hashes of every full block of ``token_ids``; a trailing partial block is skipped."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size], extra)
        hashes.append(parent)
    return hashes


class BlockPool:
    """Reference-counted pool of KV block ids with a prefix cache of full blocks.

    Ownership: whoever receives ids from ``allocate`` or shares them with ``incref`` holds one
    reference per id and must hand each back exactly once through ``free``.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        """Create a pool of ``num_blocks`` free blocks of ``block_size`` tokens each."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refcount = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest freed first
        self._hash_of: dict[int, int] = {}  # block id -> content hash
        self._block_of: dict[int, int] = {}  # content hash -> block id (inverse of _hash_of)
        self._num_held = 0

    @property
    def num_free(self) -> int:
        """Blocks allocatable now: free blocks plus cached blocks nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Cached blocks nobody holds (allocatable, but evicted to be reused)."""
        return len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks with a refcount above zero."""
        return self._num_held

    def can_allocate(self, n: int) -> bool:
        """Whether ``allocate(n)`` would succeed now."""
        return 0 <= n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks at refcount 1, all or nothing; the caller owns them.

        Free blocks go first; then cached blocks are evicted least-recently-freed first and
        lose their hash. Raises ``NoFreeBlocksError`` (pool unchanged) if fewer than ``n`` fit.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks: {n}")
        if n > self.num_free:
            raise NoFreeBlocksError(
                f"need {n} blocks, {self.num_free} of {self.num_blocks} allocatable"
            )
        block_ids = [self._take_block() for _ in range(n)]
        for block_id in block_ids:
            self._refcount[block_id] = 1
        self._num_held += n
        return block_ids

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per id (an id listed twice drops two); all or nothing.

        A block reaching refcount 0 returns to the pool; one with a hash stays findable as a
        cached block. Blocks join the eviction queue in the order given, so pass a block table
        reversed to have its tail evicted before its more shareable prefix. Raises ValueError
        (pool unchanged) on an unknown id or a reference not held (double free).
        """
        counts = self._count_ids(block_ids)
        for block_id, times in counts.items():
            if self._refcount[block_id] < times:
                raise ValueError(
                    f"double free of block {block_id}: refcount {self._refcount[block_id]}, "
                    f"freed {times} time(s)"
                )
        for block_id, times in counts.items():
            self._refcount[block_id] -= times
            if self._refcount[block_id] == 0:
                self._release(block_id)

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add one reference per id to held or cached blocks (a prefix hit shares them).

        A cached block at refcount 0 is revived: it leaves the eviction queue. Raises ValueError
        (pool unchanged) on an unknown id or a free block, which has no content worth sharing.
        """
        counts = self._count_ids(block_ids)
        for block_id in counts:
            if self._refcount[block_id] == 0 and block_id not in self._evictable:
                raise ValueError(f"incref of free block {block_id}: it holds no cached content")
        for block_id, times in counts.items():
            if self._refcount[block_id] == 0:
                del self._evictable[block_id]
                self._num_held += 1
            self._refcount[block_id] += times

    def refcount(self, block_id: int) -> int:
        """Current reference count of ``block_id``."""
        self._check_id(block_id)
        return self._refcount[block_id]

    def block_hash(self, block_id: int) -> int | None:
        """Content hash recorded for ``block_id``, or None if it has none."""
        self._check_id(block_id)
        return self._hash_of.get(block_id)

    def commit_full_block(self, block_id: int, block_hash: int) -> None:
        """Record that held block ``block_id`` is full with content hash ``block_hash``.

        First writer wins: if another block already has this hash, the mapping is kept and this
        block stays unhashed. Raises ValueError if the block is not held or already has a
        different hash (a full block's content never changes).
        """
        self._check_id(block_id)
        if self._refcount[block_id] == 0:
            raise ValueError(f"commit of block {block_id}, which nobody holds")
        current = self._hash_of.get(block_id)
        if current is not None and current != block_hash:
            raise ValueError(f"block {block_id} already committed with hash {current:#x}")
        if current is None and block_hash not in self._block_of:
            self._hash_of[block_id] = block_hash
            self._block_of[block_hash] = block_id

    def lookup_prefix(self, block_hashes: Sequence[int]) -> list[int]:
        """Block ids of the longest run of leading hashes that are cached (held or evictable).

        Takes no reference: call ``incref`` on the result before the next ``allocate``.
        """
        block_ids: list[int] = []
        for block_hash in block_hashes:
            block_id = self._block_of.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def cached_hashes(self, limit: int) -> list[int]:
        """The hashes of up to ``limit`` cached blocks (held or evictable), newest commits
        first: a bounded summary of what ``lookup_prefix`` would find, for routing."""
        if limit <= 0:
            return []
        newest = reversed(self._block_of)  # dicts keep insertion (commit) order
        return [h for _, h in zip(range(limit), newest)]

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant of the pool's bookkeeping."""
        self._check_refcounts()
        self._check_free_sets()
        self._check_hash_maps()

    def _take_block(self) -> int:
        if self._free:
            return self._free.popleft()
        block_id, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(block_id)]
        return block_id

    def _release(self, block_id: int) -> None:
        self._num_held -= 1
        if block_id in self._hash_of:
            self._evictable[block_id] = None
        else:
            self._free.append(block_id)

    def _count_ids(self, block_ids: Iterable[int]) -> Counter[int]:
        counts = Counter(block_ids)
        for block_id in counts:
            self._check_id(block_id)
        return counts

    def _check_id(self, block_id: int) -> None:
        if not (isinstance(block_id, int) and 0 <= block_id < self.num_blocks):
            raise ValueError(f"unknown block id {block_id!r} (pool has {self.num_blocks})")

    def _check_refcounts(self) -> None:
        assert len(self._refcount) == self.num_blocks, "refcount table has the wrong length"
        negative = [b for b, rc in enumerate(self._refcount) if rc < 0]
        assert not negative, f"negative refcounts on blocks {negative}"
        held = sum(rc > 0 for rc in self._refcount)
        assert held == self._num_held, f"{held} blocks held but num_used says {self._num_held}"

    def _check_free_sets(self) -> None:
        free, cached = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "a block is in the free queue twice"
        assert not free & cached, f"blocks both free and cached: {sorted(free & cached)}"
        unheld = {b for b, rc in enumerate(self._refcount) if rc == 0}
        assert free | cached == unheld, (
            f"free+cached != unheld blocks: held but free {sorted((free | cached) - unheld)}, "
            f"lost {sorted(unheld - (free | cached))}"
        )
        hashed_free = sorted(b for b in free if b in self._hash_of)
        assert not hashed_free, f"free blocks still hashed: {hashed_free}"
        unhashed_cached = sorted(b for b in cached if b not in self._hash_of)
        assert not unhashed_cached, f"cached blocks without a hash: {unhashed_cached}"

    def _check_hash_maps(self) -> None:
        assert len(self._hash_of) == len(self._block_of), (
            f"hash maps differ in size: {len(self._hash_of)} blocks, {len(self._block_of)} hashes"
        )
        for block_id, block_hash in self._hash_of.items():
            assert self._block_of.get(block_hash) == block_id, (
                f"block {block_id} has hash {block_hash:#x} that maps to "
                f"{self._block_of.get(block_hash)}"
            )
