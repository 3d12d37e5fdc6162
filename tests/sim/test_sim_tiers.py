"""The simulator with lower KV tiers: the same workload on the same GPUs reuses more with a CPU
tier, and a plan's kv_offload reaches the simulated engines."""

from __future__ import annotations

from gpufleet.infra import plan as plan_mod
from gpufleet.infra import spec
from gpufleet.router.sim import engine, fleet, metrics
from gpufleet.router.workloads import generators
from tests.manifests.test_kv_offload_manifests import FLEET


def test_a_cpu_tier_raises_the_hit_ratio_of_a_fleet_whose_gpus_evict():
    work = generators.mix(240, seed=3, rate_rps=40.0)
    gpu_only = fleet.uniform_fleet(3, kv_capacity_tokens=12_000, prefill_tokens_per_s=20_000, decode_tokens_per_s=200)
    tiered = gpu_only.with_kv_tiers(200_000, 400_000.0)
    a = metrics.summarize(engine.simulate(work, gpu_only, "cache_aware", seed=1))
    b = metrics.summarize(engine.simulate(work, tiered, "cache_aware", seed=1))
    assert a.tier_hit_ratio == 0
    assert b.tier_hit_ratio > 0
    assert b.hit_ratio > a.hit_ratio
    assert b.prefill_gpu_s < a.prefill_gpu_s
    assert b.finished == a.finished == len(work)


def test_fleet_from_plan_gives_each_engine_its_pools_tiers():
    fl, smap = spec.load_text(FLEET, "fleet.yaml")
    p = plan_mod.compile_fleet(fl, smap)
    f = fleet.fleet_from_plan(p, "native")
    tiers = p.deployment("native").pools[0].kv_tiers
    e = f.replicas[0].engine
    assert e.cpu_capacity_tokens == tiers.cpu_kv_tokens > 0
    assert e.cpu_load_tokens_per_s == tiers.cpu_hit_tokens_per_s
    assert f.replicas[0].state().cpu_kv_capacity_tokens == tiers.cpu_kv_tokens
    plain = fleet.fleet_from_plan(p, "plain").replicas[0].engine
    assert plain.cpu_capacity_tokens == 0


def test_capacity_sizes_cache_aware_with_and_without_the_tier():
    from gpufleet.router.sim import capacity

    work = generators.mix(240, seed=3, rate_rps=40.0)
    base = fleet.uniform_fleet(1, kv_capacity_tokens=12_000, prefill_tokens_per_s=20_000, decode_tokens_per_s=200)
    tiered = base.with_kv_tiers(200_000, 400_000.0)
    res = capacity.compare(work, tiered, 2.0, policies=("cache_aware",), max_replicas=16)
    assert res.has_offload
    with_tier, without = res.replicas["cache_aware"], res.without_offload
    assert with_tier is not None and without is not None and without >= with_tier
    # `without_offload` is exactly what the GPU-only fleet needs.
    assert without == capacity.replicas_needed(work, base, "cache_aware", 2.0, max_replicas=16)
    assert res.offload_saving_usd == (without - with_tier) * res.usd_per_replica_month
    plain = capacity.compare(work, base, 2.0, policies=("cache_aware",), max_replicas=16)
    assert not plain.has_offload and plain.offload_saving_usd is None
