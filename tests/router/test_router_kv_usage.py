"""The replicas' KV-usage signal: parsing vLLM's gauge, the index limit, and the live scrape."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from gpufleet.router.config import ReplicaConfig
from gpufleet.router.health import parse_kv_usage
from gpufleet.router.prefix import PrefixIndex
from gpufleet.router.replica import RunningReplica, SimSettings
from gpufleet.router.types import ReplicaState
from tests.router.router_fakes import chat

KV_TOKENS = 20_000


# -- units ------------------------------------------------------------------------------------
def test_parse_kv_usage_reads_vllm_gauge_and_prefers_the_v1_name() -> None:
    text = (
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75\n'
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.9\n'
        'vllm:kv_cache_usage_perc_other{model_name="m"} 0.1\n'
    )
    assert parse_kv_usage(text) == 0.5  # the two engines' series averaged, v0 name ignored


def test_parse_kv_usage_falls_back_to_the_v0_name_and_clamps() -> None:
    assert parse_kv_usage('vllm:gpu_cache_usage_perc{model_name="m"} 1.2\n') == 1.0
    assert parse_kv_usage("vllm:gpu_cache_usage_perc 0.3\n") == 0.3


def test_parse_kv_usage_is_none_without_the_metric_or_with_garbage() -> None:
    assert parse_kv_usage("vllm:num_requests_running 3\n") is None
    assert parse_kv_usage('vllm:kv_cache_usage_perc{model_name="m"} oops\n') is None
    assert parse_kv_usage("vllm:kv_cache_usage_perc NaN\n") is None


def test_report_kv_usage_clamps_and_counts_samples() -> None:
    r = ReplicaState("r", "m")
    assert r.kv_usage is None and r.kv_usage_samples == 0
    r.report_kv_usage(1.5)
    r.report_kv_usage(-0.1)
    assert r.kv_usage == 0.0 and r.kv_usage_samples == 2


def test_index_limit_shrinks_capacity_evicting_least_recent_blocks_for_good() -> None:
    idx = PrefixIndex(100)
    idx.insert(list(range(1, 41)))  # one prompt, 40 blocks
    idx.insert(list(range(101, 141)))  # a later prompt, 40 blocks
    idx.limit(50)  # the replica reports memory for only 50 cached blocks
    assert idx.effective_blocks == 50 and len(idx) == 50
    assert idx.match(list(range(101, 141))) == 40  # the most recent prompt survives whole
    assert idx.match(list(range(1, 41))) == 10  # the older one keeps its head (tails go first)
    idx.limit(100)  # memory freed up: room for new blocks, but evicted ones do not return
    assert len(idx) == 50 and idx.match(list(range(1, 41))) == 10
    idx.insert(list(range(201, 251)))
    assert len(idx) == 100
    idx.limit(1_000)
    assert idx.effective_blocks == 100  # never above the declared capacity
    idx.limit(-5)
    assert idx.effective_blocks == 0 and len(idx) == 0


# -- live: the router scrapes replica-sim's /metrics over loopback ----------------------------
@pytest.fixture
def slow_sim() -> Iterator[RunningReplica]:
    """A replica-sim that decodes slowly, so a request keeps its KV memory while we look."""
    rep = RunningReplica(
        SimSettings(
            model="m",
            replica_id="sim0",
            kv_capacity_tokens=KV_TOKENS,
            prefill_tokens_per_s=400_000,
            decode_tokens_per_s=20,
            max_model_len=8192,
        )
    ).start()
    yield rep
    rep.stop()


def _config(rep: RunningReplica) -> list[ReplicaConfig]:
    return [
        ReplicaConfig(
            id="sim0",
            url=rep.url,
            deployment="d",
            model="m",
            pool="p",
            priority=0,
            kv_capacity_tokens=KV_TOKENS,
            max_model_len=8192,
            max_concurrent_requests=8,
        )
    ]


def _replica_gauge(rep: RunningReplica) -> float | None:
    return parse_kv_usage(httpx.get(rep.url + "/metrics").text)


def _admin_kv_usage(url: str) -> float | None:
    r = httpx.get(url + "/admin/replicas", headers={"Authorization": "Bearer tok"})
    assert r.status_code == 200, r.text
    return r.json()["replicas"][0]["kv_usage"]


def _wait_for(pred, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


@pytest.mark.slow
def test_router_reads_the_replicas_kv_usage_gauge_over_loopback(slow_sim, make_router) -> None:
    rr = make_router(
        _config(slow_sim), settings={"health": {"interval_s": 0.1, "scrape_kv_usage": True}}, admin_token="tok"
    )
    _wait_for(lambda: _admin_kv_usage(rr.url) is not None)
    assert _admin_kv_usage(rr.url) == 0.0  # idle replica: nothing in use

    stop = threading.Event()

    def stream() -> None:
        body = chat("x", system="long system prompt " * 600, max_tokens=2_000, stream=True)
        with httpx.Client(timeout=60) as c, c.stream("POST", rr.url + "/v1/chat/completions", json=body) as resp:
            for _ in resp.iter_lines():
                if stop.is_set():
                    break

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    try:
        # While the request runs its prompt + output stay reserved, so the gauge is constant.
        _wait_for(lambda: (_replica_gauge(slow_sim) or 0.0) > 0.0)
        expected = _replica_gauge(slow_sim)
        _wait_for(lambda: _admin_kv_usage(rr.url) == expected)
        state = rr.router.replicas[0]
        assert state.kv_usage == expected and 0.0 < expected < 1.0
        assert state.kv_usage_samples >= 2
    finally:
        stop.set()
        t.join(timeout=30)


@pytest.mark.slow
def test_router_does_not_scrape_kv_usage_unless_asked(slow_sim, make_router) -> None:
    rr = make_router(_config(slow_sim), settings={"health": {"interval_s": 0.05}}, admin_token="tok")
    # Health checks run (the replica is re-checked many times) but the metric is never read.
    before = httpx.get(slow_sim.url + "/metrics").text
    time.sleep(0.5)
    assert _admin_kv_usage(rr.url) is None
    assert rr.router.replicas[0].kv_usage_samples == 0
    assert "vllm:kv_cache_usage_perc" in before  # the replica does export it
