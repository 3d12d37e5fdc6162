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

Field names carry their units. This module imports nothing heavier than pydantic (the
policies it validates against import no router extra either), so the declaration can be
validated without the router's extras installed.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from gpufleet.router.kvevents import ranks

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


def _error(loc: tuple[str | int, ...], value: Any, message: str) -> InitErrorDetails:
    """A validation error at `loc` (relative to the model being validated) saying `message`."""
    # PydanticCustomError keeps the message as is; spec.py and loader.py add file:line.
    return InitErrorDetails(type=PydanticCustomError("value_error", message), loc=loc, input=value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PredictionCacheSettings(_Strict):
    """Exact-match response cache for deterministic requests, scoped per tenant."""

    enabled: bool = False
    ttl_s: float = Field(default=300.0, gt=0, description="seconds an answer stays servable")
    max_entries: int = Field(default=10_000, ge=1)
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="bound on cached body bytes")
    backend: Literal["memory", "redis"] = Field(
        default="memory", description="memory: per router process; redis: shared by every router instance"
    )
    redis_url_env: str = Field(
        default="GPUFLEET_PREDICTION_CACHE_REDIS_URL",
        min_length=1,
        description="environment variable holding the redis URL (it may carry a password, so never the URL itself)",
    )
    key_prefix: str = Field(default="gpufleet:pc:", description="prefix of the redis keys")
    require_tenant: bool = Field(
        default=True, description="cache only requests that name a tenant (anonymous ones would share answers)"
    )


class CacheAwareSettings(_Strict):
    """The parameters of the `cache_aware` profile (TTFT estimate) and of `cache_aware_tokens` (the
    previous default: prefill work saved against queued work, in tokens)."""

    # 0.5 from the simulator (docs/routing.md, *cache_aware*): 0 (greedy TTFT) left caches as soon
    # as a queue formed (mix @ 0.8 p99 5.4 s); 1 and 2 piled a hot prefix up (shared_prompts @ 2.0).
    added_prefill_weight: float = Field(
        default=0.5,
        ge=0,
        description="cache_aware: weight of the prefill seconds a request adds to a replica (the wait it "
        "causes for requests behind it) against its own estimated TTFT",
    )

    # 0.5 from bench/cache_aware_sweep.py (docs/routing.md): 1.0 sent turns away from their cache
    # on memory-bound fleets; 0.25 starts piling a hot prefix onto one replica.
    load_weight: float = Field(
        default=0.5,
        ge=0,
        description="cache_aware_tokens: weight of a replica's queued prefill tokens against matched prefix tokens",
    )
    min_match_blocks: int = Field(
        default=1, ge=0, description="below this many matched blocks a request is routed by load alone"
    )
    in_flight_cost_tokens: int = Field(
        default=64,
        ge=0,
        description="cache_aware_tokens: prefill-token equivalent of each in-flight request (its share of decode "
        "time) in the load term",
    )


class SessionSecret(_Strict):
    """Where the key that signs session tokens comes from: a reference, never the value."""

    env: str | None = Field(
        default="GPUFLEET_SESSION_SECRET", description="environment variable holding the key (at least 16 bytes)"
    )
    file: str | None = Field(default=None, description="file holding the key (wins over env)")


