"""The router's Prometheus metrics, on a registry of its own (no global state).

Names are prefixed `gpufleet_router_`. Replica-labelled children are created once per replica
at start-up so the request path does not pay for label lookups.

What the controller's autoscaler reads from every router pod (`infra/controller/router_load.py`),
each per replica and each counting only this router's own requests (the controller sums them
over the router pods):

    gpufleet_router_in_flight                            requests in flight (gauge)
    gpufleet_router_queued_prefill_tokens                estimated uncached prompt tokens of requests
                                                         sent that have no first byte yet (gauge)
    gpufleet_router_queued_requests                      those requests (gauge)
    gpufleet_router_time_to_first_token_seconds          streamed requests: routing to the first
                                                         SSE chunk (histogram, same buckets everywhere
                                                         so the controller can add them up)

The two queued gauges are read from the replicas' state at scrape time (`watch_replicas`), so the
request path does not update them twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gpufleet.router.types import ReplicaState

__all__ = ["TTFT_BUCKETS", "ReplicaMetrics", "RouterMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 1.5, 2, 2.5, 5, 7.5, 10, 20, 40, 80)
"""vLLM's `vllm:time_to_first_token_seconds` buckets: fine below a second, where TTFT targets sit."""


class _QueuedCollector(Collector):
    """The replicas' queued prefill (tokens, requests) as gauges, read when scraped."""

    def __init__(self, source: Callable[[], Iterable[ReplicaState]]) -> None:
        self.source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        tokens = GaugeMetricFamily(
            "gpufleet_router_queued_prefill_tokens",
            "Estimated uncached prompt tokens of this router's requests to a replica without a first byte yet",
            labels=["replica"],
        )
        requests = GaugeMetricFamily(
            "gpufleet_router_queued_requests",
            "This router's requests to a replica without a first byte yet",
            labels=["replica"],
        )
        for r in self.source():
            tokens.add_metric([r.id], r.queued_prefill_tokens)
            requests.add_metric([r.id], r.queued_requests)
        yield tokens
        yield requests


class ReplicaMetrics:
    """The label children of one replica, resolved once (label lookups cost on the hot path)."""

    __slots__ = (
        "in_flight",
        "latency",
        "predicted_hit_tokens",
        "prompt_tokens",
        "reported_cached_tokens",
        "reported_prompt_tokens",
        "time_to_first_token",
        "ttft",
    )

    def __init__(self, m: RouterMetrics, rid: str) -> None:
        self.latency = m.latency.labels(rid)
        self.ttft = m.ttft.labels(rid)
        self.time_to_first_token = m.time_to_first_token.labels(rid)
        self.in_flight = m.in_flight.labels(rid)
        self.predicted_hit_tokens = m.predicted_hit_tokens.labels(rid)
        self.prompt_tokens = m.prompt_tokens.labels(rid)
        self.reported_cached_tokens = m.reported_cached_tokens.labels(rid)
        self.reported_prompt_tokens = m.reported_prompt_tokens.labels(rid)


