"""Block key -> the replicas holding it, as one int bitmask per key, and the walk that reads it.

    masks[key] = OR of the bits of the replicas that hold the block `key`

Both prefix indexes keep one such table for the whole fleet: the events index
(`gpufleet.router.kvevents.index.KvIndex`: blocks the engines reported, or a routed request is
expected to store) and the approximate one (`gpufleet.router.prefix.PrefixIndex`, one LRU per
replica sharing a table). A routing decision then asks the table once for all candidates:

    depths(block_keys, bits)[j] = how many leading `block_keys` every bit in bits[j] holds

Cost. The walk looks each key up once, in C (`map` of the dict's `get` over a slice of the
keys), and runs Python code only where the candidates still matching can change: the
candidates matching after key i are the AND of the masks up to i, so only the first occurrence
of each distinct mask can change them (`groupby` and `dict.fromkeys` list those in order, in C,
and `list.index` finds where each is). A prompt whose blocks are held by a handful of replica
sets therefore costs a few tens of nanoseconds per block whatever the number of replicas; one
whose every block has another holder set costs about what a Python loop over the keys would. It reads the keys in
chunks that double (64, 128, ...) and stops after the chunk where no candidate matches any
more, so a short match costs little on a long prompt.

Masks are interned: every key held by the same replicas points at one int object. That keeps a
mask's 28-36 bytes off each key (a mask of a fleet past 30 replicas is a multi-digit int) and lets
the walk compare masks by identity. The intern table holds the masks in use and is rebuilt from
them when it doubles, so it never holds more than twice the distinct masks in use (+ 1024).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import groupby
from operator import itemgetter

__all__ = ["BitPool", "HolderMasks"]

_FIRST_CHUNK = 64
_MIN_INTERN_LIMIT = 1024
_first = itemgetter(0)


class HolderMasks:
    """Key -> bitmask of the replicas holding it, interned (module docs)."""

    __slots__ = ("_canon", "_limit", "masks")

    def __init__(self) -> None:
        self.masks: dict[int, int] = {}
        self._canon: dict[int, int] = {}
        self._limit = _MIN_INTERN_LIMIT

    def __len__(self) -> int:
        return len(self.masks)

    def get(self, key: int) -> int:
        """The mask of `key` (0: nobody holds it)."""
        return self.masks.get(key, 0)

    def _intern(self, mask: int) -> int:
        self._room(1)
        return self._canon.setdefault(mask, mask)

    def _room(self, n: int) -> None:
        """Make room for `n` more interned masks: past the limit, forget those nobody holds."""
        canon = self._canon
        if len(canon) + n > self._limit:
            # Every value in `masks` is an interned object already: rebuilding from them keeps
            # those objects and forgets the masks nobody holds any more.
            canon.clear()
            for m in self.masks.values():
                canon[m] = m
            self._limit = max(_MIN_INTERN_LIMIT, 2 * (len(canon) + n))

    def add(self, key: int, bit: int) -> None:
        """Mark `key` held by the replica(s) of `bit`."""
        masks = self.masks
        m = masks.get(key, 0) | bit
        masks[key] = self._canon.get(m) or self._intern(m)

    def add_all(self, keys: Iterable[int], bit: int) -> None:
        """`add` for every key of `keys`."""
        masks, canon, intern = self.masks, self._canon, self._intern
        get = masks.get
        for k in keys:
            old = get(k, 0)
            if not old & bit:
                m = old | bit
                masks[k] = canon.get(m) or intern(m)

    def drop(self, key: int, bit: int) -> None:
        """The replica(s) of `bit` no longer hold `key` (nothing if they did not)."""
        masks = self.masks
        old = masks.get(key)
        if old is None or not old & bit:
            return
        m = old & ~bit
        if m:
            masks[key] = self._canon.get(m) or self._intern(m)
        else:
            del masks[key]

    def drop_all(self, keys: Iterable[int], bit: int) -> None:
        """`drop` for every key of `keys`."""
        for k in keys:
            self.drop(k, bit)

    def depths(self, block_keys: Sequence[int], bits: Sequence[int]) -> list[int]:
        """Per entry of `bits` (one replica's bit each, or 0), how many leading `block_keys` it holds."""
        alive = 0
        for b in bits:
            alive |= b
        n = len(block_keys)
        if not alive or not n:
            return [0] * len(bits)
        get = self.masks.get
        drops: dict[int, int] = {}  # the bits that stopped matching -> where they stopped
        start, step = 0, _FIRST_CHUNK
        while start < n:
            end = min(n, start + step)
            chunk = list(map(get, block_keys[start:end]))
            at = 0
            # The distinct masks in order of first occurrence; runs of one mask are one object
            # (interned), which groupby skips by identity.
            for m in dict.fromkeys(map(_first, groupby(chunk))):
                h = m & alive if m is not None else 0
                if h != alive:
                    at = chunk.index(m, at)
                    drops[alive ^ h] = start + at
                    alive = h
                    if not alive:
                        break
            if not alive:
                break
            start, step = end, step * 2
        depth_of: dict[int, int] = {}
        for mask, d in drops.items():
            while mask:
                low = mask & -mask
                depth_of[low] = d
                mask ^= low
        return [n if b & alive else depth_of.get(b, 0) for b in bits]


class BitPool:
    """One bit per replica, a freed bit reused first (so masks stay as narrow as the fleet)."""

    __slots__ = ("_free", "_next")

    def __init__(self) -> None:
        self._free: list[int] = []
        self._next = 0

    def take(self) -> int:
        if self._free:
            return self._free.pop()
        self._next += 1
        return 1 << (self._next - 1)

    def give_back(self, bit: int) -> None:
        self._free.append(bit)
