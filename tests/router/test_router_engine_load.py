"""Engine-reported load: the /metrics parser, the scraper against replica-sim over loopback, the router's use of it."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time

import aiohttp
import httpx
import pytest

from gpufleet.router.config import ReplicaConfig
from gpufleet.router.engine_load import EngineLoad, EngineLoadScraper, parse_engine_load
from gpufleet.router.replica import SimSettings, serve_in_thread
from gpufleet.router.types import ReplicaState
from tests.router.router_fakes import wait_for

SGLANG = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen",engine_type="unified",dp_rank="0"} 5.0
sglang:num_running_reqs{model_name="qwen",engine_type="unified",dp_rank="1"} 3.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen",engine_type="unified",dp_rank="0"} 2.0
sglang:num_queue_reqs{model_name="qwen",engine_type="unified",dp_rank="1"} 1.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="qwen",engine_type="unified",dp_rank="0"} 0.5
sglang:token_usage{model_name="qwen",engine_type="unified",dp_rank="1"} 0.25
# HELP sglang:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE sglang:time_to_first_token_seconds histogram
sglang:time_to_first_token_seconds_bucket{le="0.1",model_name="qwen"} 3.0
"""

VLLM_V0 = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 4.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 0.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.9
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{reason="capacity"} 7.0
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SGLANG, EngineLoad(waiting=3, running=8, kv_usage=0.375)),  # data-parallel ranks summed
        (VLLM_V0, EngineLoad(waiting=0, running=4, kv_usage=0.9)),  # v0's usage name; a longer name ignored
        ("vllm:num_requests_waiting 2\n", EngineLoad(waiting=2, running=0, kv_usage=None)),
        ("# only comments\nother_metric 1\n", None),  # no load gauge at all
        ("vllm:num_requests_running{model_name=m 3\n", None),  # malformed line
        ("", None),
    ],
)
def test_parse_engine_load(text: str, expected: EngineLoad | None) -> None:
    assert parse_engine_load(text) == expected


def _settings(**kw) -> SimSettings:  # type: ignore[no-untyped-def]
    base = dict(
        model="m",
        replica_id="r0",
        kv_capacity_tokens=16_384,
        prefill_tokens_per_s=50_000.0,
        decode_tokens_per_s=100.0,
        max_running=2,
        max_model_len=4096,
    )
    base.update(kw)
    return SimSettings(**base)


async def _scrape_once(state: ReplicaState, **kw) -> tuple[EngineLoad | None, list[str]]:  # type: ignore[no-untyped-def]
    results: list[str] = []
    async with aiohttp.ClientSession() as session:
        scraper = EngineLoadScraper(
            lambda: [state], session, interval_s=0.05, timeout_s=1.0, on_result=lambda r, res: results.append(res), **kw
        )
        return await scraper.scrape(state), results


def test_the_scraper_reads_replica_sims_vllm_gauges_over_loopback() -> None:
    with serve_in_thread(_settings()) as rep:
        state = ReplicaState(id="r0", model="m", url=rep.url)
        idle, results = asyncio.run(_scrape_once(state))
        assert idle == EngineLoad(waiting=0, running=0, kv_usage=0.0) and results == ["ok"]
        body = {"model": "m", "prompt": "z" * 400, "max_tokens": 40, "ignore_eos": True}
        # Six requests sent around the router (another router's traffic): two run, four wait.
        with cf.ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(httpx.post, rep.url + "/v1/completions", json=body, timeout=20) for _ in range(6)]
            assert wait_for(lambda: rep.call(lambda s: s.engine.num_waiting) == 4, timeout=10)
            busy, _ = asyncio.run(_scrape_once(state, clock=lambda: 42.0))
            assert busy is not None and (busy.waiting, busy.running) == (4, 2) and busy.kv_usage > 0
            # None of it was this router's: all of it is other routers' load.
            assert state.engine_sampled_at == 42.0 and state.foreign_load() == (4, 2)
            assert all(f.result().status_code == 200 for f in futs)


def test_a_replica_that_cannot_be_read_keeps_its_last_sample_and_counts_a_failure() -> None:
    state = ReplicaState(id="r0", model="m", url="http://127.0.0.1:9")  # nothing listens on port 9
    state.report_engine_load(1, 2, 0.5, now=7.0)
    load, results = asyncio.run(_scrape_once(state))
    assert load is None and results == ["failed"]
    assert (state.engine_waiting, state.engine_running, state.engine_sampled_at) == (1, 2, 7.0)


def test_own_requests_at_the_sample_are_not_counted_as_foreign() -> None:
    r = ReplicaState(id="r", model="m")
    for _ in range(3):
        r.begin(100)  # three of ours, one past its first token
    r.prefill_done(100)
    r.report_engine_load(waiting=4, running=3, kv_usage=None, now=0.0)
    # Ours: 3 in flight, 2 without a first token; the engine holds 7, 4 waiting.
    assert r.foreign_load() == (2, 2)
    r.end()  # ours finishing later does not make the sample's foreign load grow
    assert r.foreign_load() == (2, 2)


def test_a_router_scrapes_its_replicas_and_shows_the_engine_load(make_router) -> None:
    with serve_in_thread(_settings(replica_id="a")) as rep:
        cfg = [
            ReplicaConfig(
                id="a",
                url=rep.url,
                deployment="d",
                model="m",
                pool="p",
                priority=0,
                kv_capacity_tokens=16_384,
                max_model_len=4096,
                max_concurrent_requests=8,
                prefill_tokens_per_s=50_000.0,
                decode_tokens_per_s=100.0,
            )
        ]
        rr = make_router(cfg, settings={"engine_metrics_interval_s": 0.05}, admin_token="t")
        state = rr.router.replicas[0]
        assert state.prefill_tokens_per_s == 50_000.0 and state.decode_tokens_per_s == 100.0
        assert wait_for(lambda: state.engine_sampled_at > float("-inf"), timeout=5)
        t0 = state.engine_sampled_at
        assert wait_for(lambda: state.engine_sampled_at > t0, timeout=5)  # again, every interval
        view = httpx.get(rr.url + "/admin/replicas", headers={"Authorization": "Bearer t"}).json()
        load = view["replicas"][0]["engine_load"]
        assert load["waiting"] == 0 and load["running"] == 0 and 0 <= load["age_s"] < 2
        metrics = httpx.get(rr.url + "/metrics").text
        assert 'gpufleet_router_engine_metrics_scrapes_total{replica="a",result="ok"}' in metrics


def test_engine_metrics_interval_zero_turns_the_scraper_off(make_router) -> None:
    with serve_in_thread(_settings(replica_id="a")) as rep:
        cfg = [
            ReplicaConfig(
                id="a",
                url=rep.url,
                deployment="d",
                model="m",
                pool="p",
                priority=0,
                kv_capacity_tokens=16_384,
                max_model_len=4096,
                max_concurrent_requests=8,
            )
        ]
        rr = make_router(cfg, settings={"engine_metrics_interval_s": 0})
        time.sleep(0.3)
        assert rr.router.replicas[0].engine_sampled_at == float("-inf")
