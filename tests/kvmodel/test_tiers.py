"""The engine model's lower KV tiers: GPU evictions move to a CPU LRU (and CPU evictions to disk);
a hit below the GPU costs its transfer time instead of its prefill, and only when that is faster."""

from __future__ import annotations

import pytest

from gpufleet.router.kvmodel import EngineParams, EngineRequest, EventKind, ReplicaEngine, TierCache

BS = 16


def req(rid: str, prefix: int, blocks: int, extra: int = 8, out: int = 1) -> EngineRequest:
    """`blocks` full blocks of the prefix family `prefix`, then `extra` tokens of its own."""
    hashes = tuple(prefix * 1000 + i for i in range(blocks))
    return EngineRequest(rid, blocks * BS + extra, out, hashes)


def params(**kw) -> EngineParams:
    base = dict(
        kv_capacity_tokens=64 * BS,
        prefill_tokens_per_s=10_000.0,
        decode_tokens_per_s=100.0,
        block_size_tokens=BS,
        tier_load_latency_s=0.001,
    )
    base.update(kw)
    return EngineParams(**base)


def run_one(eng: ReplicaEngine, r: EngineRequest, t0: float):
    eng.admit(r, t0)
    first = None
    for ev in eng.run_until_idle(t0):
        if ev.kind is EventKind.FIRST_TOKEN and ev.request_id == r.id:
            first = ev
    assert first is not None
    return first, first.time - t0


def fill_and_evict(eng: ReplicaEngine) -> None:
    """Prefix 1 (40 blocks), then prefix 2 (40 blocks): the 64-block GPU must evict prefix 1's blocks."""
    run_one(eng, req("a", 1, 40), 0.0)
    run_one(eng, req("b", 2, 40), 10.0)


def test_gpu_evictions_move_to_the_cpu_tier_and_a_hit_there_costs_transfer_not_prefill():
    cpu_rate = 200_000.0
    tiered = ReplicaEngine(params(cpu_capacity_tokens=256 * BS, cpu_load_tokens_per_s=cpu_rate))
    plain = ReplicaEngine(params())
    for eng in (tiered, plain):
        fill_and_evict(eng)
    assert tiered.cpu is not None and len(tiered.cpu) == tiered.cache.evicted > 0
    ev_t, ttft_t = run_one(tiered, req("c", 1, 40), 20.0)
    ev_p, ttft_p = run_one(plain, req("c", 1, 40), 20.0)
    gpu_hit = ev_t.cached_tokens - ev_t.cpu_cached_tokens
    assert ev_t.cpu_cached_tokens > 0 and ev_t.cached_tokens == 40 * BS
    assert ev_p.cached_tokens == gpu_hit  # without the tier those blocks are recomputed
    loaded = ev_t.cpu_cached_tokens
    expected = 0.001 + loaded / cpu_rate + (40 * BS + 8 - 40 * BS) / 10_000.0
    assert ttft_t == pytest.approx(expected, rel=1e-9)
    assert ttft_p == pytest.approx((40 * BS + 8 - gpu_hit) / 10_000.0, rel=1e-9)
    assert tiered.stats.cpu_cache_hits == loaded
    # The loaded blocks are back on the GPU: the next request hits them there.
    ev2, _ = run_one(tiered, req("d", 1, 40), 30.0)
    assert ev2.cached_tokens == 40 * BS and ev2.cpu_cached_tokens == 0


def test_a_tier_slower_than_recompute_is_not_used():
    # 5k tokens/s from the tier against 10k tokens/s prefill: loading would lose.
    eng = ReplicaEngine(params(cpu_capacity_tokens=256 * BS, cpu_load_tokens_per_s=5_000.0))
    fill_and_evict(eng)
    ev, _ = run_one(eng, req("c", 1, 40), 20.0)
    assert ev.cpu_cached_tokens == 0
    assert eng.stats.cpu_cache_hits == 0


