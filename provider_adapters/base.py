"""The one contract every provider adapter implements and its typed objects.

Adapters are thin facades over a cloud SDK: they answer *what is offered, at what price,
with what quota, in what state* and perform *scale this pool*. They hold no business
logic (no failover, no thresholds): that lives above them, in `live` and the controller.
They raise only the errors of `gpufleet.provider_adapters.errors`. What a cloud cannot do
is said by name, with the reason, in `CANNOT_DO`.
"""

from __future__ import annotations

import abc
import importlib
import time
from collections.abc import Callable
from types import ModuleType
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpufleet.provider_adapters.errors import SdkMissing, Unsupported

__all__ = [
    "CANNOT_DO",
    "Capability",
    "CloudName",
    "GpuOffering",
    "PoolRef",
    "PoolState",
    "PoolUtilisation",
    "PriceQuote",
    "Progress",
    "ProviderAdapter",
    "QuotaInfo",
    "ReplicaSetState",
    "ScaleRequest",
    "ScaleResult",
    "cannot_do_reason",
    "gpu_matches",
    "lazy_import",
    "normalise_gpu_name",
]

CloudName = Literal["aws", "gcp", "kubernetes"]
Capability = Literal[
    "offerings", "prices", "quotas", "pool_state", "scale_pool", "warm_pool", "utilisation", "scale_placeholders"
]
# Called once per region/zone visited so CLIs can drive a progress bar.
Progress = Callable[[str], None]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- objects


class GpuOffering(_Frozen):
    """One GPU machine type offered in one region (and the zones of it that offer it)."""

    cloud: CloudName
    machine_type: str
    gpu_model: str = Field(description="normalised GPU name, e.g. H100, A100-80GB, L4")
    gpu_count: int = Field(ge=0)
    gpu_memory_gib: float = Field(ge=0, description="memory of ONE GPU")
    vcpus: int = Field(ge=0)
    ram_gib: float = Field(ge=0)
    region: str
    zones: tuple[str, ...] = ()


class PriceQuote(_Frozen):
    """A price in USD per hour for one machine; either part may be unknown (None)."""

    cloud: CloudName
    machine_type: str
    region: str
    zone: str | None = None
    on_demand_usd_per_h: float | None = Field(None, ge=0)
    spot_usd_per_h: float | None = Field(None, ge=0)
    observed_at_s: float = Field(default_factory=time.time, description="unix time of the observation")


class QuotaInfo(_Frozen):
    """One quota that limits GPU machines in a region (AWS counts vCPUs, GCP counts GPUs)."""

    cloud: CloudName
    region: str
    name: str = Field(description="provider quota code or metric, e.g. L-417A185B, NVIDIA_H100_GPUS")
    description: str = ""
    unit: Literal["vcpu", "gpu"]
    limit: float = Field(ge=0)
    usage: float | None = Field(None, ge=0, description="None where the provider does not report usage")
    spot: bool = False
    applies_to: tuple[str, ...] = Field((), description="machine-type prefixes or GPU models it covers")

    @property
    def headroom(self) -> float | None:
        """Units still free, or None when usage is unknown."""
        return None if self.usage is None else max(0.0, self.limit - self.usage)


class PoolRef(_Frozen):
    """How to find one gpufleet pool at its provider.

    `name` is the gpufleet pool name (the `gpufleet.io/pool` label); `provider_name` is the
    EKS node group or the GCE managed instance group behind it (defaults to `name`).
    """

    cloud: CloudName
    name: str
    region: str = ""
    zone: str | None = None
    cluster: str | None = Field(None, description="EKS cluster name (aws)")
    provider_name: str | None = Field(None, description="node group / instance group name; default: name")
    autoscaling_group: str | None = Field(None, description="AWS ASG behind the node group, for warm pools")

    @property
    def target(self) -> str:
        return self.provider_name or self.name


class PoolState(_Frozen):
    """Node counts of one pool as the provider sees them."""

    ref: PoolRef
    desired_nodes: int = Field(ge=0)
    ready_nodes: int | None = Field(None, ge=0, description="None where the provider cannot tell")
    min_nodes: int | None = Field(None, ge=0, description="None where the provider holds no bounds (GCE MIG)")
    max_nodes: int | None = Field(None, ge=0)
    warm_pool_nodes: int | None = Field(None, description="AWS ASG warm pool min size, if the pool uses one")
    status: str = ""
    observed_at_s: float = Field(default_factory=time.time)