class SessionSettings(_Strict):
    """Session affinity: where the server reads a session id, and how a session keeps its replica.

    Used by the `session` policy and by the `session_affinity` picker of the default profile."""

    header: str = Field(default="x-session-id", min_length=1, description="request header carrying the session id")
    use_body_user: bool = Field(default=True, description="fall back to the body's `user` field as session id")
    max_sessions: int = Field(default=100_000, ge=1, description="bound on remembered sessions (LRU)")
    ttl_s: float = Field(default=3600.0, gt=0)
    # 0.1 from the simulator (docs/routing.md, *cache_aware*): on multiturn @ 0.8, 0.5 s tripled
    # cache_aware's TTFT p99 (sessions waited behind queues), 0.05-0.1 s kept it at the oracle's.
    max_penalty_s: float = Field(
        default=0.1,
        ge=0,
        description="a session leaves its replica when that replica's estimated TTFT is worse than the best "
        "replica's by more than this many seconds (or it is unavailable); then it stays on the new one",
    )
    token_header: str = Field(
        default="x-gpufleet-session",
        min_length=1,
        description="response (and request) header of the signed session token naming the session's replica",
    )
    secret: SessionSecret = Field(
        default_factory=SessionSecret,
        description="the HMAC key every router replica signs and checks session tokens with (none: no tokens)",
    )
    binding: Literal["memory", "redis"] = Field(
        default="memory",
        description="memory: each router remembers its sessions (plus tokens); redis: bindings shared by every "
        "router, for clients that cannot echo the token header",
    )
    redis_url_env: str = Field(
        default="GPUFLEET_SESSION_REDIS_URL", min_length=1, description="environment variable holding the redis URL"
    )
    key_prefix: str = Field(default="gpufleet:session:", description="prefix of the redis keys")


class HealthSettings(_Strict):
    """Active checks and outlier ejection (Envoy's outlier detection is the model: router/health.py)."""

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


class FirstByteSettings(_Strict):
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


class RetrySettings(_Strict):
    """The retry budget (Envoy's `retry_budget`): retries in flight at most this share of requests in flight."""

    budget_percent: float = Field(default=20.0, ge=0, le=100)
    # 10, not Envoy's 3: when a replica hangs, every request it holds passes its first-byte
    # deadline at about the same moment, and on a small fleet 20 % of in-flight is a handful.
    min_retry_concurrency: int = Field(default=10, ge=0, description="retries always allowed in flight at once")


class KvEventsSettings(_Strict):
    """Precise prefix routing from the engines' KV-cache events (docs/router.md, "KV events")."""

    enabled: bool = Field(default=False, description="subscribe to every replica's KV-event stream")
    tokenizer: str | None = Field(
        default=None,
        description="the model's tokenizer.json (or its directory, with tokenizer_config.json); "
        "without it precise mode stays off and routing is approximate",
    )
    chat_template: str | None = Field(
        default=None, description="a chat template file (default: tokenizer_config.json's chat_template)"
    )
    block_size: int | None = Field(
        default=None, ge=1, le=4096, description="the engines' KV block size in tokens (default: block_size_tokens)"
    )
    port: int = Field(default=5557, ge=1, le=65535, description="engines' PUB port, for replicas without an endpoint")
    replay_port: int | None = Field(
        default=5558, ge=1, le=65535, description="engines' replay ROUTER port (None: no replay, a gap resets)"
    )
    topic: str = Field(default="kv-events", description="the engines' `topic`")
    silence_s: float = Field(
        default=5.0, gt=0, description="a replica sent a request and silent this long falls back to approximate"
    )
    replay_timeout_s: float = Field(default=1.0, gt=0, description="bound on one replay request")
    pending_ttl_s: float = Field(
        default=10.0, ge=0, description="how long a routed prompt's blocks count as held before the engine confirms"
    )
    tokenize_inline_chars: int = Field(
        default=8192, ge=0, description="bodies up to this size are tokenized on the event loop, longer in threads"
    )
    tokenize_deadline_s: float = Field(
        default=0.25,
        gt=0,
        description="a longer body not tokenized within this time (or with every tokenizer thread busy) is "
        "routed on the character estimate (gpufleet_router_kv_tokenize_fallbacks_total)",
    )
    token_cache_tokens: int = Field(
        default=4_000_000,
        ge=0,
        description="token ids of already-seen prompt text kept per tenant, in total (about 4 bytes each; "
        "0: tokenize every prompt whole)",
    )


