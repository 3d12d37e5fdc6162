"""Events mode: where no engine holds any of a prompt, the prefix scorer falls back to the
router's memory of where it sent that prefix, so an evicted prefix is rebuilt in one place."""

from __future__ import annotations

from gpufleet.router.config import RouterSettings
from gpufleet.router.kvevents.index import KvIndex
from gpufleet.router.policies.base import Candidates, PluginContext
from gpufleet.router.policies.scorers.prefix import PrefixScorer
from gpufleet.router.types import Decision, ReplicaState, RequestFeatures

KEYS = tuple(range(1, 21))  # a 20-block prefix


def setup(n: int = 3) -> tuple[KvIndex, PrefixScorer, list[ReplicaState]]:
    kv = KvIndex(block_size=16, pending_ttl_s=1.0)
    sc = PrefixScorer(
        PrefixScorer.Params(), PluginContext(RouterSettings(), clock=lambda: 100.0, context={"kv_index": kv})
    )
    reps = [ReplicaState(id=f"r{i}", model="m", kv_capacity_tokens=16_000) for i in range(n)]
    for r in reps:
        kv.add_replica(r.id, capacity_blocks=1000)
        kv.set_exact(r.id, True)
    return kv, sc, reps


def matched(sc: PrefixScorer, reps: list[ReplicaState], keys: tuple[int, ...] = KEYS) -> list[int]:
    c = Candidates(RequestFeatures("m", keys, len(keys) * 16 + 8), reps)
    sc.score(c)
    assert c.matched_blocks is not None
    return c.matched_blocks


def test_a_prefix_evicted_everywhere_is_matched_where_it_was_sent_before() -> None:
    kv, sc, reps = setup()
    sc.on_routed(RequestFeatures("m", KEYS, 20 * 16 + 8), Decision(reps[1]))
    kv.stored("r1", [f"h{k}" for k in KEYS], list(KEYS))
    assert matched(sc, reps) == [0, 20, 0]  # the engine holds it: exact
    kv.removed("r1", [f"h{k}" for k in KEYS])  # evicted; the pending marks are long gone (t=100 > ttl)
    assert kv.match(KEYS, ["r0", "r1", "r2"], 200.0) == [0, 0, 0]
    sc._clock = lambda: 200.0
    assert matched(sc, reps) == [0, 20, 0]  # no engine holds any: the router's memory of where it went


def test_the_memory_is_not_used_where_some_engine_holds_the_prefix() -> None:
    kv, sc, reps = setup()
    sc.on_routed(RequestFeatures("m", KEYS, 20 * 16 + 8), Decision(reps[1]))  # sent to r1 (long ago) ...
    kv.stored("r2", [f"h{k}" for k in KEYS[:5]], list(KEYS[:5]))  # ... but only r2's engine holds some
    sc._clock = lambda: 200.0  # r1's pending marks have expired, its engine never stored it
    assert matched(sc, reps) == [0, 0, 5]  # exact wins: r1's stale placement gets no credit
