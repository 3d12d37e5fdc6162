"""One index of the blocks every replica holds, fed by the engines' KV events.

    reach[key] = bitmask of the replicas whose GPU holds the block `key` or is expected to

Per replica the index keeps the engine's block hash -> the router's key (so a `BlockRemoved`,
which names only hashes, finds its key) with a reference count per key (an engine may hold two
physical copies of one block), one map per `medium` ("GPU", "CPU", "DISK", ...). `match` walks the
prompt's keys once for all candidates: at each key the replicas still matching are ANDed with
its mask, so the cost is one dict lookup per matched block whatever the number of replicas
(the walk stops when no candidate holds the next block; `gpufleet.router.holders` does it in C
but where the matching set changes). Lower tiers (`held_from`) are read from the one replica's
own map.

Between a routing decision and the events of the prefill it causes there is a lag (queueing,
prefill time, event delivery). `expect` records the blocks a request will store on the replica
it was sent to as *pending* until `pending_ttl_s`; `match` counts them as held. Events replace
the guess with the truth as they arrive, and a removal clears the pending mark too. `reach` is
the union of both (what the walk reads), kept in step with them.

Memory is bounded by the declared KV capacity: a replica's map of one medium never holds more
than `capacity_blocks` entries (past that the oldest entry is dropped and `overflows` counted;
exact events never get there, since the engine cannot hold more than its capacity).

Which replicas are *exact* (their event stream is live) is part of the index (`exact`); the
subscriber (`gpufleet.router.kvevents.subscriber`) and the simulator set it, the prefix scorer
reads it, the watchdog (`silent`) decides when a stream that should have spoken did not.

Pure: no I/O, no clock (`now` is passed in).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpufleet.router.holders import BitPool, HolderMasks
from gpufleet.router.kvevents import keys as keys_mod
from gpufleet.router.kvevents import wire

__all__ = ["IndexCounters", "KvIndex", "ReplicaBlocks"]

GPU = wire.MEDIUM_GPU


@dataclass(slots=True)
class IndexCounters:
    """What the index could not apply, per replica (exported as metrics, shown in the admin view)."""

    stored: int = 0
    removed: int = 0
    cleared: int = 0
    unknown_blocks: int = 0
    """BlockRemoved naming a hash the index never saw stored."""
    unknown_parent: int = 0
    """BlockStored whose parent hash the index does not know: its blocks cannot be keyed."""
    skipped: int = 0
    """BlockStored the router cannot key (block size mismatch, tokens not a whole number of blocks)."""
    overflows: int = 0
    """Entries dropped to stay within the declared capacity."""


@dataclass(slots=True)
class ReplicaBlocks:
    """One replica's share of the index."""

    id: str
    bit: int
    capacity_blocks: int
    exact: bool = False
    tier_capacity_blocks: int = 0
    """Bound of each lower tier's map (CPU, DISK: a kv_offload tier); 0: `capacity_blocks`."""
    by_medium: dict[str, dict[Any, int]] = field(default_factory=dict)
    """medium -> engine block hash -> router key."""
    refs: dict[str, dict[int, int]] = field(default_factory=dict)
    """medium -> router key -> copies held."""
    counters: IndexCounters = field(default_factory=IndexCounters)
    last_event_s: float | None = None
    awaiting_since_s: float | None = None
    """When a request was routed here with no event seen since (the watchdog's clock)."""

    def blocks(self, medium: str = GPU) -> int:
        return len(self.refs.get(medium, ()))