class ServerSettings(_Strict):
    """Client-side connection limits of the router's HTTP server (production-proxy defaults)."""

    header_timeout_s: float = Field(default=10.0, gt=0, description="time to receive a request's head")
    body_timeout_s: float = Field(default=30.0, gt=0, description="time to receive a request's body")
    idle_timeout_s: float = Field(default=75.0, gt=0, description="keep-alive connection idle between requests")
    max_connections: int = Field(
        default=10_000, ge=1, description="open client connections; more are closed at once (clamped to the fd limit)"
    )
    max_header_bytes: int = Field(default=16_384, ge=1024, description="bound on one header line")


class TenantHeader(_Strict):
    """A request header that names the tenant; `trusted_cidrs` limits who may set it (a gateway)."""

    name: str = Field(min_length=1)
    trusted_cidrs: list[str] = Field(
        default_factory=list,
        description="peer addresses allowed to set it (a gateway that authenticated the client); empty: anyone, "
        "for a credential header whose value is a secret",
    )

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @field_validator("trusted_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        import ipaddress

        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP network (like 10.0.0.0/8 or 127.0.0.1/32)") from None
        return value


def _default_tenant_headers() -> list[TenantHeader]:
    return [TenantHeader(name=n) for n in ("authorization", "api-key", "x-api-key")]


class TenantSettings(_Strict):
    """How the router tells tenants apart: the first of `headers` present (a hash of its value)."""

    headers: list[TenantHeader] = Field(default_factory=_default_tenant_headers, min_length=1)
    salt_key_env: str = Field(
        default="GPUFLEET_CACHE_SALT_KEY",
        min_length=1,
        description="environment variable holding the key the kv isolation's cache_salt is derived from "
        "(set the same one on every router instance; without it each process draws its own)",
    )


class AdminToken(_Strict):
    """Where the admin bearer token comes from: a reference, never the value."""

    env: str | None = Field(default=None, description="environment variable holding the token")
    file: str | None = Field(default=None, description="file holding the token")
    secret: str | None = Field(default=None, description="Kubernetes Secret name (mounted as env by the stacks)")

    @model_validator(mode="after")
    def _one_source(self) -> AdminToken:
        if sum(x is not None for x in (self.env, self.file, self.secret)) > 1:
            raise ValueError("give one of env, file or secret")
        return self


# ---------------------------------------------------------------------------------------
# Profiles: plugin references checked against the registry


class _PluginRef(_Strict):
    """A plugin of a profile: its registered `type` and the parameters that plugin validates.

    Written as a mapping (`{type: prefix, params: {...}}`) or, without parameters, as the bare
    type name (`pool_priority`).
    """

    kind: ClassVar[str] = ""

    type: str = Field(min_length=1, description="the plugin's registered name")
    params: dict[str, Any] = Field(default_factory=dict, description="the plugin's own parameters")

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"type": data} if isinstance(data, str) else data

    @field_validator("type")
    @classmethod
    def _registered(cls, value: str) -> str:
        from gpufleet.router.policies import registry  # the plugins import this module

        registry.entry(cls.kind, value)  # ValueError naming what is registered
        return value

    @field_validator("params")
    @classmethod
    def _own_params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from gpufleet.router.policies import registry

        plugin = info.data.get("type")
        if plugin is not None:  # else its error is reported already
            registry.parse_params(cls.kind, plugin, value)  # ValidationError at params.<name>
        return value


class FilterRef(_PluginRef):
    """A filter of a profile (`pool_priority`, or a registered plugin)."""

    kind: ClassVar[str] = "filter"


class PickerRef(_PluginRef):
    """The picker of a profile (`min_cost`, or a registered plugin)."""

    kind: ClassVar[str] = "picker"


class ScorerRef(_PluginRef):
    """A weighted scorer of a profile. Every scorer scores in estimated prefill tokens (lower is
    better), so a weight says how many prefill tokens one unit of that score is worth."""

    kind: ClassVar[str] = "scorer"

    weight: float = Field(default=1.0, ge=0, description="multiplies the scorer's cost")


def _default_filters() -> list[FilterRef]:
    return [FilterRef(type="pool_priority")]