def test_the_fixed_load_latency_makes_a_short_lower_tier_hit_not_worth_loading():
    # One block: 16 / 200k = 0.08 ms to load + 5 ms latency > 1.6 ms to recompute.
    eng = ReplicaEngine(
        params(cpu_capacity_tokens=256 * BS, cpu_load_tokens_per_s=200_000.0, tier_load_latency_s=0.005)
    )
    eng.cpu.put(7000)  # the only block of prefix 7, as if the GPU had evicted it
    ev, _ = run_one(eng, req("x", 7, 1), 0.0)
    assert ev.cpu_cached_tokens == 0
    eng.cpu.put(8000)
    for i in range(1, 20):
        eng.cpu.put(8000 + i)
    ev, _ = run_one(eng, req("y", 8, 20), 1.0)  # 20 blocks: 5 ms + 1.6 ms < 32 ms
    assert ev.cpu_cached_tokens == 20 * BS


def test_cpu_evictions_spill_to_disk_and_a_disk_hit_loads_at_the_disk_rate():
    eng = ReplicaEngine(
        params(
            cpu_capacity_tokens=20 * BS,
            cpu_load_tokens_per_s=200_000.0,
            disk_capacity_tokens=512 * BS,
            disk_load_tokens_per_s=40_000.0,
        )
    )
    fill_and_evict(eng)
    run_one(eng, req("e", 3, 40), 20.0)  # pushes prefix 1's CPU blocks down to disk
    assert eng.disk is not None and len(eng.disk) > 0
    ev, ttft = run_one(eng, req("c", 1, 40), 30.0)
    assert ev.disk_cached_tokens > 0
    assert ttft == pytest.approx(
        0.001 + ev.cpu_cached_tokens / 200_000 + ev.disk_cached_tokens / 40_000 + 8 / 10_000, rel=1e-9
    )


def test_other_requests_keep_running_while_one_waits_for_its_load():
    eng = ReplicaEngine(
        params(cpu_capacity_tokens=256 * BS, cpu_load_tokens_per_s=1_000_000.0, tier_load_latency_s=0.01)
    )
    fill_and_evict(eng)
    eng.admit(req("slow", 1, 40), 20.0)  # waits 10 ms for its blocks (still faster than prefill)
    eng.admit(req("other", 9, 4), 20.0)  # no reuse: prefills at once
    firsts = {ev.request_id: ev.time for ev in eng.run_until_idle(20.0) if ev.kind is EventKind.FIRST_TOKEN}
    assert firsts["other"] < 20.008 < 20.01 < firsts["slow"]


def test_tier_cache_is_an_lru_that_spills_to_the_tier_below():
    disk = TierCache(2, "DISK")
    cpu = TierCache(2, "CPU", disk)
    for h in (1, 2, 3):
        cpu.put(h)
    assert 1 not in cpu and 1 in disk and {2, 3} <= {h for h in (2, 3) if h in cpu}
    cpu.touch(2)
    cpu.put(4)  # evicts 3, the least recently used
    assert 3 in disk and 2 in cpu and 4 in cpu


def test_params_reject_a_tier_without_a_rate():
    with pytest.raises(ValueError):
        params(cpu_capacity_tokens=1024)
    with pytest.raises(ValueError):
        params(disk_capacity_tokens=1024, disk_load_tokens_per_s=1.0)


def test_blocks_being_loaded_survive_the_spill_their_own_allocation_causes():
    # A small CPU tier: making room on the GPU for the request spills blocks into the CPU tier,
    # which must not push out the blocks this same request is loading from it.
    eng = ReplicaEngine(params(cpu_capacity_tokens=20 * BS, cpu_load_tokens_per_s=200_000.0))
    fill_and_evict(eng)
    ev, ttft = run_one(eng, req("c", 1, 40), 20.0)
    assert ev.cpu_cached_tokens > 0 and ev.disk_cached_tokens == 0
    computed = 40 * BS + 8 - ev.cached_tokens
    assert ttft == pytest.approx(0.001 + ev.cpu_cached_tokens / 200_000 + computed / 10_000, rel=1e-9)
