"""replica-sim with a CPU KV tier over real loopback HTTP: a prefix the GPU evicted comes back
from the CPU tier, and `usage` and `/metrics` say which tier served it."""

from __future__ import annotations

import httpx

from gpufleet.router.replica import SimSettings, serve_in_thread

SYSTEM_A = "Alpha system prompt with a long shared preamble. " * 30
SYSTEM_B = "Bravo system prompt, another long shared preamble. " * 30


def _chat(system: str, user: str) -> dict:
    return {
        "model": "m",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 2,
    }


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def _settings(**kw) -> SimSettings:
    # ~400 tokens per prompt; the GPU holds 512 tokens: the second prompt evicts the first.
    base = dict(
        model="m",
        kv_capacity_tokens=512,
        prefill_tokens_per_s=20_000.0,
        decode_tokens_per_s=2_000.0,
        max_model_len=512,
    )
    base.update(kw)
    return SimSettings(**base)


def test_an_evicted_prefix_is_served_from_the_cpu_tier_and_usage_splits_cached_tokens_by_tier():
    with serve_in_thread(_settings(cpu_kv_capacity_tokens=8192, cpu_load_tokens_per_s=1_000_000.0)) as r:
        with httpx.Client(base_url=r.url, timeout=10) as c:
            c.post("/v1/chat/completions", json=_chat(SYSTEM_A, "one"))
            c.post("/v1/chat/completions", json=_chat(SYSTEM_B, "two"))
            again = c.post("/v1/chat/completions", json=_chat(SYSTEM_A, "three")).json()
            details = again["usage"]["prompt_tokens_details"]
            tiers = details["gpufleet_cached_tokens_by_tier"]
            assert tiers["cpu"] > 0
            assert tiers["gpu"] + tiers["cpu"] + tiers["disk"] == details["cached_tokens"]
            metrics = c.get("/metrics").text
            assert _metric(metrics, "vllm:external_prefix_cache_hits_total") == tiers["cpu"]


def test_without_a_tier_the_evicted_prefix_is_recomputed():
    with serve_in_thread(_settings()) as r:
        with httpx.Client(base_url=r.url, timeout=10) as c:
            c.post("/v1/chat/completions", json=_chat(SYSTEM_A, "one"))
            c.post("/v1/chat/completions", json=_chat(SYSTEM_B, "two"))
            again = c.post("/v1/chat/completions", json=_chat(SYSTEM_A, "three")).json()
            details = again["usage"]["prompt_tokens_details"]
            assert "gpufleet_cached_tokens_by_tier" not in details
            assert "vllm:external_prefix_cache_hits" not in c.get("/metrics").text
