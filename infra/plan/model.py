"""The compiled plan's records: plain, frozen, serialisable data (`gpufleet plan -o json`).

Every backend reads these: the Pulumi components, the Kubernetes manifests, the router config,
the local runtime, the controller and `gpufleet plan`. The JSON form is schema
`gpufleet.plan/v1`; fields are added within v1, never renamed.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpufleet.infra import spec
from gpufleet.router.config import RouterSettings

__all__ = [
    "HOURS_PER_MONTH",
    "PLAN_SCHEMA",
    "Cost",
    "DeploymentPlan",
    "EngineResources",
    "KvTierPlan",
    "Placement",
    "Plan",
    "PlanWarning",
    "PoolPerf",
    "PoolPlan",
    "ReplicaPlan",
]

PLAN_SCHEMA: Final = "gpufleet.plan/v1"
HOURS_PER_MONTH: Final = 730


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlanWarning(_Data):
    """Something worth a look that does not stop the plan (`code` names the kind, see docs/plan.md)."""

    code: str
    subject: str
    message: str


class PoolPlan(_Data):
    """One pool: its machines, node counts (min / baseline / warm / max) and cost."""

    name: str
    cloud: Literal["aws", "gcp", "kubernetes", "local"]
    region: str | None
    zones: list[str]
    instance_type: str
    gpu: str
    gpu_memory_gib: float
    gpus_per_node: int
    capacity_type: Literal["on_demand", "spot"]
    priority: int
    min_nodes: int
    baseline_nodes: int = Field(description="max(min_nodes, nodes the baseline placement needs)")
    warm_nodes: int = Field(description="warm nodes held above baseline, within max_nodes")
    max_nodes: int
    usd_per_node_hour: float
    price_source: str
    labels: dict[str, str]
    taints: list[spec.Taint]
    engine_command: list[str] | None = None
    gpus_used_baseline: int
    gpu_kv_tokens_baseline: int = Field(0, description="KV tokens of the baseline replicas on the pool, GPU tier")
    cpu_kv_tokens_baseline: int = 0
    disk_kv_tokens_baseline: int = 0
    kv_tier_usd_per_hour: float = Field(0.0, description="provisioned disk of the baseline replicas' tiers")
    baseline_usd_per_hour: float
    warm_usd_per_hour: float
    peak_usd_per_hour: float


class KvTierPlan(_Data):
    """A replica's KV tiers below the GPU (`kv_offload`): capacity, the rate a hit moves at, cost."""

    backend: Literal["native", "lmcache", "hicache"]
    cpu_gib: float
    disk_gib: float
    cpu_kv_tokens: int
    disk_kv_tokens: int
    pcie_gen: int
    cpu_hit_gb_per_s: float = Field(description="host-to-GPU rate of a CPU hit, all the replica's GPUs")
    cpu_hit_tokens_per_s: float
    host_link_source: str
    disk_medium: str | None = Field(description="local_nvme (on the node) or the cloud's block storage")
    disk_hit_gb_per_s: float
    disk_hit_tokens_per_s: float
    disk_source: str
    load_latency_s: float = Field(description="fixed cost of one load from a lower tier")
    host_memory_gib: float = Field(description="engine + CPU tier: the replica's host memory request")
    usd_per_hour: float = Field(description="per replica: 0 for host memory and local NVMe")


class EngineResources(_Data):
    """A replica's CPU and host memory on one pool's nodes: the engine container's requests."""

    cpu_millicores: int = Field(description="request: the replica's GPU share of the node's CPU left to pods")
    memory_mib: int = Field(description="request and limit: its GPU share of the node's memory left to pods")
    engine_memory_gib: float = Field(description="of memory_mib, what the engine itself needs (process, CUDA, staging)")
    kv_tier_memory_gib: float = Field(description="of memory_mib, the CPU KV tier (kv_offload.cpu_gib)")
    node_cpu_millicores: int = Field(description="per node: allocatable minus the system daemonsets' room")
    node_memory_mib: int = Field(description="per node: allocatable minus the system daemonsets' room")
    reserve: str = Field(description="whose kubelet reservation formula: eks, gke, or the larger of both")


