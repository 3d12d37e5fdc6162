"""The router's one typed configuration, rendered from the compiled plan.

`RouterSettings` is also the `router:` section of a fleet declaration, so the user's
policy settings and the router's runtime settings are the same model. `RouterConfig`
adds what the plan knows: the models and every replica with its pool, priority and KV
capacity. The router reads only a `RouterConfig` (`gpufleet render router-config`).

Field names carry their units. This module imports nothing heavier than pydantic, so the
declaration can be validated without the router's extras installed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PolicyName = Literal["cache_aware", "round_robin", "least_load", "session", "random"]

__all__ = [
    "AdminToken",
    "CacheAwareSettings",
    "HealthSettings",
    "PolicyName",
    "PredictionCacheSettings",
    "ReplicaConfig",
    "RouterConfig",
    "RouterSettings",
    "SessionSettings",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PredictionCacheSettings(_Strict):
    """Exact-match response cache for deterministic requests, scoped per tenant."""

    enabled: bool = False
    ttl_s: float = Field(300.0, gt=0, description="seconds an answer stays servable")
    max_entries: int = Field(10_000, ge=1)
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="bound on cached body bytes")
    backend: Literal["memory", "redis"] = Field(
        "memory", description="memory: per router process; redis: shared by every router instance"
    )
    redis_url_env: str = Field(
        "GPUFLEET_PREDICTION_CACHE_REDIS_URL",
        min_length=1,
        description="environment variable holding the redis URL (it may carry a password, so never the URL itself)",
    )
    key_prefix: str = Field("gpufleet:pc:", description="prefix of the redis keys")


class CacheAwareSettings(_Strict):
    """How `cache_aware` weighs prefill work saved against queued work."""

    # 0.5 from bench/cache_aware_sweep.py (docs/routing.md): 1.0 sent turns away from their cache
    # on memory-bound fleets; 0.25 starts piling a hot prefix onto one replica.
    load_weight: float = Field(
        0.5, ge=0, description="weight of a replica's queued prefill tokens against matched prefix tokens"
    )
    min_match_blocks: int = Field(
        1, ge=0, description="below this many matched blocks a request is routed by load alone"
    )
    in_flight_cost_tokens: int = Field(
        64,
        ge=0,
        description="prefill-token equivalent of each in-flight request (its share of decode time) in the load term",
    )


class SessionSettings(_Strict):
    header: str = Field("x-session-id", min_length=1, description="request header carrying the session id")
    use_body_user: bool = Field(True, description="fall back to the body's `user` field as session id")
    max_sessions: int = Field(100_000, ge=1, description="bound on remembered sessions (LRU)")
    ttl_s: float = Field(3600.0, gt=0)


class HealthSettings(_Strict):
    interval_s: float = Field(5.0, gt=0, description="active health check period")
    timeout_s: float = Field(2.0, gt=0)
    eject_after_failures: int = Field(1, ge=1, description="consecutive failures before a replica is ejected")
    backoff_initial_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    scrape_kv_usage: bool = Field(
        False,
        description="on every check, also read the replica's KV-cache usage from its /metrics "
        "(vllm:kv_cache_usage_perc, or vllm:gpu_cache_usage_perc) into the router's view of it",
    )


class AdminToken(_Strict):
    """Where the admin bearer token comes from: a reference, never the value."""

    env: str | None = Field(None, description="environment variable holding the token")
    file: str | None = Field(None, description="file holding the token")
    secret: str | None = Field(None, description="Kubernetes Secret name (mounted as env by the stacks)")

    @model_validator(mode="after")
    def _one_source(self) -> AdminToken:
        if sum(x is not None for x in (self.env, self.file, self.secret)) > 1:
            raise ValueError("give one of env, file or secret")
        return self


class RouterSettings(_Strict):
    """The `router:` section of a fleet declaration."""

    policy: PolicyName = "cache_aware"
    block_size_tokens: int = Field(16, ge=1, le=4096, description="prefix-index block size in tokens")
    chars_per_token: float = Field(
        4.0, gt=0, description="estimate used to turn prompt characters into tokens without a tokenizer"
    )
    cache_aware: CacheAwareSettings = CacheAwareSettings()
    session: SessionSettings = SessionSettings()
    prediction_cache: PredictionCacheSettings = PredictionCacheSettings()
    health: HealthSettings = HealthSettings()
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(600.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    max_retries: int = Field(2, ge=0, le=10, description="retries on another replica before the first byte")
    admin_token: AdminToken = AdminToken(env="GPUFLEET_ADMIN_TOKEN")
    port: int = Field(8080, ge=1, le=65535)


class ReplicaConfig(_Strict):
    id: str
    url: str = Field(description="base URL of the replica's OpenAI-compatible server")
    deployment: str
    model: str
    pool: str
    priority: int
    kv_capacity_tokens: int = Field(ge=0)
    max_model_len: int = Field(ge=1)
    max_concurrent_requests: int = Field(ge=1)


class RouterConfig(_Strict):
    """Everything the router needs, rendered from the plan."""

    schema_: Literal["gpufleet.router-config/v1"] = Field("gpufleet.router-config/v1", alias="schema")
    fleet: str
    settings: RouterSettings = RouterSettings()
    replicas: list[ReplicaConfig]

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _unique_ids(self) -> RouterConfig:
        ids = [r.id for r in self.replicas]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate replica ids: {', '.join(dup)}")
        return self