class ScaleRequest(_Frozen):
    """Set a pool's desired node count (and optionally its bounds)."""

    ref: PoolRef
    desired_nodes: int = Field(ge=0)
    min_nodes: int | None = Field(None, ge=0)
    max_nodes: int | None = Field(None, ge=0)


class ScaleResult(_Frozen):
    ref: PoolRef
    previous_desired: int
    desired_nodes: int
    operation: str = Field("", description="provider operation / update id")


class PoolUtilisation(_Frozen):
    """GPU use of one pool as the Kubernetes scheduler sees it.

    `gpus_requested` counts serving pods only; GPUs held by placeholders are in
    `gpus_placeholder`, because a placeholder's GPU is free for any replica that needs it.
    """

    pool: str
    nodes: int = Field(ge=0)
    ready_nodes: int = Field(ge=0)
    gpus_allocatable: int = Field(ge=0, description="sum over Ready nodes")
    gpus_requested: int = Field(ge=0, description="by running non-placeholder pods")
    gpus_placeholder: int = Field(0, ge=0)
    pending_gpu_pods: int = Field(0, ge=0, description="non-placeholder pods waiting for a GPU")
    pending_gpus: int = Field(0, ge=0)
    placeholders_running: int = Field(0, ge=0)
    placeholders_desired: int | None = Field(None, description="replicas of the placeholder Deployment")
    observed_at_s: float = Field(default_factory=time.time)


class ReplicaSetState(_Frozen):
    """One (deployment, pool) StatefulSet as the cluster sees it."""

    name: str
    replicas: int = Field(ge=0, description="spec.replicas: what is asked for")
    ready: int = Field(ge=0, description="status.readyReplicas")
    pending_pods: tuple[str, ...] = Field(default=(), description="its pods in phase Pending (not scheduled yet)")


# --------------------------------------------------------------------------- can't-do table

# What each cloud cannot do through its adapter, and why. `Unsupported` errors quote it.
CANNOT_DO: dict[tuple[CloudName, Capability], str] = {
    ("aws", "utilisation"): (
        "EC2/EKS APIs do not see pods' GPU requests; read utilisation through the kubernetes adapter of the EKS cluster"
    ),
    ("aws", "scale_placeholders"): "placeholders are Kubernetes Deployments; use the kubernetes adapter",
    ("gcp", "prices"): (
        "the Compute Engine API has no price endpoint (prices live in the Cloud Billing Catalog API, "
        "which needs a billing-enabled key); gpufleet keeps the bundled catalog's GCP prices"
    ),
    ("gcp", "warm_pool"): (
        "managed instance groups have no warm pool; gpufleet holds GCP warmth with placeholder pods"
    ),
    ("gcp", "utilisation"): "GCE does not see pods' GPU requests; use the kubernetes adapter of the GKE cluster",
    ("gcp", "scale_placeholders"): "placeholders are Kubernetes Deployments; use the kubernetes adapter",
    ("kubernetes", "offerings"): "an existing cluster has no machine catalog: its nodes are what is offered",
    ("kubernetes", "prices"): "an existing cluster has no price API; declare its cost in the fleet",
    ("kubernetes", "quotas"): "an existing cluster has no quota API beyond its nodes; capacity is the node list",
    ("kubernetes", "scale_pool"): (
        "node count of an existing cluster belongs to its own autoscaler; gpufleet scales placeholder "
        "pods and lets that autoscaler add nodes"
    ),
    ("kubernetes", "warm_pool"): "no warm-pool API; warmth is held by placeholder pods",
}


def cannot_do_reason(cloud: CloudName, capability: Capability) -> str | None:
    """Why `cloud` cannot do `capability`, or None when it can."""
    return CANNOT_DO.get((cloud, capability))


# --------------------------------------------------------------------------- lazy SDKs

_EXTRA_FOR: dict[str, str] = {"boto3": "aws", "google.cloud.compute_v1": "gcp", "kubernetes": "kubernetes"}