def _default_picker() -> PickerRef:
    return PickerRef(type="min_cost")


class ProfileSettings(_Strict):
    """A routing profile: filters narrow the replicas, weighted scorers cost each one, a picker chooses.

    The cost of a replica is the weighted sum of its scores; adjacent scorers of equal weight are
    added before they are weighted (`w * (a + b)`), see `gpufleet.router.policies.profile`.
    """

    filters: list[FilterRef] = Field(
        default_factory=_default_filters, description="applied in order; pool_priority must be one of them"
    )
    scorers: list[ScorerRef] = Field(min_length=1)
    picker: PickerRef = Field(default_factory=_default_picker)

    @field_validator("filters")
    @classmethod
    def _keeps_pool_priority(cls, value: list[FilterRef]) -> list[FilterRef]:
        if not any(f.type == "pool_priority" for f in value):
            # It is also what keeps unhealthy and saturated replicas out.
            raise ValueError(
                "must include pool_priority: every policy keeps to the best pool with an available replica"
            )
        return value


class RouterSettings(_Strict):
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
                    errors.append(_error(("plugins", i), module, str(exc)))
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
                    _error(("profiles", name), name, f"{name!r} is already a registered policy: rename the profile")
                )
        problem = registry.policy_problem(self.policy, profiles=self.profiles)
        if problem:
            errors.append(_error(("policy",), self.policy, problem))
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self


class ReplicaConfig(_Strict):
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


class DiscoveryTarget(_Strict):
    """One (deployment, pool) whose ready Kubernetes endpoints join the router, with what the plan
    knows about its replicas (nothing of this is read from the pod)."""

    deployment: str = Field(min_length=1, description="the value of the deployment label")
    pool: str = Field(min_length=1, description="the value of the pool label")
    model: str = Field(min_length=1)
    priority: int
    kv_capacity_tokens: int = Field(ge=0)
    max_model_len: int = Field(ge=1)
    max_concurrent_requests: int = Field(ge=1)
    prefill_tokens_per_s: float | None = Field(default=None, gt=0)
    decode_tokens_per_s: float | None = Field(default=None, gt=0)
    port: str | int = Field(
        default="http", description="the EndpointSlice port (name or number) of the engine's HTTP API"
    )
    scheme: Literal["http", "https"] = "http"
    data_parallel_size: int = Field(default=1, ge=1, le=1024, description="the engines' data-parallel ranks")


class KubernetesDiscovery(_Strict):
    """Watch `discovery.k8s.io/v1` EndpointSlices in one namespace (docs/router.md)."""

    namespace: str = Field(min_length=1)
    label_selector: str = Field(
        min_length=1, description="selects the slices of the fleet's (deployment, pool) Services"
    )
    deployment_label: str = Field(default="gpufleet.io/deployment", min_length=1)
    pool_label: str = Field(default="gpufleet.io/pool", min_length=1)
    targets: list[DiscoveryTarget] = Field(min_length=1)
    kubeconfig: str | None = Field(default=None, description="kubeconfig file; none: the in-cluster service account")
    watch_timeout_s: int = Field(default=300, ge=1, description="server-side timeout of one watch request")
    backoff_initial_s: float = Field(default=0.5, gt=0, description="first wait after an API error")
    backoff_max_s: float = Field(default=30.0, gt=0, description="longest wait between retries")

    @model_validator(mode="after")
    def _unique_targets(self) -> KubernetesDiscovery:
        keys = [(t.deployment, t.pool) for t in self.targets]
        dup = sorted({f"{d}/{p}" for d, p in keys if keys.count((d, p)) > 1})
        if dup:
            raise ValueError(f"duplicate (deployment, pool) targets: {', '.join(dup)}")
        return self


class DiscoverySettings(_Strict):
    """Where replicas are discovered at run time, besides the listed `replicas`."""

    kubernetes: KubernetesDiscovery | None = None


class RouterConfig(_Strict):
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
