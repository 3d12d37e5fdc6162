"""How requests are routed: the `cache_aware` parameters, session affinity, and profiles composed of
registered plugins (filters, weighted scorers, a picker) whose parameters each plugin validates.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gpufleet.router.settings.base import Strict

__all__ = [
    "CacheAwareSettings",
    "FilterRef",
    "PickerRef",
    "ProfileSettings",
    "ScorerRef",
    "SessionSecret",
    "SessionSettings",
]


class CacheAwareSettings(Strict):
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


class SessionSecret(Strict):
    """Where the key that signs session tokens comes from: a reference, never the value."""

    env: str | None = Field(
        default="GPUFLEET_SESSION_SECRET", description="environment variable holding the key (at least 16 bytes)"
    )
    file: str | None = Field(default=None, description="file holding the key (wins over env)")


class SessionSettings(Strict):
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
    # 0.1 from the simulator (docs/routing.md, *Session penalty*): at overload (load 2.0) first
    # tokens take seconds and the estimates' error grows with them; a fixed 0.1 s then moved
    # sessions off their cache on noise (multiturn, 4 routers: 277 moves in 822 turns, hit 0.70;
    # with 0.1: 0.78), while at load 0.8 (costs ~0.1-0.3 s) nothing changes.
    max_penalty_fraction: float = Field(
        default=0.1,
        ge=0,
        description="a session also stays while its replica's estimated TTFT is within this fraction of the best "
        "replica's (the bound is the larger of the two): estimates of seconds-long queues are not exact to 0.1 s",
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


class _PluginRef(Strict):
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


class ProfileSettings(Strict):
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