class PoolPerf(_Data):
    """What one replica of a deployment gets on one pool's machines."""

    pool: str
    priority: int
    replicas_per_node: int
    kv_cache_tokens_per_replica: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    kv_tiers: KvTierPlan | None = None
    resources: EngineResources | None = Field(None, description="none when the catalog lacks the node's vCPU/RAM")


class Placement(_Data):
    """Baseline replicas of a deployment on one pool."""

    pool: str
    replicas: int
    kv_cache_tokens_per_replica: int


class ReplicaPlan(_Data):
    """One baseline replica; `id` is also its pod's name on Kubernetes."""

    id: str
    deployment: str
    pool: str
    priority: int
    index: int


class DeploymentPlan(_Data):
    """One deployment: engine settings, failover order, placement, per-pool perf, capacity."""

    name: str
    model: str
    engine: Literal["vllm", "sglang"]
    image: str
    gpus_per_replica: int
    min_replicas: int
    max_replicas: int
    max_model_len: int
    max_concurrent_requests: int
    gpu_memory_utilization: float
    port: int
    engine_args: list[str]
    weight_bytes: int
    kv_bytes_per_token: int
    kv_offload: spec.KvOffload | None = None
    failover: list[str] = Field(description="pools in the order replicas and traffic use them")
    placement: list[Placement]
    kv_cache_tokens_per_replica: int = Field(description="in the first pool of the failover order")
    pools: list[PoolPerf]
    replicas: list[ReplicaPlan]
    capacity_replicas: int = Field(
        description="replicas that fit all its pools at max_nodes, after the others' baseline"
    )
    replicas_if_top_pool_lost: int
    autoscaling: spec.Autoscaling | None = Field(
        None,
        description="how it scales between min_replicas and max_replicas, declared or the default "
        "(`spec.default_autoscaling`); none: max_replicas = min_replicas, it stays there",
    )
    autoscaling_default: bool = Field(
        False, description="no `autoscaling:` declared: `autoscaling` is the default (in_flight)"
    )

    def scaling_summary(self) -> str:
        """One line: how the deployment scales (declared, default or fixed), as plan and `up` print it."""
        a = self.autoscaling
        if a is None:
            return f"fixed at {self.min_replicas} (max_replicas = min_replicas)"
        unit = "s" if a.signal == "ttft_p90_s" else " per replica"
        how = f"{self.min_replicas}-{self.max_replicas} on {a.signal}, target {a.target:g}{unit}"
        if self.autoscaling_default:
            share = f"{spec.DEFAULT_IN_FLIGHT_SHARE:.0%} of max_concurrent_requests {self.max_concurrent_requests}"
            return f"{how} (default: no autoscaling declared; {share})"
        return how


class Cost(_Data):
    """The fleet's baseline, warm and peak cost, per hour and per month."""

    baseline_usd_per_hour: float
    warm_usd_per_hour: float
    peak_usd_per_hour: float
    baseline_usd_per_month: float
    warm_usd_per_month: float
    peak_usd_per_month: float
    hours_per_month: int = HOURS_PER_MONTH


class Plan(_Data):
    """The compiled fleet: the single source of truth of every backend."""

    schema_: Literal["gpufleet.plan/v1"] = Field(default=PLAN_SCHEMA, alias="schema")
    fleet: str
    namespace: str
    source: str
    catalog_as_of: str
    clouds: spec.Clouds
    router: RouterSettings
    pools: list[PoolPlan]
    deployments: list[DeploymentPlan]
    cost: Cost
    warnings: list[PlanWarning]

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def pool(self, name: str) -> PoolPlan:
        """The pool named `name` (KeyError when there is none)."""
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(name)

    def deployment(self, name: str) -> DeploymentPlan:
        """The deployment named `name` (KeyError when there is none)."""
        for d in self.deployments:
            if d.name == name:
                return d
        raise KeyError(name)

    def to_json_dict(self) -> dict[str, Any]:
        """Stable JSON form (`gpufleet plan -o json`)."""
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> Plan:
        """The plan back from its JSON form."""
        return cls.model_validate(data)
