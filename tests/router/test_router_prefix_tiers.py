"""The prefix scorer credits a match by tier: a CPU-tier continuation costs its transfer (in
prefill tokens), not nothing and not its prefill; approximate and events modes."""

from __future__ import annotations

import pytest

from gpufleet.router.config import RouterSettings
from gpufleet.router.kvevents.index import KvIndex
from gpufleet.router.policies.base import Candidates, PluginContext
from gpufleet.router.policies.scorers.prefix import PrefixScorer
from gpufleet.router.types import Decision, ReplicaState, RequestFeatures

CTX = PluginContext(RouterSettings())
PREFILL = 10_000.0


def rep(i: int, gpu_blocks: int, cpu_blocks: int = 0, rate: float | None = 200_000.0) -> ReplicaState:
    return ReplicaState(
        id=f"r{i}",
        model="m",
        kv_capacity_tokens=gpu_blocks * 16,
        prefill_tokens_per_s=PREFILL,
        cpu_kv_capacity_tokens=cpu_blocks * 16,
        cpu_load_tokens_per_s=rate if cpu_blocks else None,
    )


def feats(n_blocks: int, first: int = 1) -> RequestFeatures:
    return RequestFeatures("m", tuple(range(first, first + n_blocks)), n_blocks * 16 + 8)


@pytest.mark.parametrize(
    ("rate", "latency_s", "expect_saving"),
    [
        (200_000.0, 0.002, True),  # 20x the prefill rate: the tier pays
        (5_000.0, 0.002, False),  # slower than prefill: recompute, no credit
        (200_000.0, 1.0, False),  # a fixed cost above the whole prefill: no credit
    ],
)
def test_a_cpu_tier_hit_costs_its_transfer_in_prefill_tokens(rate, latency_s, expect_saving):
    sc = PrefixScorer(PrefixScorer.Params(tier_load_latency_s=latency_s), CTX)
    tiered = rep(0, gpu_blocks=10, cpu_blocks=100, rate=rate)
    plain = rep(1, gpu_blocks=10)
    old = feats(40)  # routed to both: the GPU index keeps 10 blocks, the deep one all 40
    for r in (tiered, plain):
        sc.on_routed(old, Decision(r))
    c = Candidates(old, [tiered, plain])
    got = sc.score(c)
    prompt = old.prompt_tokens
    gpu_blocks = sc.index(tiered).match(old.block_hashes)
    assert gpu_blocks == 10 and c.matched_blocks == [10, 10]
    base = prompt - gpu_blocks * 16
    assert got[1] == base
    tier_tokens = 30 * 16
    cost = tier_tokens * PREFILL / rate + latency_s * PREFILL
    if expect_saving:
        assert got[0] == pytest.approx(base - (tier_tokens - cost))
        assert got[0] < got[1]
    else:
        assert got[0] == base


def test_the_tier_prediction_is_bounded_by_the_cpu_capacity_and_forgets_on_reset():
    sc = PrefixScorer(PrefixScorer.Params(), CTX)
    r = rep(0, gpu_blocks=10, cpu_blocks=20)
    sc.on_routed(feats(40), Decision(r))  # 40 blocks into 30 of GPU + CPU: the head 30 are kept
    deep = sc.deep_index(r)
    assert deep is not None and deep.match(tuple(range(1, 41))) == 30
    sc.on_replica_reset("r0")
    assert deep.match(tuple(range(1, 41))) == 0
    assert sc.score(Candidates(feats(40), [r])) == [40 * 16 + 8]


def test_events_mode_reads_the_tier_from_cpu_medium_events():
    kv = KvIndex(block_size=16)
    sc = PrefixScorer(PrefixScorer.Params(), PluginContext(RouterSettings(), context={"kv_index": kv}))
    r = rep(0, gpu_blocks=10, cpu_blocks=100)
    kv.add_replica("r0", capacity_blocks=1000)
    kv.set_exact("r0", True)
    keys = list(range(1, 41))
    kv.stored("r0", [f"g{k}" for k in keys[:10]], keys[:10], "GPU")
    kv.stored("r0", [f"c{k}" for k in keys[10:25]], keys[10:25], "CPU")
    c = Candidates(feats(40), [r])
    got = sc.score(c)
    assert c.matched_blocks == [10]
    tier_tokens = 15 * 16
    cost = tier_tokens * PREFILL / 200_000.0 + 0.002 * PREFILL
    assert got[0] == pytest.approx(40 * 16 + 8 - 10 * 16 - (tier_tokens - cost))


def test_cache_aware_prices_a_cpu_tier_hit_in_seconds_of_ttft():
    from gpufleet.router.policies import registry

    policy = registry.make("cache_aware", RouterSettings())
    prefix = next(s for s in policy.scorers if isinstance(s, PrefixScorer))
    tiered = rep(0, gpu_blocks=10, cpu_blocks=100)
    plain = rep(1, gpu_blocks=10)
    f = feats(40)
    for r in (tiered, plain):
        prefix.on_routed(f, Decision(r))
    costs = policy.costs(Candidates(f, [tiered, plain]))
    saving = 30 * 16 - (30 * 16 * PREFILL / 200_000.0 + 0.002 * PREFILL)
    # Idle replicas: ttft (weight 1) and added_prefill (weight added_prefill_weight) are both the
    # uncached work / prefill rate, so the tier saves (1 + weight) x saving / rate seconds.
    w = RouterSettings().cache_aware.added_prefill_weight
    assert costs[0] < costs[1]
    assert costs[1] - costs[0] == pytest.approx((1 + w) * saving / PREFILL, rel=1e-9)
