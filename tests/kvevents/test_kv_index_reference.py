"""The events index answers as a brute-force model does, over random stores, removals, clears,
pending marks, expiries, capacity overflows, replicas leaving and rejoining, and lower tiers."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from gpufleet.router.kvevents.index import KvIndex

BS = 4
TTL = 5.0


@dataclass
class RefReplica:
    """One replica as plain sets: what the engine stored (hash -> key, copies), what is pending."""

    capacity: int
    by_hash: dict[str, dict[int, int]] = field(default_factory=dict)
    copies: dict[str, Counter[int]] = field(default_factory=dict)
    pending: set[int] = field(default_factory=set)

    def held(self, key: int, medium: str = "GPU") -> bool:
        return self.copies.get(medium, Counter())[key] > 0


class Reference:
    """The index's documented behaviour written the slow way, with no bitmasks."""

    def __init__(self) -> None:
        self.replicas: dict[str, RefReplica] = {}
        self.queue: list[tuple[float, str, list[int]]] = []

    def stored(self, r: str, hashes: list[int], keys: list[int], medium: str) -> None:
        rep = self.replicas[r]
        by_hash = rep.by_hash.setdefault(medium, {})
        copies = rep.copies.setdefault(medium, Counter())
        for h, k in zip(hashes, keys):
            if h in by_hash:
                copies[by_hash[h]] += 1
            else:
                by_hash[h] = k
                copies[k] += 1
        while len(by_hash) > rep.capacity:  # the oldest entries go first
            h = next(iter(by_hash))
            k = by_hash.pop(h)
            copies[k] = (copies[k] or 1) - 1

    def removed(self, r: str, hashes: list[int], medium: str) -> None:
        rep = self.replicas[r]
        by_hash = rep.by_hash.get(medium, {})
        copies = rep.copies.get(medium, Counter())
        for h in hashes:
            if h not in by_hash:
                continue
            k = by_hash[h]
            # A hash whose key has no copy left (another hash of that key took the last one)
            # still counts as one copy, as the index counts it.
            copies[k] = (copies[k] or 1) - 1
            if copies[k] == 0:
                del by_hash[h]
                if medium == "GPU":
                    rep.pending.discard(k)

    def clear(self, r: str) -> None:
        rep = self.replicas[r]
        rep.by_hash.clear()
        rep.copies.clear()
        rep.pending.clear()

    def expect(self, r: str, keys: list[int], now: float) -> None:
        self.expire(now)
        ks = keys[: self.replicas[r].capacity]
        self.replicas[r].pending.update(ks)
        self.queue.append((now + TTL, r, ks))

    def expire(self, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            _, r, ks = self.queue.pop(0)
            if r in self.replicas:
                self.replicas[r].pending.difference_update(ks)

    def match(self, keys: list[int], ids: list[str], now: float) -> list[int]:
        self.expire(now)
        out = []
        for r in ids:
            rep = self.replicas.get(r)
            n = 0
            while rep is not None and n < len(keys) and (rep.held(keys[n]) or keys[n] in rep.pending):
                n += 1
            out.append(n)
        return out

    def held_from(self, keys: list[int], r: str, start: int, medium: str) -> int:
        n = 0
        for k in keys[start:]:
            if not self.replicas[r].held(k, medium):
                break
            n += 1
        return n


@pytest.mark.parametrize("seed", range(12))
def test_the_index_answers_as_a_brute_force_model_over_random_events(seed: int) -> None:
    rng = random.Random(seed)
    ids = [f"r{i}" for i in range(rng.choice((3, 9, 40)))]
    # A few prompts sharing prefixes (a tree of chains), so replicas hold overlapping runs.
    prompts: list[list[int]] = [[rng.getrandbits(64) for _ in range(rng.randint(1, 40))] for _ in range(4)]
    for _ in range(8):
        base = rng.choice(prompts)
        prompts.append(base[: rng.randint(0, len(base))] + [rng.getrandbits(64) for _ in range(rng.randint(1, 30))])
    kv = KvIndex(BS, pending_ttl_s=TTL)
    ref = Reference()
    for r in ids:
        cap = rng.choice((8, 30, 1000))
        kv.add_replica(r, cap, exact=True)
        ref.replicas[r] = RefReplica(cap)
    hashes: dict[str, list[int]] = {r: [] for r in ids}  # engine hashes each replica was sent
    now = 0.0
    for step in range(400):
        now += rng.random()
        r = rng.choice(ids)
        op = rng.random()
        medium = "CPU" if rng.random() < 0.15 else "GPU"
        if op < 0.4:  # BlockStored: a run of one prompt, sometimes a block stored twice
            p = rng.choice(prompts)
            a = rng.randrange(len(p))
            b = rng.randint(a + 1, len(p))
            hs = [rng.getrandbits(32) for _ in range(b - a)]
            if hashes[r] and rng.random() < 0.2:
                hs[0] = rng.choice(hashes[r])
            hashes[r] += hs
            kv.stored(r, hs, p[a:b], medium)
            ref.stored(r, hs, p[a:b], medium)
        elif op < 0.65 and hashes[r]:  # BlockRemoved, unknown hashes included
            hs = rng.sample(hashes[r], min(len(hashes[r]), rng.randint(1, 12))) + [rng.getrandbits(32)]
            kv.removed(r, hs, medium)
            ref.removed(r, hs, medium)
        elif op < 0.85:  # a request routed there
            p = rng.choice(prompts)
            kv.expect(r, p, now)
            ref.expect(r, p, now)
        elif op < 0.9:
            kv.clear(r)
            ref.clear(r)
        elif op < 0.93:  # the replica leaves and comes back (its bit is reused)
            cap = ref.replicas[r].capacity
            kv.remove_replica(r)
            kv.add_replica(r, cap, exact=True)
            ref.replicas[r] = RefReplica(cap)
            hashes[r] = []
        p = rng.choice(prompts)
        cands = rng.sample(ids, rng.randint(1, len(ids))) + (["unknown"] if step % 7 == 0 else [])
        assert kv.match(p, cands, now) == ref.match(p, cands, now), step
        start = rng.randrange(len(p))
        assert kv.held_from(p, r, start, "CPU") == ref.held_from(p, r, start, "CPU"), step
        k = rng.choice(p)
        assert sorted(kv.holders(k)) == sorted(x for x in ids if ref.replicas[x].held(k)), step


def test_a_pending_mark_and_a_stored_block_on_one_key_leave_it_held_until_both_are_gone() -> None:
    kv = KvIndex(BS, pending_ttl_s=TTL)
    kv.add_replica("a", 100, exact=True)
    kv.expect("a", [1, 2, 3], now=0.0)
    kv.stored("a", [11, 12], [1, 2])
    assert kv.match([1, 2, 3], ["a"], now=1.0) == [3]
    assert kv.match([1, 2, 3], ["a"], now=TTL + 1) == [2]  # the pending mark expired; the stored blocks stay
    kv.removed("a", [11])
    assert kv.match([1, 2, 3], ["a"], now=TTL + 2) == [0]
