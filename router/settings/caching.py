"""Cache settings: the exact-match prediction cache and precise prefix routing from the engines'
KV-cache events.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gpufleet.router.settings.base import Strict

__all__ = [
    "KvEventsSettings",
    "PredictionCacheSettings",
]


class PredictionCacheSettings(Strict):
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


class KvEventsSettings(Strict):
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
