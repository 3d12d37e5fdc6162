"""End to end: the router in front of `gpufleet.router.replica` replicas (vLLM-compatible)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest

from gpufleet.router.config import ReplicaConfig
from gpufleet.router.replica import RunningReplica, SimSettings
from tests.router.router_fakes import chat

KV_TOKENS = 20_000


@pytest.fixture
def sim_factory() -> Iterator[Callable[[int], list[RunningReplica]]]:
    """Factory of fresh (empty-cache) replica-sims on loopback, stopped at teardown."""
    started: list[RunningReplica] = []

    def make(n: int) -> list[RunningReplica]:
        reps = [
            RunningReplica(
                SimSettings(
                    model="m",
                    replica_id=f"sim{i}",
                    kv_capacity_tokens=KV_TOKENS,
                    prefill_tokens_per_s=400_000,
                    decode_tokens_per_s=5_000,
                    max_model_len=8192,
                )
            ).start()
            for i in range(n)
        ]
        started.extend(reps)
        return reps

    yield make
    for r in started:
        r.stop()


@pytest.fixture
def sims(sim_factory) -> list[RunningReplica]:  # type: ignore[no-untyped-def]
    return sim_factory(3)


def configs(reps: list[RunningReplica]) -> list[ReplicaConfig]:
    return [
        ReplicaConfig(
            id=r.settings.replica_id,
            url=r.url,
            deployment="d",
            model="m",
            pool="p",
            priority=0,
            kv_capacity_tokens=KV_TOKENS,
            max_model_len=8192,
            max_concurrent_requests=32,
        )
        for r in reps
    ]


def hit_ratio(metrics: str) -> float:
    cached = prompt = 0.0
    for line in metrics.splitlines():
        if line.startswith("gpufleet_router_replica_cached_tokens_total{"):
            cached += float(line.split()[-1])
        elif line.startswith("gpufleet_router_replica_prompt_tokens_total{"):
            prompt += float(line.split()[-1])
    return cached / prompt


def run_workload(url: str) -> Counter[str]:
    """Seven system prompts of ~500 tokens, 42 sequential requests: prefix reuse decides hits.

    Seven prefixes over three replicas, so round robin cannot line a prefix up with a replica.
    """
    systems = [f"You are assistant number {k}; follow policy {k} carefully. " * 40 for k in range(7)]
    placed: Counter[str] = Counter()
    with httpx.Client(timeout=30) as c:
        for i in range(42):
            r = c.post(url + "/v1/chat/completions", json=chat(f"question {i}", system=systems[i % 7], max_tokens=4))
            assert r.status_code == 200, r.text
            placed[r.headers["x-gpufleet-replica"]] += 1
    return placed


@pytest.mark.slow
def test_cache_aware_gets_more_replica_reported_prefix_hits_than_round_robin(sim_factory, make_router) -> None:
    ca = make_router(configs(sim_factory(3)), settings={"policy": "cache_aware"})
    run_workload(ca.url)
    ca_ratio = hit_ratio(httpx.get(ca.url + "/metrics").text)
    rr = make_router(configs(sim_factory(3)), settings={"policy": "round_robin"})
    run_workload(rr.url)
    rr_ratio = hit_ratio(httpx.get(rr.url + "/metrics").text)
    # cache_aware misses only the first request of each prefix (7 of 42); round robin spreads
    # every prefix over all three replicas, so each prefix misses up to three times
    assert ca_ratio > rr_ratio
    assert ca_ratio > 0.7


@pytest.mark.slow
def test_replica_sim_dying_mid_run_is_routed_around(sims, make_router) -> None:
    rr = make_router(configs(sims), settings={"policy": "round_robin", "health": {"interval_s": 60}})
    with httpx.Client(timeout=30) as c:
        for i in range(6):
            assert c.post(rr.url + "/v1/chat/completions", json=chat(f"a{i}", max_tokens=4)).status_code == 200
        sims[1].stop()
        got = [c.post(rr.url + "/v1/chat/completions", json=chat(f"b{i}", max_tokens=4)) for i in range(9)]
    assert all(g.status_code == 200 for g in got)
    assert "sim1" not in {g.headers["x-gpufleet-replica"] for g in got}
    assert not rr.router.replicas[1].healthy


@pytest.mark.slow
def test_streaming_through_router_from_replica_sim_reports_cached_tokens(sims, make_router) -> None:
    rr = make_router(configs(sims[:1]))
    body = chat("stream please", system="S" * 2000, max_tokens=6, stream=True, stream_options={"include_usage": True})
    for _ in range(2):
        with httpx.stream("POST", rr.url + "/v1/chat/completions", json=body, timeout=30) as s:
            lines = [ln for ln in s.iter_lines() if ln.startswith("data:")]
        assert lines[-1] == "data: [DONE]"
    metrics = httpx.get(rr.url + "/metrics").text
    cached = [
        ln
        for ln in metrics.splitlines()
        if ln.startswith('gpufleet_router_replica_cached_tokens_total{replica="sim0"}')
    ]
    assert float(cached[0].split()[-1]) >= 400  # the second stream reused the 2000-char system prompt