class KvIndex:
    """The blocks of every replica, keyed by the router's block keys (module docs)."""

    def __init__(self, block_size: int, *, pending_ttl_s: float = 10.0) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self.pending_ttl_s = pending_ttl_s
        self.replicas: dict[str, ReplicaBlocks] = {}
        self._reach = HolderMasks()
        """GPU key -> replicas holding it or expected to (pending): what `match` walks."""
        self._pending: dict[int, int] = {}
        self._pending_q: deque[tuple[float, int, Sequence[int]]] = deque()
        self._of_bit: dict[int, ReplicaBlocks] = {}
        self._bits = BitPool()

    # -- membership -------------------------------------------------------------------------
    def add_replica(
        self, replica_id: str, capacity_blocks: int, *, exact: bool = False, tier_capacity_blocks: int = 0
    ) -> ReplicaBlocks:
        """Track `replica_id` (idempotent); its GPU map holds at most `capacity_blocks` entries and
        each lower tier's `tier_capacity_blocks` (0: `capacity_blocks`)."""
        rb = self.replicas.get(replica_id)
        if rb is not None:
            rb.capacity_blocks = capacity_blocks
            rb.tier_capacity_blocks = max(0, tier_capacity_blocks)
            return rb
        bit = self._bits.take()
        rb = self.replicas[replica_id] = ReplicaBlocks(
            replica_id, bit, max(0, capacity_blocks), exact, max(0, tier_capacity_blocks)
        )
        self._of_bit[bit] = rb
        return rb

    def remove_replica(self, replica_id: str) -> None:
        """Stop tracking a replica (it left the fleet); its bit is reused."""
        rb = self.replicas.get(replica_id)
        if rb is None:
            return
        self.clear(replica_id)
        del self.replicas[replica_id]
        del self._of_bit[rb.bit]
        self._bits.give_back(rb.bit)

    def exact(self, replica_id: str) -> bool:
        """Whether the replica's event stream is live (its entries are the engine's truth)."""
        rb = self.replicas.get(replica_id)
        return rb is not None and rb.exact

    def set_exact(self, replica_id: str, exact: bool) -> bool:
        """Mark the stream live or not; True when that changed the state."""
        rb = self.replicas.get(replica_id)
        if rb is None or rb.exact == exact:
            return False
        rb.exact = exact
        if not exact:
            rb.awaiting_since_s = None
        return True

    # -- events -----------------------------------------------------------------------------
    def apply(self, replica_id: str, events: Iterable[wire.Event], now: float | None = None) -> None:
        """Apply decoded wire events of one replica, in order (unknown replicas are ignored)."""
        rb = self.replicas.get(replica_id)
        if rb is None:
            return
        self.heard(replica_id, now)
        for ev in events:
            if isinstance(ev, (wire.BlockStored, wire.LegacyBlockStored)):
                self._apply_stored(rb, ev)
            elif isinstance(ev, (wire.BlockRemoved, wire.LegacyBlockRemoved)):
                self.removed(replica_id, ev.block_hashes, _medium(ev.medium))
            else:
                self.clear(replica_id)
                rb.counters.cleared += 1

    def heard(self, replica_id: str, now: float | None) -> None:
        """The replica's stream delivered something at `now` (the watchdog's input)."""
        rb = self.replicas.get(replica_id)
        if rb is not None and now is not None:
            rb.last_event_s = now
            rb.awaiting_since_s = None

    def _apply_stored(self, rb: ReplicaBlocks, ev: wire.Stored) -> None:
        hashes = ev.block_hashes
        if not hashes:
            return
        medium = _medium(ev.medium)
        if medium != GPU and not ev.token_ids:
            # vLLM's offloading connector announces a CPU copy by hash only (no tokens, block
            # size 0): the block was keyed when it was stored on the GPU.
            known = [(h, k) for h in hashes if (k := self._key_of(rb, h, GPU)) is not None]
            rb.counters.unknown_blocks += len(hashes) - len(known)
            if known:
                self.stored(rb.id, [h for h, _ in known], [k for _, k in known], medium)
            return
        if ev.block_size != self.block_size or len(ev.token_ids) != len(hashes) * ev.block_size:
            rb.counters.skipped += 1
            return
        parent = 0
        if ev.parent_block_hash is not None:
            found = self._key_of(rb, ev.parent_block_hash, medium)
            if found is None:
                rb.counters.unknown_parent += 1
                return
            parent = found
        extras: list[Any] | None = None
        if ev.extra_keys and any(x is not None for x in ev.extra_keys):
            extras = list(ev.extra_keys)
        if ev.lora_name is not None:
            extras = [(("lora", ev.lora_name), x) for x in (extras or [None] * len(hashes))]
        new_keys = keys_mod.block_keys(ev.token_ids, self.block_size, parent, extras)
        self.stored(rb.id, hashes, new_keys, medium)

    @staticmethod
    def _key_of(rb: ReplicaBlocks, block_hash: Any, medium: str) -> int | None:
        m = rb.by_medium.get(medium)
        if m is not None and block_hash in m:
            return m[block_hash]
        for other in rb.by_medium.values():
            if block_hash in other:
                return other[block_hash]
        return None

    def stored(self, replica_id: str, hashes: Sequence[Any], block_keys: Sequence[int], medium: str = GPU) -> None:
        """The replica stored blocks `hashes` (engine hashes) whose router keys are `block_keys`."""
        rb = self.replicas.get(replica_id)
        if rb is None:
            return
        by_hash = rb.by_medium.setdefault(medium, {})
        refs = rb.refs.setdefault(medium, {})
        reach = self._reach.add if medium == GPU else None
        bit = rb.bit
        for h, k in zip(hashes, block_keys):
            old = by_hash.get(h)
            if old is not None:
                # The same engine block stored again (a second physical copy): one more reference.
                n = refs.get(old, 0)
                refs[old] = n + 1
                if n == 0 and reach is not None:  # its key had lost every copy (another hash of it)
                    reach(old, bit)
                continue
            by_hash[h] = k
            n = refs.get(k, 0)
            refs[k] = n + 1
            if n == 0 and reach is not None:
                reach(k, bit)
        rb.counters.stored += len(hashes)
        cap = rb.capacity_blocks if medium == GPU else (rb.tier_capacity_blocks or rb.capacity_blocks)
        if len(by_hash) > cap:
            self._shrink(rb, medium, len(by_hash) - cap)

    def removed(self, replica_id: str, hashes: Iterable[Any], medium: str = GPU) -> None:
        """The replica evicted blocks `hashes` from `medium`."""
        rb = self.replicas.get(replica_id)
        if rb is None:
            return
        by_hash = rb.by_medium.get(medium, {})
        refs = rb.refs.get(medium, {})
        gpu = medium == GPU
        pending = self._pending
        bit = rb.bit
        for h in hashes:
            k = by_hash.get(h)
            if k is None:
                rb.counters.unknown_blocks += 1
                continue
            rb.counters.removed += 1
            n = refs.get(k, 1) - 1
            if n > 0:
                refs[k] = n
                continue  # another copy stays
            del by_hash[h]
            refs.pop(k, None)
            if gpu:
                if k in pending:
                    self._drop_bit(pending, k, bit)
                self._reach.drop(k, bit)

    def clear(self, replica_id: str) -> None:
        """The replica holds nothing (AllBlocksCleared, a restart, a reset after a lost event)."""
        rb = self.replicas.get(replica_id)
        if rb is None:
            return
        bit = rb.bit
        self._reach.drop_all(rb.refs.get(GPU, ()), bit)
        was_pending = [k for k, m in self._pending.items() if m & bit]
        for k in was_pending:
            self._drop_bit(self._pending, k, bit)
        self._reach.drop_all(was_pending, bit)
        rb.by_medium.clear()
        rb.refs.clear()

    def _shrink(self, rb: ReplicaBlocks, medium: str, n: int) -> None:
        by_hash = rb.by_medium[medium]
        victims = []
        for h in by_hash:
            victims.append(h)
            if len(victims) >= n:
                break
        refs = rb.refs[medium]
        bit = rb.bit
        for h in victims:
            k = by_hash.pop(h)
            c = refs.get(k, 1) - 1
            if c > 0:
                refs[k] = c
            else:
                refs.pop(k, None)
                if medium == GPU and not self._pending.get(k, 0) & bit:
                    self._reach.drop(k, bit)
        rb.counters.overflows += len(victims)

    @staticmethod
    def _drop_bit(table: dict[int, int], key: int, bit: int) -> None:
        m = table.get(key, 0) & ~bit
        if m:
            table[key] = m
        else:
            table.pop(key, None)

    # -- the request path ---------------------------------------------------------------------
    def expect(self, replica_id: str, block_keys: Sequence[int], now: float) -> None:
        """A request with these keys was routed to the replica: count them as held until the TTL."""
        rb = self.replicas.get(replica_id)
        if rb is None or not block_keys:
            return
        if rb.awaiting_since_s is None:
            rb.awaiting_since_s = now
        if self.pending_ttl_s <= 0:
            return
        self._expire(now)
        pending = self._pending
        bit = rb.bit
        cap = rb.capacity_blocks
        ks = block_keys[:cap] if len(block_keys) > cap else block_keys
        get = pending.get
        fresh = []  # not pending here yet (a block pending is in `reach` already)
        for k in ks:
            p = get(k, 0)
            if not p & bit:
                pending[k] = p | bit
                fresh.append(k)
        self._reach.add_all(fresh, bit)
        self._pending_q.append((now + self.pending_ttl_s, bit, ks))

    def _expire(self, now: float) -> None:
        q = self._pending_q
        pending = self._pending
        while q and q[0][0] <= now:
            _, bit, ks = q.popleft()
            rb = self._of_bit.get(bit)
            held = rb.refs.get(GPU, {}) if rb is not None else {}
            reach = self._reach
            for k in ks:
                m = pending.get(k)
                if m is not None and m & bit:
                    self._drop_bit(pending, k, bit)
                    if k not in held:
                        reach.drop(k, bit)

    def match(self, block_keys: Sequence[int], replica_ids: Sequence[str], now: float | None = None) -> list[int]:
        """Per replica (in order), how many leading `block_keys` it holds or is expected to hold.

        One walk over the keys for all replicas (module docs); an untracked replica matches 0.
        """
        reps = self.replicas
        bits = [rb.bit if (rb := reps.get(r)) is not None else 0 for r in replica_ids]
        if now is not None and self._pending_q and block_keys:
            self._expire(now)
        return self._reach.depths(block_keys, bits)

    def holders(self, key: int, medium: str = GPU) -> list[str]:
        """The replicas holding `key` in `medium` (admin views and the tiered-KV credit)."""
        return [rb.id for rb in self.replicas.values() if key in rb.refs.get(medium, ())]

    # -- the watchdog ---------------------------------------------------------------------------
    def silent(self, now: float, bound_s: float) -> list[str]:
        """Exact replicas sent a request more than `bound_s` ago with no event since."""
        return [
            rb.id
            for rb in self.replicas.values()
            if rb.exact and rb.awaiting_since_s is not None and now - rb.awaiting_since_s > bound_s
        ]

    def held_from(self, block_keys: Sequence[int], replica_id: str, start: int, medium: str) -> int:
        """How many of `block_keys[start:]`, leading, the replica holds in `medium` (a lower tier)."""
        rb = self.replicas.get(replica_id)
        held = rb.refs.get(medium) if rb is not None else None
        if not held:
            return 0
        n = 0
        for k in block_keys[start:]:
            if k not in held:
                break
            n += 1
        return n

    def blocks(self, replica_id: str, medium: str = GPU) -> int:
        """Distinct keys the replica holds in `medium`."""
        rb = self.replicas.get(replica_id)
        return rb.blocks(medium) if rb is not None else 0

    def entries(self) -> int:
        """Entries of every replica and medium (the unit of the memory bound)."""
        return sum(len(m) for rb in self.replicas.values() for m in rb.by_medium.values())


def _medium(medium: str | None) -> str:
    return GPU if medium is None else medium.upper()
