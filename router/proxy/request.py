"""One proxied request as every stage after validation needs it, and the signal to retry it elsewhere."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gpufleet.router.health import Failure
from gpufleet.router.replicas import ModelReplicas
from gpufleet.router.types import RequestFeatures

__all__ = ["ProxyRequest", "Retryable"]


@dataclass(slots=True, eq=False)
class ProxyRequest:
    """One proxied request as every attempt on a replica needs it, built once after validation."""

    request: web.Request
    path: str
    features: RequestFeatures
    group: ModelReplicas
    body: bytes
    """The body to forward (re-encoded when the output budget was clamped)."""
    headers: bytes
    """The client's end-to-end headers, already as request-head lines."""
    stream: bool
    cache_key: str | None
    """Where to store the answer in the prediction cache; None when it is not cached."""
    cache_state: str | None
    """The `x-gpufleet-cache` header value: miss, bypass or None."""
    output_budget: int
    """The most tokens the answer may have (max_tokens, else what the context leaves)."""


class Retryable(Exception):
    """An attempt failed by a replica failure before any byte reached the client: try another replica."""

    def __init__(self, kind: Failure, detail: str) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
