"""The prefix cache: a paged KV block pool with hashed (shareable) blocks, reference counts and LRU eviction."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["PrefixCache"]


class PrefixCache:
    """A paged KV block pool with hashed (shareable) blocks, reference counts and LRU eviction.

    Invariant: `used_blocks <= num_blocks` always; a block with references is never evicted.
    """

    __slots__ = ("_private", "_ref", "_lru", "evicted", "log", "num_blocks")

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self._ref: dict[int, int] = {}  # hashed block -> users
        self._lru: OrderedDict[int, None] = OrderedDict()  # hashed blocks with no user, oldest first
        self._private = 0  # blocks held by requests and not (yet) shareable
        self.evicted = 0
        self.log: list[tuple[str, int, str, int]] | None = None
        """When a list: ("removed", hash, "", -1) is appended per evicted block (KV events)."""

    @property
    def used_blocks(self) -> int:
        """Blocks allocated: cached (pinned or not) plus private."""
        return len(self._ref) + self._private

    @property
    def pinned_blocks(self) -> int:
        """Blocks in use by requests (vLLM's `kv_cache_usage_perc` numerator)."""
        return len(self._ref) - len(self._lru) + self._private

    @property
    def cached_blocks(self) -> int:
        """Hashed blocks held, pinned or evictable."""
        return len(self._ref)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._ref

    def lru_order(self) -> list[int]:
        """Evictable blocks, next to be evicted first."""
        return list(self._lru)

    def match(self, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` that are cached."""
        n = 0
        for h in hashes:
            if h not in self._ref:
                break
            n += 1
        return n

    def can_allocate(self, hit: Sequence[int], new_blocks: int) -> bool:
        """Whether pinning `hit` and allocating `new_blocks` fresh blocks fits now."""
        evictable = len(self._lru) - sum(1 for h in hit if h in self._lru)
        return new_blocks <= self.num_blocks - self.used_blocks + evictable

    def acquire(self, hit: Sequence[int], new_blocks: int) -> None:
        """Pin the cached blocks `hit` and allocate `new_blocks` private blocks, evicting LRU ones."""
        if not self.can_allocate(hit, new_blocks):
            raise RuntimeError("acquire without room: call can_allocate first")
        for h in hit:
            self._pin(h)
        self._make_room(new_blocks)
        self._private += new_blocks

    def register(self, block_hash: int) -> bool:
        """Turn one private block of a request into the shareable cached block `block_hash`.

        Returns False (block stays private) when another request already cached that hash.
        """
        if block_hash in self._ref:
            return False
        if self._private < 1:
            raise RuntimeError("register without a private block")
        self._private -= 1
        self._ref[block_hash] = 1
        return True

    def release(self, pinned: Sequence[int], private: int) -> None:
        """Drop a request's references; its cached blocks become evictable, tail first."""
        for h in reversed(pinned):
            n = self._ref[h] - 1
            self._ref[h] = n
            if n == 0:
                self._lru[h] = None
        self._private -= private
        if self._private < 0:
            raise RuntimeError("released more private blocks than held")

    def _pin(self, h: int) -> None:
        if self._ref[h] == 0:
            del self._lru[h]
        self._ref[h] += 1

    def _make_room(self, n: int) -> None:
        over = self.used_blocks + n - self.num_blocks
        for _ in range(max(0, over)):
            h, _ = self._lru.popitem(last=False)
            del self._ref[h]
            self.evicted += 1
            if self.log is not None:
                self.log.append(("removed", h, "", -1))
