"""What `gpufleet demo` needs of the workload library: the ceiling, open-loop arrivals, spread conversations."""

from __future__ import annotations

import asyncio
import time

import pytest

from gpufleet.router.replica import SimSettings, serve_in_thread
from gpufleet.router.workloads import driver, mixed, sampling, stats
from gpufleet.router.workloads.ceiling import ceiling_hit_ratio
from gpufleet.router.workloads.mixed import WorkloadSpec
from gpufleet.router.workloads.types import WorkRequest


def _req(i: int, model: str, text: str) -> WorkRequest:
    return WorkRequest(
        index=i, kind="system", model=model, body={"model": model, "messages": [{"role": "user", "content": text}]}
    )


def test_ceiling_counts_repeated_prefixes_per_model_and_never_the_last_token():
    text = "x" * 64 * 10  # 10 blocks of 16 tokens x 4 chars
    reqs = [_req(0, "a", text), _req(1, "a", text), _req(2, "b", text)]
    # the rendered prompt adds the role and separators: count its real length
    from gpufleet.router.prefix import render_prompt

    n_tokens = -(-len(render_prompt(reqs[0].body)) // 4)
    full_blocks = n_tokens // 16
    expected_hit = min(full_blocks, (n_tokens - 1) // 16) * 16
    total = 3 * n_tokens
    # model b's first sight of the same text is a miss: caches never cross deployments
    assert ceiling_hit_ratio(reqs) == pytest.approx(expected_hit / total)
    assert ceiling_hit_ratio(reqs, model="b") == 0.0


def test_ceiling_equals_what_one_replica_with_an_unbounded_cache_reports():
    # one request at a time against one replica whose KV holds everything: it reaches the ceiling exactly
    reqs = mixed.generate(mixed.demo_spec(("m",), 40, seed=5, max_tokens=2))
    sim = SimSettings(
        model="m", kv_capacity_tokens=10_000_000, prefill_tokens_per_s=5_000_000, decode_tokens_per_s=100_000
    )
    with serve_in_thread(sim) as r:
        results = asyncio.run(driver.drive(r.url, reqs, concurrency=1))
    s = stats.summarize(results)
    assert s.errors == 0
    assert s.prefix_hit_ratio == pytest.approx(ceiling_hit_ratio(reqs))
    assert 0.3 < s.prefix_hit_ratio < 1


def test_open_loop_sends_each_request_no_earlier_than_its_arrival():
    reqs = mixed.generate(WorkloadSpec(models=("m",), n_requests=12, seed=2, max_tokens=2))
    due = sampling.arrival_times(len(reqs), 40.0, seed=7)
    assert due == sorted(due) and due == sampling.arrival_times(len(reqs), 40.0, seed=7)
    with serve_in_thread(SimSettings(model="m", prefill_tokens_per_s=1_000_000, decode_tokens_per_s=100_000)) as r:
        t0 = time.perf_counter()
        results = asyncio.run(driver.drive(r.url, reqs, concurrency=4, rate_per_s=40.0, arrival_seed=7))
        wall = time.perf_counter() - t0
    assert all(x.ok for x in results)
    assert all(x.sent_s >= d for x, d in zip(results, due))  # none was sent before it arrived
    assert wall >= due[-1]
    with pytest.raises(ValueError, match="positive"):
        asyncio.run(driver.drive(r.url, reqs, rate_per_s=0))


def test_spread_conversations_overlap_keep_turn_order_and_leave_the_default_alone():
    spec = WorkloadSpec(models=("m",), n_requests=120, seed=1, turns_per_conversation=4, conversation_span=0.5)
    reqs = mixed.generate(spec)
    assert [r.index for r in reqs] == list(range(120))
    chains: dict[str, list[WorkRequest]] = {}
    for r in reqs:
        if r.chain:
            chains.setdefault(r.chain, []).append(r)
    spans = []
    for turns in chains.values():
        for prev, nxt in zip(turns, turns[1:]):
            assert nxt.body["messages"][: len(prev.body["messages"])] == prev.body["messages"]
        spans.append((turns[0].index, turns[-1].index))
    # conversations interleave with each other and with everything else, not one after another
    assert any(a0 < b0 < a1 for a0, a1 in spans for b0, _ in spans)
    assert max(a1 - a0 for a0, a1 in spans) > 20
    # the same requests as the compact interleave, only reordered
    compact = mixed.generate(WorkloadSpec(models=("m",), n_requests=120, seed=1, turns_per_conversation=4))
    assert sorted(str(r.body) for r in reqs) == sorted(str(r.body) for r in compact)
    with pytest.raises(ValueError, match="conversation_span"):
        WorkloadSpec(models=("m",), conversation_span=0)


def test_summarize_by_model_splits_results():
    rs = [
        driver.Result(0, "system", "a", status=200, replica="r1", prompt_tokens=100, cached_tokens=50, ttft_s=0.1),
        driver.Result(1, "system", "b", status=200, replica="r2", prompt_tokens=100, cached_tokens=0, ttft_s=0.2),
        driver.Result(2, "system", "a", status=503, error="down"),
    ]
    by = stats.summarize_by_model(rs)
    assert list(by) == ["a", "b"]
    assert (by["a"].requests, by["a"].errors, by["a"].prefix_hit_ratio) == (2, 1, 0.5)
    assert by["b"].per_replica == {"r2": 1}


def test_conversations_draw_their_system_prompt_by_popularity_when_asked():
    def systems(how: str) -> set[str]:
        spec = WorkloadSpec(
            models=("m",), n_requests=200, seed=4, mix=(0, 0, 1), turns_per_conversation=2, chat_system_prompts=how
        )
        return {r.body["messages"][0]["content"].split(":")[0] for r in mixed.generate(spec)}

    assert systems("top") == {"System prompt 0 for m"}  # one chat app
    assert len(systems("zipf")) > 2  # several apps' conversations
    with pytest.raises(ValueError, match="chat_system_prompts"):
        WorkloadSpec(models=("m",), chat_system_prompts="all")
