"""The router's one typed configuration, rendered from the compiled plan.

`RouterSettings` is also the `router:` section of a fleet declaration, so the user's
policy settings and the router's runtime settings are the same model. `RouterConfig`
adds what the plan knows: the models and every replica with its pool, priority and KV
capacity. The router reads only a `RouterConfig` (`gpufleet render router-config`).

`policy` names a registered policy or profile (`gpufleet.router.policies.registry`) or one of
the section's own `profiles`, each composed of registered filters, weighted scorers and a
picker whose parameters the plugin validates itself; `plugins` are modules imported first, so
that the plugins they register can be named. An unknown name or parameter is a validation
error at its own field, listing what is registered.

The top-level models live here (`RouterSettings`, `ReplicaConfig`, `RouterConfig`) and every
name is imported from here; the sub-models are grouped in `gpufleet.router.settings`:

    routing.py     CacheAwareSettings, SessionSettings (+ SessionSecret), ProfileSettings and its
                   plugin references (FilterRef, ScorerRef, PickerRef)
    resilience.py  HealthSettings, FirstByteSettings, RetrySettings, ServerSettings
    caching.py     PredictionCacheSettings, KvEventsSettings
    access.py      TenantSettings (+ TenantHeader), AdminToken
    discovery.py   DiscoverySettings, KubernetesDiscovery, DiscoveryTarget, PeerSettings, PeerDiscovery
    base.py        Strict (extra fields forbidden, frozen), field_error

Field names carry their units. This module imports nothing heavier than pydantic (the
policies it validates against import no router extra either), so the declaration can be
validated without the router's extras installed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from gpufleet.router.kvevents import ranks
from gpufleet.router.settings.access import AdminToken, TenantHeader, TenantSettings
from gpufleet.router.settings.base import Strict, field_error
from gpufleet.router.settings.caching import KvEventsSettings, PredictionCacheSettings
from gpufleet.router.settings.discovery import (
    DiscoverySettings,
    DiscoveryTarget,
    KubernetesDiscovery,
    PeerDiscovery,
    PeerSettings,
)
from gpufleet.router.settings.resilience import FirstByteSettings, HealthSettings, RetrySettings, ServerSettings
from gpufleet.router.settings.routing import (
    CacheAwareSettings,
    FilterRef,
    PickerRef,
    ProfileSettings,
    ScorerRef,
    SessionSecret,
    SessionSettings,
)

__all__ = [
    "AdminToken",
    "CacheAwareSettings",
    "DiscoverySettings",
    "DiscoveryTarget",
    "FilterRef",
    "FirstByteSettings",
    "HealthSettings",
    "KubernetesDiscovery",
    "KvEventsSettings",
    "PeerDiscovery",
    "PeerSettings",
    "PickerRef",
    "PredictionCacheSettings",
    "ProfileSettings",
    "ReplicaConfig",
    "RouterConfig",
    "RetrySettings",
    "RouterSettings",
    "ScorerRef",
    "ServerSettings",
    "SessionSecret",
    "SessionSettings",
    "TenantHeader",
    "TenantSettings",
]


class RouterSettings(Strict):
    """The `router:` section of a fleet declaration."""

    policy: str = Field(
        default="cache_aware",
        min_length=1,
        description="a registered policy or profile (cache_aware, session, least_load, round_robin, random, ...) "
        "or one of `profiles`",
    )
    plugins: list[str] = Field(
        default_factory=list,
        description="modules imported before the registry is read (they register their plugins)",
    )
    profiles: dict[str, ProfileSettings] = Field(
        default_factory=dict, description="routing profiles composed of registered plugins, by name"
    )
    block_size_tokens: int = Field(default=16, ge=1, le=4096, description="prefix-index block size in tokens")
    chars_per_token: float = Field(
        default=4.0, gt=0, description="estimate used to turn prompt characters into tokens without a tokenizer"
    )
    cache_aware: CacheAwareSettings = Field(default_factory=CacheAwareSettings)
    session: SessionSettings = Field(default_factory=SessionSettings)
    prediction_cache: PredictionCacheSettings = Field(default_factory=PredictionCacheSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    engine_metrics_interval_s: float = Field(
        default=0.25,
        ge=0,
        description="how often the router reads each replica's /metrics for its engine-reported load "
        "(waiting and running requests, KV usage); 0: never",
    )
    engine_metrics_timeout_s: float = Field(default=1.0, gt=0, description="bound on one /metrics read")
    peer_interval_s: float = Field(
        default=0.1,
        ge=0,
        description="how often the router reads the other router replicas' per-replica queue state "
        "(`discovery.peers`; in the simulator: how often N routers exchange it); 0: never",
    )
    peer_timeout_s: float = Field(default=0.5, gt=0, description="bound on one read of a peer router's state")
    kv_events: KvEventsSettings = Field(default_factory=KvEventsSettings)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(default=600.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    max_retries: int = Field(default=2, ge=0, le=10, description="retries on another replica before the first byte")
    stream_idle_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="a stream that sends nothing this long after its first byte is ended with an error event",
    )
    retry: RetrySettings = Field(default_factory=RetrySettings)
    first_byte: FirstByteSettings = Field(default_factory=FirstByteSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    tenant: TenantSettings = Field(default_factory=TenantSettings)
    tenant_isolation: Literal["none", "prediction_cache", "kv"] = Field(
        default="kv",
        description="none: tenants share every cache; prediction_cache: cached answers per tenant; kv: also "
        "the engines' prefix cache (vLLM cache_salt) and the router's prefix index (docs/router.md)",
    )
    hide_cached_tokens: bool = Field(
        default=False, description="drop usage.prompt_tokens_details.cached_tokens from answers to clients"
    )
    admin_token: AdminToken = Field(default_factory=lambda: AdminToken(env="GPUFLEET_ADMIN_TOKEN"))
    port: int = Field(default=8080, ge=1, le=65535)
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="on SIGTERM/SIGINT: how long in-flight requests may take to finish"
    )

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, data: Any) -> Any:
        # Before the fields: the profiles may name plugins these modules register.
        modules = data.get("plugins") if isinstance(data, dict) else None
        if not isinstance(modules, list) or not modules:
            return data
        from gpufleet.router.policies import registry

        errors = []
        for i, module in enumerate(modules):
            if isinstance(module, str):  # else the field's own check reports it
                try:
                    registry.load_plugin(module)
                except registry.PluginError as exc:
                    errors.append(field_error(("plugins", i), module, str(exc)))
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data

    @model_validator(mode="after")
    def _known_policy(self) -> RouterSettings:
        from gpufleet.router.policies import registry

        errors = []
        for name in self.profiles:
            if registry.is_policy(name):
                errors.append(
                    field_error(
                        ("profiles", name), name, f"{name!r} is already a registered policy: rename the profile"
                    )
                )
        problem = registry.policy_problem(self.policy, profiles=self.profiles)
        if problem:
            errors.append(field_error(("policy",), self.policy, problem))
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self


class ReplicaConfig(Strict):
    """One replica the router may send requests to, with what the plan knows about it."""

    id: str
    url: str = Field(description="base URL of the replica's OpenAI-compatible server")
    deployment: str
    model: str
    pool: str
    priority: int
    kv_capacity_tokens: int = Field(ge=0)
    max_model_len: int = Field(ge=1)
    max_concurrent_requests: int = Field(ge=1)
    prefill_tokens_per_s: float | None = Field(default=None, gt=0, description="the plan's prefill rate")
    decode_tokens_per_s: float | None = Field(default=None, gt=0, description="the plan's per-request decode rate")
    max_batched_tokens: int = Field(
        default=8192,
        ge=1,
        description="prefill tokens per engine step (vLLM --max-num-batched-tokens, SGLang --chunked-prefill-size)",
    )
    cpu_kv_capacity_tokens: int = Field(default=0, ge=0, description="KV tokens of its CPU tier (kv_offload)")
    cpu_load_tokens_per_s: float | None = Field(
        default=None, gt=0, description="the plan's rate a CPU-tier hit moves to the GPU"
    )
    kv_events_endpoint: str | None = Field(
        default=None, description="the replica's KV-event PUB endpoint (tcp://host:port); default from its url"
    )
    kv_events_replay_endpoint: str | None = Field(default=None, description="its replay ROUTER endpoint")
    data_parallel_size: int = Field(
        default=1, ge=1, le=1024, description="the engine's data-parallel ranks: one KV-event stream each (port + rank)"
    )


class RouterConfig(Strict):
    """Everything the router needs, rendered from the plan."""

    schema_: Literal["gpufleet.router-config/v1"] = Field(default="gpufleet.router-config/v1", alias="schema")
    fleet: str
    settings: RouterSettings = Field(default_factory=RouterSettings)
    replicas: list[ReplicaConfig]
    discovery: DiscoverySettings = Field(default_factory=DiscoverySettings)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _unique_ids(self) -> RouterConfig:
        ids = [r.id for r in self.replicas]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate replica ids: {', '.join(dup)}")
        return self

    @model_validator(mode="after")
    def _data_parallel_event_ports(self) -> RouterConfig:
        """Every data-parallel rank's KV-event sockets must bind (vLLM offsets both ports by the rank)."""
        ke = self.settings.kv_events
        if not ke.enabled:
            return self
        default = (f"tcp://host:{ke.port}", f"tcp://host:{ke.replay_port}" if ke.replay_port is not None else None)
        k8s = self.discovery.kubernetes
        checks = [(f"replica {r.id}", r.kv_events_endpoint, r.kv_events_replay_endpoint, r.data_parallel_size)
                  for r in self.replicas]  # fmt: skip
        checks += [(f"discovery target {t.deployment}/{t.pool}", None, None, t.data_parallel_size)
                   for t in (k8s.targets if k8s else [])]  # fmt: skip
        for what, ep, replay, size in checks:
            if size > 1:
                problem = ranks.port_collision(ep or default[0], replay if ep else default[1], size)
                if problem:
                    raise ValueError(f"{what}: data_parallel_size {size}: {problem}")
        return self
