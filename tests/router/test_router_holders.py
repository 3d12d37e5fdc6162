"""One table of block -> replicas for the whole fleet (`gpufleet.router.holders`): its walk
answers as a per-replica loop does, its interned masks stay bounded, and the approximate
indexes sharing it match as each would alone."""

from __future__ import annotations

import random

import pytest

from gpufleet.router.config import RouterSettings
from gpufleet.router.holders import BitPool, HolderMasks
from gpufleet.router.policies import registry
from gpufleet.router.policies.scorers.prefix import PrefixScorer
from gpufleet.router.prefix import PrefixIndex
from gpufleet.router.types import ReplicaState, RequestFeatures


def _leading(held: set[int], keys: list[int]) -> int:
    n = 0
    while n < len(keys) and keys[n] in held:
        n += 1
    return n


@pytest.mark.parametrize("seed", range(20))
def test_the_walk_gives_each_replica_the_leading_blocks_it_holds(seed: int) -> None:
    rng = random.Random(seed)
    n_rep = rng.choice((1, 5, 64, 200))
    keys = [rng.getrandbits(64) for _ in range(rng.choice((1, 50, 700, 3000)))]
    table = HolderMasks()
    held: list[set[int]] = []
    for r in range(n_rep):
        # Mostly a leading run, sometimes with holes and blocks past the run, sometimes nothing.
        run = rng.randint(0, len(keys))
        mine = set(keys[:run])
        for _ in range(rng.randint(0, 3)):
            mine.discard(rng.choice(keys))
        if rng.random() < 0.3:
            mine |= set(rng.sample(keys, min(len(keys), 20)))
        held.append(mine)
        table.add_all(mine, 1 << r)
    for r in rng.sample(range(n_rep), n_rep // 3):  # some forget some blocks again
        gone = rng.sample(sorted(held[r]), len(held[r]) // 2) if held[r] else []
        table.drop_all(gone, 1 << r)
        held[r] -= set(gone)
    cands = rng.sample(range(n_rep), rng.randint(1, n_rep))
    bits = [1 << r for r in cands] + [0]  # 0: a replica the table does not know
    assert table.depths(keys, bits) == [_leading(held[r], keys) for r in cands] + [0]


def test_a_walk_over_alternating_holder_sets_is_still_exact() -> None:
    keys = list(range(1, 2001))
    table = HolderMasks()
    table.add_all(keys, 0b001)
    table.add_all(keys[::2], 0b010)  # every other block: a new holder set at every key
    table.add_all(keys[:1500], 0b100)
    assert table.depths(keys, [0b001, 0b010, 0b100]) == [2000, 1, 1500]


def test_equal_holder_sets_share_one_mask_object_and_the_intern_table_stays_bounded() -> None:
    table = HolderMasks()
    big = 1 << 100
    table.add_all(range(1000), big | 1)
    masks = {id(table.masks[k]) for k in range(1000)}
    assert len(masks) == 1
    rng = random.Random(0)
    for k in range(1000, 60_000):  # many masks that are used once and then dropped
        table.add(k, big | rng.getrandbits(40))
        table.drop(k, table.get(k))
    assert len(table) == 1000
    assert len(table._canon) <= 2 * 1 + 1024


def test_dropping_a_bit_that_was_never_there_changes_nothing() -> None:
    table = HolderMasks()
    table.add(7, 0b01)
    table.drop(7, 0b10)
    table.drop(8, 0b10)
    assert table.masks == {7: 0b01}
    table.drop(7, 0b01)
    assert table.masks == {}


def test_a_freed_bit_is_taken_again_first() -> None:
    pool = BitPool()
    assert [pool.take() for _ in range(3)] == [1, 2, 4]
    pool.give_back(2)
    assert pool.take() == 2
    assert pool.take() == 8


@pytest.mark.parametrize("seed", range(8))
def test_approximate_indexes_sharing_a_table_match_as_each_alone(seed: int) -> None:
    rng = random.Random(seed)
    shared = HolderMasks()
    pool = BitPool()
    caps = [rng.choice((0, 5, 40, 400)) for _ in range(6)]
    alone = [PrefixIndex(c) for c in caps]
    together = [PrefixIndex(c, shared=shared, bit=pool.take()) for c in caps]
    prompts = [[rng.getrandbits(64) for _ in range(rng.randint(1, 60))] for _ in range(5)]
    for _ in range(300):
        i = rng.randrange(len(caps))
        op = rng.random()
        prompt = rng.choice(prompts)
        blocks = rng.randint(0, 30)
        lim = rng.randint(0, caps[i])
        for idx in (alone[i], together[i]):
            if op < 0.6:
                idx.insert(prompt)
            elif op < 0.75:
                idx.consume(blocks)  # generated tokens: placeholders that push blocks out
            elif op < 0.85:
                idx.limit(lim)
            elif op < 0.9:
                idx.clear()
        p = rng.choice(prompts)
        assert shared.depths(p, [t.bit for t in together]) == [a.match(p) for a in alone]


def test_the_prefix_scorer_matches_every_replica_in_one_walk_and_frees_a_removed_ones_bit() -> None:
    settings = RouterSettings(block_size_tokens=16)
    pol = registry.make("cache_aware", settings, seed=0)
    scorer = next(s for s in pol.scorers if isinstance(s, PrefixScorer))
    states = [ReplicaState(id=f"r{i}", model="m", kv_capacity_tokens=16 * 1000) for i in range(4)]
    keys = tuple(range(100, 180))
    for i, st in enumerate(states):
        scorer.index(st).insert(keys[: 20 * i])
    f = RequestFeatures(model="m", block_hashes=keys, prompt_tokens=16 * len(keys), affinity_key=keys[0])
    d = pol.choose(f, states)
    assert d.replica is states[3] and d.matched_blocks == 60
    bit = scorer.index(states[3]).bit
    pol.on_replica_removed("r3")
    assert all(not m & bit for m in scorer._shared.masks.values())
    newcomer = ReplicaState(id="r9", model="m", kv_capacity_tokens=16 * 1000)
    assert scorer.index(newcomer).bit == bit  # reused, and empty
    d = pol.choose(f, [*states[:3], newcomer])
    assert d.replica is states[2] and d.matched_blocks == 40
