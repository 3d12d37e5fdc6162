"""The per-replica load the controller's autoscaler reads from each router's /metrics: queued
prefill (tokens and requests without a first byte yet) and the time to first token of streams."""

from __future__ import annotations

import threading

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.router.router_fakes import chat, replica_configs, wait_for


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(url: str, name: str, **labels: str) -> float | None:
    return samples(url).get((name, tuple(sorted(labels.items()))))


def test_queued_prefill_counts_prompt_tokens_until_the_first_byte_then_drops_to_zero(replicas, make_router) -> None:
    # A first token 3 s away leaves the checks below time to read the gauges while the request
    # is still queued, even on a loaded machine.
    reps = replicas(1, ttft_s=3.0)
    rr = make_router(replica_configs(reps))
    assert value(rr.url, "gpufleet_router_queued_prefill_tokens", replica="r0") == 0
    body = chat("x " * 400, stream=True)
    t = threading.Thread(
        target=httpx.post, args=(rr.url + "/v1/chat/completions",), kwargs={"json": body, "timeout": 20}
    )
    t.start()
    assert wait_for(lambda: (value(rr.url, "gpufleet_router_queued_requests", replica="r0") or 0) == 1)
    queued = value(rr.url, "gpufleet_router_queued_prefill_tokens", replica="r0")
    assert queued is not None and queued >= 200  # ~800 characters of prompt, about 4 per token
    assert value(rr.url, "gpufleet_router_in_flight", replica="r0") == 1
    t.join()
    assert value(rr.url, "gpufleet_router_queued_prefill_tokens", replica="r0") == 0
    assert value(rr.url, "gpufleet_router_queued_requests", replica="r0") == 0


def test_time_to_first_token_is_a_histogram_of_streamed_requests_only(replicas, make_router) -> None:
    reps = replicas(1, ttft_s=0.3)
    rr = make_router(replica_configs(reps))
    httpx.post(rr.url + "/v1/chat/completions", json=chat("plain"), timeout=10)  # not streamed: no TTFT
    name = "gpufleet_router_time_to_first_token_seconds"
    assert value(rr.url, name + "_count", replica="r0") == 0
    with httpx.stream("POST", rr.url + "/v1/chat/completions", json=chat("streamed", stream=True), timeout=10) as r:
        r.read()
    assert value(rr.url, name + "_count", replica="r0") == 1
    observed = value(rr.url, name + "_sum", replica="r0")
    assert observed is not None and 0.3 <= observed < 2.0
    # Cumulative buckets: the 0.2 s bucket misses it, the 2 s bucket holds it.
    assert value(rr.url, name + "_bucket", replica="r0", le="0.2") == 0
    assert value(rr.url, name + "_bucket", replica="r0", le="2.0") == 1


def test_a_non_streamed_answer_leaves_the_prefill_queue_when_its_prefill_is_expected_to_end(
    replicas, make_router
) -> None:
    # A whole answer arrives at its end (0.2 s to the first token, then 8 tokens 0.5 s apart): its
    # first token is never seen. At the planned 1,000 tokens/s its ~200-token prompt is prefilled
    # after ~0.2 s; from then on the replica is decoding it, not holding it as queued prefill.
    reps = replicas(1, ttft_s=0.2, token_delay_s=0.5, n_tokens=8)
    cfg = [c.model_copy(update={"prefill_tokens_per_s": 1000.0}) for c in replica_configs(reps)]
    rr = make_router(cfg)
    t = threading.Thread(
        target=httpx.post, args=(rr.url + "/v1/chat/completions",), kwargs={"json": chat("x " * 400), "timeout": 20}
    )
    t.start()
    assert wait_for(lambda: value(rr.url, "gpufleet_router_in_flight", replica="r0") == 1)
    assert wait_for(
        lambda: (
            value(rr.url, "gpufleet_router_queued_prefill_tokens", replica="r0") == 0
            and value(rr.url, "gpufleet_router_in_flight", replica="r0") == 1
        )
    )
    assert value(rr.url, "gpufleet_router_queued_requests", replica="r0") == 0
    t.join()
    assert value(rr.url, "gpufleet_router_in_flight", replica="r0") == 0
    assert value(rr.url, "gpufleet_router_queued_prefill_tokens", replica="r0") == 0
