"""Unit tests of the replica's KV-cache and timing model (gpufleet.router.kvmodel)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufleet.router import kvmodel
from gpufleet.router.kvmodel import EngineParams, EngineRequest, EventKind, PrefixCache, ReplicaEngine

BS = 16


def _params(**kw) -> EngineParams:
    base = dict(
        kv_capacity_tokens=64 * BS,
        prefill_tokens_per_s=10_000.0,
        decode_tokens_per_s=100.0,
        block_size_tokens=BS,
        max_running=8,
        max_batched_tokens=2048,
    )
    base.update(kw)
    return EngineParams(**base)


def _req(rid: str, prefix: int, blocks: int, out: int = 4, extra_tokens: int = 0) -> EngineRequest:
    """A prompt of `blocks` full blocks whose hashes start with a prefix family `prefix`."""
    hashes = tuple(prefix * 1_000_000 + i for i in range(blocks))
    return EngineRequest(id=rid, prompt_tokens=blocks * BS + extra_tokens, output_tokens=out, block_hashes=hashes)


def _first_token(events, rid):
    return next(e for e in events if e.kind is EventKind.FIRST_TOKEN and e.request_id == rid)


def test_public_api_is_pinned():
    assert set(kvmodel.__all__) == {
        "AdmissionError",
        "EngineParams",
        "EngineRequest",
        "EngineStats",
        "Event",
        "EventKind",
        "PrefixCache",
        "TierCache",
        "ReplicaEngine",
        "RequestView",
    }


def test_lru_evicts_least_recently_released_block_first():
    cache = PrefixCache(4)
    cache.acquire([], 2)
    assert cache.register(1) and cache.register(2)
    cache.release([1, 2], 0)  # tail first: 2 is older than 1 in the LRU
    assert cache.lru_order() == [2, 1]
    cache.acquire([], 2)
    cache.register(3)
    cache.register(4)
    cache.release([3, 4], 0)
    assert cache.lru_order() == [2, 1, 4, 3]
    cache.acquire([], 1)  # pool full: the oldest evictable block (2) goes
    assert 2 not in cache and 1 in cache
    assert cache.evicted == 1


def test_pinned_blocks_are_never_evicted():
    cache = PrefixCache(3)
    cache.acquire([], 1)
    cache.register(10)  # held by a running request
    cache.acquire([], 1)
    cache.register(11)
    cache.release([11], 0)
    assert not cache.can_allocate([], 3)  # only 11 is evictable: 1 free + 1 evictable
    assert cache.can_allocate([], 2)
    cache.acquire([], 2)
    assert 10 in cache and 11 not in cache


def test_pinning_a_hit_removes_it_from_the_evictable_set():
    cache = PrefixCache(2)
    cache.acquire([], 1)
    cache.register(5)
    cache.release([5], 0)
    assert not cache.can_allocate([5], 2)  # 5 would be pinned, so it cannot also make room
    cache.acquire([5], 1)
    assert cache.lru_order() == [] and cache.pinned_blocks == 2


def test_repeated_prefix_is_served_from_cache_and_gets_an_earlier_first_token():
    eng = ReplicaEngine(_params())
    eng.admit(_req("a", 1, 32), 0.0)
    ev_a = eng.run_until_idle()
    eng.admit(_req("b", 1, 32), 10.0)
    ev_b = eng.run_until_idle(10.0)
    ttft_a = _first_token(ev_a, "a").time - 0.0
    ttft_b = _first_token(ev_b, "b").time - 10.0
    assert _first_token(ev_a, "a").cached_tokens == 0
    # a full hit still computes the last block, as vLLM does
    assert _first_token(ev_b, "b").cached_tokens == 31 * BS
    assert ttft_b < ttft_a
    assert eng.stats.prefix_cache_queries == 64 * BS and eng.stats.prefix_cache_hits == 31 * BS


def test_more_cached_tokens_means_earlier_first_token():
    ttfts = []
    for shared in (0, 8, 16, 24):
        eng = ReplicaEngine(_params())
        if shared:
            eng.admit(_req("warm", 7, shared, extra_tokens=1), 0.0)
            eng.run_until_idle()
        hashes = tuple(7 * 1_000_000 + i for i in range(shared)) + tuple(range(32 - shared))
        eng.admit(EngineRequest("r", 32 * BS, 4, hashes), 100.0)
        ttfts.append(_first_token(eng.run_until_idle(100.0), "r").time - 100.0)
    assert ttfts == sorted(ttfts, reverse=True) and len(set(ttfts)) == 4


def test_ttft_is_uncached_prompt_over_prefill_rate_then_decode_per_token():
    p = _params(prefill_tokens_per_s=1000.0, decode_tokens_per_s=50.0)
    eng = ReplicaEngine(p)
    eng.admit(EngineRequest("x", 500, 5, ()), 0.0)
    events = eng.run_until_idle()
    assert _first_token(events, "x").time == pytest.approx(0.5)
    finished = next(e for e in events if e.kind is EventKind.FINISHED)
    assert finished.output_tokens == 5
    assert finished.time == pytest.approx(0.5 + 4 / 50.0)


def test_concurrent_requests_share_the_prefill_rate():
    alone = ReplicaEngine(_params(prefill_tokens_per_s=1000.0))
    alone.admit(EngineRequest("x", 1000, 1, ()), 0.0)
    t_alone = _first_token(alone.run_until_idle(), "x").time
    shared = ReplicaEngine(_params(prefill_tokens_per_s=1000.0))
    for i in range(4):
        shared.admit(EngineRequest(f"x{i}", 1000, 1, ()), 0.0)
    t_last = max(e.time for e in shared.run_until_idle() if e.kind is EventKind.FIRST_TOKEN)
    assert t_last == pytest.approx(4 * t_alone)


def test_max_running_bounds_the_batch_and_the_rest_wait():
    eng = ReplicaEngine(_params(max_running=2))
    for i in range(5):
        eng.admit(_req(f"r{i}", i + 1, 2, out=20), 0.0)
    # the idle engine started a step with the first arrival; the next step fills the batch
    assert eng.num_running == 1 and eng.num_waiting == 4
    eng.step(eng.next_event_time())
    assert eng.num_running == 2 and eng.num_waiting == 3
    events = eng.run_until_idle()
    assert sum(e.kind is EventKind.FINISHED for e in events) == 5
    assert eng.num_running == 0 and eng.num_waiting == 0


def test_cancel_frees_slot_and_blocks():
    eng = ReplicaEngine(_params(max_running=1))
    eng.admit(_req("long", 1, 4, out=500), 0.0)
    eng.admit(_req("next", 2, 4, out=1), 0.0)
    eng.step(eng.next_event_time())
    assert eng.num_waiting == 1
    assert eng.cancel("long", 0.5)
    assert eng.cache.pinned_blocks == 0
    events = eng.run_until_idle(0.5)
    assert any(e.kind is EventKind.FINISHED and e.request_id == "next" for e in events)
    assert not any(e.request_id == "long" for e in events)
    assert eng.stats.cancelled == 1 and not eng.cancel("long", 1.0)


def test_requests_that_can_never_fit_are_refused():
    eng = ReplicaEngine(_params(kv_capacity_tokens=4 * BS, max_model_len=1000))
    with pytest.raises(kvmodel.AdmissionError, match="KV capacity"):
        eng.admit(EngineRequest("big", 4 * BS, 1, ()), 0.0)
    with pytest.raises(kvmodel.AdmissionError, match="max_model_len"):
        eng.admit(EngineRequest("long", 990, 20, ()), 0.0)


def test_a_request_arriving_during_prefill_reuses_blocks_already_computed():
    eng = ReplicaEngine(_params(max_batched_tokens=8 * BS))
    eng.admit(_req("a", 3, 32), 0.0)
    eng.step(eng.next_event_time())  # first chunk of 8 blocks computed
    eng.step(eng.next_event_time())  # 16 blocks
    now = eng.next_event_time() - 1e-6
    eng.admit(_req("b", 3, 32), now)
    events = eng.run_until_idle(now)
    assert _first_token(events, "b").cached_tokens >= 16 * BS


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(1, 20), st.integers(1, 40), st.floats(0, 0.2)),
        min_size=1,
        max_size=40,
    ),
    st.integers(16, 64),
)
def test_cache_never_exceeds_capacity_and_all_requests_finish(reqs, capacity_blocks):
    eng = ReplicaEngine(_params(kv_capacity_tokens=capacity_blocks * BS, max_running=4, max_batched_tokens=128))
    t = 0.0
    admitted = 0
    for i, (family, blocks, out, gap) in enumerate(reqs):
        t += gap
        for _e in eng.step(t):
            assert eng.cache.used_blocks <= eng.cache.num_blocks
        req = _req(f"r{i}", family, blocks, out=out, extra_tokens=3)
        try:
            eng.admit(req, t)
            admitted += 1
        except kvmodel.AdmissionError:
            assert eng._blocks_needed(req) > capacity_blocks
        assert eng.cache.used_blocks <= eng.cache.num_blocks
    t_next = eng.next_event_time()
    finished = 0
    while t_next is not None:
        finished += sum(e.kind is EventKind.FINISHED for e in eng.step(t_next))
        assert eng.cache.used_blocks <= eng.cache.num_blocks
        assert eng.cache.pinned_blocks <= eng.cache.num_blocks
        t_next = eng.next_event_time()
    assert eng.stats.finished == admitted
    assert eng.cache.pinned_blocks == 0


def test_same_inputs_give_identical_events():
    def run():
        eng = ReplicaEngine(_params(max_running=3))
        for i in range(12):
            eng.admit(_req(f"r{i}", i % 3, 5 + i, out=3 + i % 4), i * 0.01)
        return eng.run_until_idle(), eng.stats

    assert run() == run()


def test_requests_view_shows_running_progress_then_the_waiting_queue():
    eng = ReplicaEngine(_params(max_running=1, max_batched_tokens=4 * BS))
    eng.admit(_req("a", 1, 8, out=3), 0.0)
    eng.admit(_req("b", 2, 2, out=3), 0.0)
    eng.step(eng.next_event_time())
    views = eng.requests()
    assert [(v.request.id, v.running) for v in views] == [("a", True), ("b", False)]
    assert views[0].computed_tokens == 4 * BS and views[0].prefill_left == 4 * BS
    assert views[1].computed_tokens == 0 and views[1].generated_tokens == 0
