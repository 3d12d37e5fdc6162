"""Replicas discovered at run time (Kubernetes EndpointSlices and the plan's facts per (deployment,
pool)), and the other router replicas whose queue state this one reads (`router.peers`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gpufleet.router.settings.base import Strict

__all__ = [
    "DiscoverySettings",
    "DiscoveryTarget",
    "KubernetesDiscovery",
    "PeerDiscovery",
    "PeerSettings",
]


class DiscoveryTarget(Strict):
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
    max_batched_tokens: int = Field(default=8192, ge=1, description="the engines' prefill tokens per step")


class KubernetesDiscovery(Strict):
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


class PeerDiscovery(Strict):
    """The other router replicas: the ready endpoints of the router's own Service's EndpointSlices."""

    namespace: str = Field(min_length=1)
    service: str = Field(min_length=1, description="the router Service (its slices' kubernetes.io/service-name)")
    port: str | int = Field(default="http", description="the EndpointSlice port (name or number) of the router")
    scheme: Literal["http", "https"] = "http"
    kubeconfig: str | None = Field(default=None, description="kubeconfig file; none: the in-cluster service account")
    refresh_s: float = Field(default=10.0, gt=0, description="how often the slices are listed again")


class PeerSettings(Strict):
    """Where the other router replicas are (docs/router.md, *Several routers*): listed, discovered or both.
    This router's own address may be among them: it is recognised by the id it answers with."""

    urls: list[str] = Field(default_factory=list, description="base URLs of the other routers (http://host:port)")
    kubernetes: PeerDiscovery | None = None


class DiscoverySettings(Strict):
    """Where replicas are discovered at run time, besides the listed `replicas`, and the peers."""

    kubernetes: KubernetesDiscovery | None = None
    peers: PeerSettings = Field(default_factory=PeerSettings)
