"""Resilience settings: active checks and outlier ejection, the first-byte deadline, the retry
budget, and the limits of the router's own HTTP server.
"""

from __future__ import annotations

from pydantic import Field

from gpufleet.router.settings.base import Strict

__all__ = [
    "FirstByteSettings",
    "HealthSettings",
    "RetrySettings",
    "ServerSettings",
]


class HealthSettings(Strict):
    """Active checks and outlier ejection (Envoy's outlier detection is the model: router/health/)."""

    interval_s: float = Field(default=5.0, gt=0, description="active health check period")
    timeout_s: float = Field(default=2.0, gt=0)
    eject_after_failures: int = Field(
        default=3,
        ge=1,
        description="consecutive replica failures (connect, reset, timeout, 502/503/504) before a replica is "
        "ejected; the engine answering an error for a request is never one",
    )
    max_ejection_percent: float = Field(
        default=50.0,
        ge=0,
        le=100,
        description="most of a model's replicas that outlier detection may hold ejected at once (at least one); "
        "a failed active check ejects regardless",
    )
    success_rate_stdev_factor: float = Field(
        default=1.9, gt=0, description="eject a replica whose success rate is this many stdevs below its peers'"
    )
    success_rate_min_requests: int = Field(
        default=20, ge=1, description="requests a replica needs in an interval to take part in success-rate detection"
    )
    success_rate_min_replicas: int = Field(
        default=3, ge=2, description="replicas with enough requests for success-rate detection to run"
    )
    failure_percentage_threshold: float = Field(
        default=85.0,
        gt=0,
        le=100,
        description="eject a replica whose share of 5xx answers (any cause) in an interval is at least this",
    )
    outlier_interval_s: float = Field(default=10.0, gt=0, description="window of the success-rate checks")
    backoff_initial_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    scrape_kv_usage: bool = Field(
        default=False,
        description="on every check, also read the replica's KV-cache usage from its /metrics "
        "(vllm:kv_cache_usage_perc, or vllm:gpu_cache_usage_perc) into the router's view of it",
    )


class FirstByteSettings(Strict):
    """The first-byte deadline of each attempt, from what the plan knows about the replica.

    deadline = max(floor_s, factor * (prompt + queued prefill tokens) / prefill rate), plus for a
    non-streaming request its output budget at the decode rate (the answer comes at the end).
    When it passes before the replica sent anything, the attempt is retried elsewhere and the
    replica counts a failure (it is suspect: checked at once).
    """

    enabled: bool = True
    floor_s: float = Field(default=5.0, gt=0, description="the least any attempt is given")
    factor: float = Field(default=4.0, ge=1, description="slack over the expected time")
    default_prefill_tokens_per_s: float = Field(
        default=2000.0, gt=0, description="prefill rate of a replica whose plan gives none"
    )
    default_decode_tokens_per_s: float = Field(
        default=20.0, gt=0, description="per-request decode rate of a replica whose plan gives none"
    )


class RetrySettings(Strict):
    """The retry budget (Envoy's `retry_budget`): retries in flight at most this share of requests in flight."""

    budget_percent: float = Field(default=20.0, ge=0, le=100)
    # 10, not Envoy's 3: when a replica hangs, every request it holds passes its first-byte
    # deadline at about the same moment, and on a small fleet 20 % of in-flight is a handful.
    min_retry_concurrency: int = Field(default=10, ge=0, description="retries always allowed in flight at once")


class ServerSettings(Strict):
    """Client-side connection limits of the router's HTTP server (production-proxy defaults)."""

    header_timeout_s: float = Field(default=10.0, gt=0, description="time to receive a request's head")
    body_timeout_s: float = Field(default=30.0, gt=0, description="time to receive a request's body")
    idle_timeout_s: float = Field(default=75.0, gt=0, description="keep-alive connection idle between requests")
    max_connections: int = Field(
        default=10_000, ge=1, description="open client connections; more are closed at once (clamped to the fd limit)"
    )
    max_header_bytes: int = Field(default=16_384, ge=1024, description="bound on one header line")
