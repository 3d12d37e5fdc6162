"""The prefix cache: a paged KV block pool with hashed (shareable) blocks, reference counts and LRU eviction."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["PrefixCache", "TierCache"]


class TierCache:
    """A KV tier below the GPU (CPU memory, local disk): an LRU of block hashes of bounded size.

    Blocks the GPU evicts are `put` here; what this tier evicts goes to `lower` (disk below CPU)
    or is gone. A hit is `touch`ed (the block is copied back to the GPU and stays here too, as
    vLLM's CPU offloading and SGLang's write-through host cache keep it).
    """

    __slots__ = ("_lru", "evicted", "log", "lower", "medium", "num_blocks")

    def __init__(self, num_blocks: int, medium: str, lower: TierCache | None = None) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self.medium = medium
        self.lower = lower
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.evicted = 0
        self.log: list[tuple[str, int, str, int]] | None = None
        """When a list: ("stored:<medium>", hash, "", -1) / ("removed:<medium>", hash, "", -1) (KV events)."""

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def put(self, block_hash: int) -> None:
        """Keep a block the tier above evicted (most recently used); spill the oldest when full."""
        if block_hash in self._lru:
            self._lru.move_to_end(block_hash)
            return
        # Room first, then the block: the events never say the tier holds more than it can.
        while len(self._lru) >= self.num_blocks:
            old, _ = self._lru.popitem(last=False)
            self.evicted += 1
            if self.lower is not None:
                self.lower.put(old)
            if self.log is not None:
                self.log.append((f"removed:{self.medium}", old, "", -1))
        self._lru[block_hash] = None
        if self.log is not None:
            self.log.append((f"stored:{self.medium}", block_hash, "", -1))

    def touch(self, block_hash: int) -> None:
        """A hit: the block is the most recently used of the tier."""
        if block_hash in self._lru:
            self._lru.move_to_end(block_hash)


class PrefixCache:
    """A paged KV block pool with hashed (shareable) blocks, reference counts and LRU eviction.

    Invariant: `used_blocks <= num_blocks` always; a block with references is never evicted.
    """

    __slots__ = ("_private", "_ref", "_lru", "evicted", "log", "num_blocks", "spill")

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
        self.spill: TierCache | None = None
        """The tier below (CPU): evicted blocks move there instead of being lost."""

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
            if self.spill is not None:
                # Copied down before the GPU copy goes (its events name it while it is still known).
                self.spill.put(h)
            if self.log is not None:
                self.log.append(("removed", h, "", -1))