class RouterMetrics:
    """All metrics of one router instance."""

    def __init__(self, replicas: Iterable[tuple[str, str]], policy: str) -> None:
        """`replicas`: (replica id, model) pairs; `policy`: the active policy's name."""
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "gpufleet_router_"
        self.requests = Counter(
            p + "requests", "Proxied requests by replica and HTTP status", ["replica", "status"], registry=r
        )
        self.latency = Histogram(
            p + "request_duration_seconds",
            "Time from routing to the last byte, per replica",
            ["replica"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            p + "first_byte_seconds",
            "Time from routing to the replica's first byte, per replica",
            ["replica"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            p + "time_to_first_token_seconds",
            "Streamed requests: time from routing to the replica's first SSE chunk, per replica",
            ["replica"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            p + "policy_decisions", "Routing decisions by policy and reason", ["policy", "reason"], registry=r
        )
        self.predicted_hit_tokens = Counter(
            p + "predicted_prefix_hit_tokens",
            "Prompt tokens the router predicted a replica holds",
            ["replica"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            p + "prompt_tokens", "Estimated prompt tokens routed, per replica", ["replica"], registry=r
        )
        self.reported_cached_tokens = Counter(
            p + "replica_cached_tokens",
            "Prompt tokens replicas reported as cached (usage.prompt_tokens_details.cached_tokens)",
            ["replica"],
            registry=r,
        )
        self.reported_prompt_tokens = Counter(
            p + "replica_prompt_tokens",
            "Prompt tokens replicas reported (usage.prompt_tokens)",
            ["replica"],
            registry=r,
        )
        self.cache = Counter(p + "prediction_cache", "Prediction cache lookups by result", ["result"], registry=r)
        self.spills = Counter(
            p + "spills", "Requests routed below the model's top-priority pool", ["model", "pool"], registry=r
        )
        self.ejections = Counter(p + "ejections", "Replicas ejected after failures", ["replica"], registry=r)
        self.readmissions = Counter(
            p + "readmissions", "Ejected replicas re-admitted by health checks", ["replica"], registry=r
        )
        self.retries = Counter(
            p + "retries", "Attempts retried on another replica before the first byte", ["replica"], registry=r
        )
        self.rejections = Counter(
            p + "rejected", "Requests answered with an error by the router itself", ["status"], registry=r
        )
        self.retry_budget_exhausted = Counter(
            p + "retry_budget_exhausted", "Requests failed because the retry budget was spent", registry=r
        )
        self.request_failures = Counter(
            p + "replica_request_errors",
            "Error answers of engines for a request's input (passed on; not held against the replica)",
            ["status"],
            registry=r,
        )
        self.ejection_reasons = Counter(p + "ejection_reasons", "Ejections by kind of reason", ["reason"], registry=r)
        self.cancelled = Counter(
            p + "cancelled", "Requests whose client went away before the answer was complete", ["stage"], registry=r
        )
        self.in_flight = Gauge(p + "in_flight", "Requests in flight per replica", ["replica"], registry=r)
        self.healthy = Gauge(
            p + "replica_healthy", "1 when the replica is admitted, 0 when ejected", ["replica"], registry=r
        )
        self.session_tokens = Counter(
            p + "session_tokens",
            "Session tokens received, by verdict (valid, forged, expired, malformed: only valid ones route)",
            ["result"],
            registry=r,
        )
        self.engine_scrapes = Counter(
            p + "engine_metrics_scrapes",
            "Reads of replicas' /metrics for engine-reported load, by result (ok, failed, no_load_metrics)",
            ["replica", "result"],
            registry=r,
        )
        self.peer_reads = Counter(
            p + "peer_reads",
            "Reads of peer routers' queue state, by result (ok, failed, refused, invalid, self)",
            ["result"],
            registry=r,
        )
        self.policy = policy
        self.replica: dict[str, ReplicaMetrics] = {}
        self.membership = Counter(
            p + "membership_changes",
            "Replicas that joined, left or were updated, by source",
            ["source", "change"],
            registry=r,
        )
        self.discovery_events = Counter(
            p + "discovery_events", "EndpointSlice watch events, by type", ["type"], registry=r
        )
        self.discovery_relists = Counter(
            p + "discovery_lists",
            "EndpointSlice lists, by cause (list: a start or re-list; gone: after a 410)",
            ["reason"],
            registry=r,
        )
        self.discovery_errors = Counter(
            p + "discovery_errors", "Kubernetes API errors of discovery, by status", ["status"], registry=r
        )
        self.discovery_ignored = Gauge(
            p + "discovery_ignored_endpoints",
            "Endpoints discovery leaves out now, by reason (unknown_labels, no_port, no_address, id_conflict)",
            ["reason"],
            registry=r,
        )
        self.config_reloads = Counter(
            p + "config_reloads", "Router config file reloads, by result (ok, error)", ["result"], registry=r
        )
        for result in ("ok", "error"):
            self.config_reloads.labels(result)
        for result in ("ok", "failed", "refused", "invalid", "self"):
            self.peer_reads.labels(result)
        for rid, _model in replicas:
            self.add_replica(rid)
        for result in ("hit", "miss", "bypass"):
            self.cache.labels(result)
        for result in ("valid", "forged", "expired", "malformed"):
            self.session_tokens.labels(result)

    def watch_replicas(self, source: Callable[[], Iterable[ReplicaState]]) -> None:
        """Export the queued prefill of the replicas `source()` returns at each scrape."""
        self.registry.register(_QueuedCollector(source))

    def add_replica(self, rid: str) -> None:
        """A replica joined: its children exist at once, and lookups are cached."""
        if rid not in self.replica:
            self.replica[rid] = ReplicaMetrics(self, rid)
        self.healthy.labels(rid).set(1)
        self.ejections.labels(rid)

    def remove_replica(self, rid: str) -> None:
        """A replica left: its gauges go (counters stay, as Prometheus counters do; its
        `ReplicaMetrics` stays too, for requests still in flight there and for an id that returns)."""
        for gauge in (self.healthy, self.in_flight):
            try:
                gauge.remove(rid)
            except KeyError:
                pass

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