def lazy_import(module: str, *, cloud: str) -> ModuleType:
    """Import a cloud SDK on first use, or raise `SdkMissing` with the pip command to fix it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRA_FOR.get(module, cloud)
        raise SdkMissing(
            f"the {cloud} adapter needs {module.split('.')[0]}: pip install 'gpufleet[{extra}]' ({exc})",
            cloud=cloud,
            code="SdkMissing",
        ) from None


# --------------------------------------------------------------------------- the contract


class ProviderAdapter(abc.ABC):
    """The verbs every provider adapter answers. A verb a cloud cannot do raises `Unsupported`
    quoting `CANNOT_DO`; adapters override only what their cloud can do."""

    cloud: ClassVar[CloudName]

    def unsupported(self, capability: Capability) -> Unsupported:
        reason = cannot_do_reason(self.cloud, capability) or "not implemented for this cloud"
        return Unsupported(f"{capability}: {reason}", cloud=self.cloud, code="Unsupported")

    def regions(self) -> list[str]:
        """Regions this account can use."""
        raise self.unsupported("offerings")

    def offerings(self, region: str, *, gpu: str | None = None, progress: Progress | None = None) -> list[GpuOffering]:
        """GPU machine types offered in `region` (optionally only those with GPU model `gpu`)."""
        raise self.unsupported("offerings")

    def prices(self, region: str, machine_types: list[str]) -> list[PriceQuote]:
        """Current prices for the machine types in `region` (per zone where the cloud prices per zone)."""
        raise self.unsupported("prices")

    def quotas(self, region: str) -> list[QuotaInfo]:
        """GPU-relevant quotas of `region`."""
        raise self.unsupported("quotas")

    def pool_state(self, ref: PoolRef) -> PoolState:
        """Desired / ready / min / max node counts of a pool."""
        raise self.unsupported("pool_state")

    def scale_pool(self, request: ScaleRequest) -> ScaleResult:
        """Set a pool's desired node count within its bounds."""
        raise self.unsupported("scale_pool")

    def set_warm_pool(self, ref: PoolRef, min_nodes: int) -> PoolState:
        """Keep `min_nodes` pre-initialised (stopped) machines beside the pool, where the cloud has warm pools."""
        raise self.unsupported("warm_pool")

    def utilisation(self, pool: str) -> PoolUtilisation:
        """GPU use of a pool as the scheduler sees it."""
        raise self.unsupported("utilisation")

    def scale_placeholders(self, pool: str, replicas: int) -> int:
        """Set the placeholder count of a pool; returns the previous count."""
        raise self.unsupported("scale_placeholders")


def normalise_gpu_name(raw: str, memory_gib: float | None = None) -> str:
    """One spelling of a GPU model across clouds: `nvidia-h100-80gb` / `H100` -> `H100`.

    A100 is split by memory (A100-40GB / A100-80GB) because that changes what fits.
    """
    name = raw.strip()
    lowered = name.lower().removeprefix("nvidia-").removeprefix("nvidia ")
    table = {
        "h100-80gb": "H100",
        "h100-mega-80gb": "H100-MEGA",
        "h100": "H100",
        "h200": "H200",
        "h200-141gb": "H200",
        "a100-80gb": "A100-80GB",
        "tesla-a100": "A100-40GB",
        "a100": "A100",
        "l4": "L4",
        "l40s": "L40S",
        "tesla-t4": "T4",
        "t4": "T4",
        "tesla-v100": "V100",
        "v100": "V100",
        "a10g": "A10G",
        "b200": "B200",
        "tesla-p100": "P100",
        "tesla-p4": "P4",
        "gb200": "GB200",
    }
    out = table.get(lowered, name.upper())
    if out == "A100" and memory_gib is not None:
        out = "A100-80GB" if memory_gib > 60 else "A100-40GB"
    return out


def gpu_matches(wanted: str | None, model: str) -> bool:
    """True when the user's `--gpu` filter names this model, case-insensitively: `A100` matches
    `A100-40GB` and `A100-80GB`, but `L4` does not match `L40S`."""
    if not wanted:
        return True
    model = model.lower()
    return any(model == w or model.startswith(w + "-") for w in {wanted.lower(), normalise_gpu_name(wanted).lower()})
