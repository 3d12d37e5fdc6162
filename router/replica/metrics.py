"""The simulated replica's Prometheus metrics, under vLLM's names, on a registry of its own.

Counters and gauges are read from the engine at scrape time (`vllm:num_requests_running`,
`vllm:kv_cache_usage_perc`, `vllm:prefix_cache_hits_total`, ...); histograms are observed as
requests finish (`record`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gpufleet.router import kvmodel

__all__ = ["ReplicaMetrics"]

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0)
_TOKENS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


class _EngineCollector(Collector):
    """Reads the engine's cumulative counters and gauges at scrape time."""

    def __init__(self, engine: kvmodel.ReplicaEngine, model: str, finished_by_reason: dict[str, int]) -> None:
        self._engine = engine
        self._model = model
        self._finished_by_reason = finished_by_reason

    def collect(self) -> Iterator[Any]:
        labels = [self._model]
        eng, st = self._engine, self._engine.stats

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", eng.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", eng.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", eng.kv_usage)
        yield gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage (vLLM v0 name).", eng.kv_usage)
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in queried tokens.", st.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in cached tokens.", st.prefix_cache_hits)
        if eng.cpu is not None:
            # vLLM's names for the hits a KV connector (the offload tier) serves.
            yield counter(
                "vllm:external_prefix_cache_queries",
                "External prefix cache queries, in queried tokens.",
                st.prefix_cache_queries - st.prefix_cache_hits,
            )
            yield counter(
                "vllm:external_prefix_cache_hits",
                "External prefix cache hits (CPU and disk tiers), in cached tokens.",
                st.cpu_cache_hits + st.disk_cache_hits,
            )
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", st.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", st.generation_tokens)
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions (never: memory is reserved).", 0)
        ok = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=["model_name", "finished_reason"],
        )
        for reason, n in sorted(self._finished_by_reason.items()):
            ok.add_metric([self._model, reason], n)
        yield ok
        yield counter("gpufleet_sim:cancelled_requests", "Requests cancelled by client disconnect.", st.cancelled)
        yield counter("gpufleet_sim:evicted_blocks", "KV blocks evicted from the prefix cache.", st.evicted_blocks)
        yield gauge(
            "gpufleet_sim:cached_blocks", "Hashed KV blocks held (pinned or evictable).", eng.cache.cached_blocks
        )


class ReplicaMetrics:
    """The registry of one simulated replica and the histograms observed per finished request."""

    def __init__(self, engine: kvmodel.ReplicaEngine, model: str) -> None:
        self.finished_by_reason: dict[str, int] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(engine, model, self.finished_by_reason))

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            # one child per replica: the model label is fixed, so bind it once
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry).labels(model)

        self._h_ttft = hist("vllm:time_to_first_token_seconds", "Time to first token in seconds.", _TTFT_BUCKETS)
        self._h_e2e = hist(
            "vllm:e2e_request_latency_seconds", "End to end request latency in seconds.", _LATENCY_BUCKETS
        )
        self._h_tpot = hist("vllm:time_per_output_token_seconds", "Time per output token in seconds.", _TTFT_BUCKETS)
        self._h_prompt = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", _TOKENS_BUCKETS)
        self._h_gen = hist("vllm:request_generation_tokens", "Number of generation tokens processed.", _TOKENS_BUCKETS)

    def record(
        self, finish_reason: str, prompt_tokens: int, arrival: float, first: float | None, end: float, generated: int
    ) -> None:
        """Count a finished request (times on the engine's axis; `first` is None without a first token)."""
        self.finished_by_reason[finish_reason] = self.finished_by_reason.get(finish_reason, 0) + 1
        self._h_e2e.observe(end - arrival)
        self._h_prompt.observe(prompt_tokens)
        self._h_gen.observe(generated)
        if first is not None:
            self._h_ttft.observe(first - arrival)
            if generated > 1:
                self._h_tpot.observe((end - first) / (generated - 1))

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
