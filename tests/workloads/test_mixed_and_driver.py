"""The demo's traffic generator (`workloads.mixed`) and the HTTP driver, the driver over real loopback HTTP."""

from __future__ import annotations

import asyncio

from gpufleet.router.replica import SimSettings, serve_in_thread
from gpufleet.router.workloads import ceiling, driver, generators, mixed, sampling, stats, types
from gpufleet.router.workloads.mixed import WorkloadSpec


def test_same_seed_same_workload_and_different_seed_differs():
    spec = WorkloadSpec(models=("a", "b"), n_requests=60, seed=3)
    assert mixed.generate(spec) == mixed.generate(spec)
    other = mixed.generate(WorkloadSpec(models=("a", "b"), n_requests=60, seed=4))
    assert [r.body for r in other] != [r.body for r in mixed.generate(spec)]


def test_mix_sizes_and_model_weights():
    reqs = mixed.generate(
        WorkloadSpec(models=("a", "b"), n_requests=100, mix=(0.5, 0.3, 0.2), model_weights=(1.0, 0.0))
    )
    kinds = [r.kind for r in reqs]
    assert len(reqs) == 100
    assert (kinds.count("system"), kinds.count("rag"), kinds.count("chat")) == (50, 30, 20)
    assert {r.model for r in reqs} == {"a"}


def test_conversation_turns_extend_the_previous_prompt_and_keep_order():
    reqs = mixed.generate(WorkloadSpec(models=("m",), n_requests=40, mix=(0, 0, 1), turns_per_conversation=4))
    chains: dict[str, list[types.WorkRequest]] = {}
    for r in reqs:
        assert r.kind == "chat" and r.session_id and r.chain
        chains.setdefault(r.chain, []).append(r)
    assert len(chains) == 10
    for turns in chains.values():
        assert [t.index for t in turns] == sorted(t.index for t in turns)
        for prev, nxt in zip(turns, turns[1:]):
            assert nxt.body["messages"][: len(prev.body["messages"])] == prev.body["messages"]
            assert nxt.session_id == prev.session_id


def test_popular_prefixes_recur():
    reqs = mixed.generate(WorkloadSpec(models=("m",), n_requests=200, mix=(1, 0, 0), n_system_prompts=5))
    firsts = [r.body["messages"][0]["content"] for r in reqs]
    counts = sorted((firsts.count(x) for x in set(firsts)), reverse=True)
    assert len(counts) == 5 and counts[0] > 2 * counts[-1]  # Zipf: the top prompt dominates


def test_percentile_nearest_rank():
    assert stats.percentile([], 50) is None
    assert stats.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert stats.percentile([float(i) for i in range(1, 101)], 99) == 99.0


def test_drive_against_a_replica_records_cached_tokens_and_ttft():
    spec = WorkloadSpec(models=("m",), n_requests=30, seed=1, max_tokens=4)
    reqs = mixed.generate(spec)
    with serve_in_thread(SimSettings(model="m", prefill_tokens_per_s=100_000, decode_tokens_per_s=2_000)) as r:
        results = asyncio.run(driver.drive(r.url, reqs, concurrency=4))
    assert [x.index for x in results] == [x.index for x in reqs]
    assert all(x.ok for x in results), [x.error for x in results if not x.ok]
    assert all(x.ttft_s is not None and x.ttft_s <= x.latency_s for x in results)
    assert all(x.prompt_tokens > 0 for x in results)
    s = stats.summarize(results)
    assert s.requests == 30 and s.errors == 0
    assert 0 < s.prefix_hit_ratio < 1  # shared prompts hit, first sightings miss
    assert s.ttft_p50_s is not None and s.ttft_p99_s >= s.ttft_p50_s


def test_drive_reports_http_errors_per_request():
    reqs = mixed.generate(WorkloadSpec(models=("unknown-model",), n_requests=3))
    with serve_in_thread(SimSettings(model="m")) as r:
        results = asyncio.run(driver.drive(r.url, reqs, concurrency=2))
    assert [x.status for x in results] == [404, 404, 404]
    assert stats.summarize(results).errors == 3


def test_public_api_is_pinned():
    api = {m.__name__.rsplit(".", 1)[1]: set(m.__all__) for m in (types, sampling, mixed, driver, stats, ceiling)}
    assert api == {
        "types": {"MODEL", "SimRequest", "WorkRequest", "Workload"},
        "sampling": {"TextPool", "WeightedSampler", "arrival_times", "prose", "zipf_weights"},
        "mixed": {"WorkloadSpec", "demo_spec", "generate"},
        "driver": {"Result", "drive"},
        "stats": {"Summary", "percentile", "summarize", "summarize_by_model"},
        "ceiling": {"ceiling_hit_ratio"},
    }
    assert set(generators.__all__) == {
        "WORKLOADS",
        "demo",
        "expected_shared_fraction",
        "hot_prefix",
        "make_workload",
        "mix",
        "multiturn",
        "rag",
        "shared_prompts",
    }
    # what the demo's old single module exported, every name still public in one place
    assert set().union(*api.values()) >= {
        "Result",
        "Summary",
        "WorkRequest",
        "WorkloadSpec",
        "drive",
        "generate",
        "percentile",
        "summarize",
        "arrival_times",
        "ceiling_hit_ratio",
        "demo_spec",
        "summarize_by_model",
    }
