"""The one contract every provider adapter implements, its typed objects and its errors.

Adapters are thin facades over a cloud SDK: they answer *what is offered, at what price,
with what quota, in what state* and perform *scale this pool*. They hold no business
logic (no failover, no thresholds): that lives above them, in `live` and the controller.

Exception tree (every adapter raises only these)::

    AdapterError                 provider, code, message, blocks (zone|region|cloud|request)
    ├── CapacityError            the provider has no machines right now (retry elsewhere)
    ├── QuotaExceeded            the account's quota is spent
    ├── NotOffered               the machine type does not exist in that zone/region
    ├── PermissionDenied         the credentials may not do this
    ├── NotFound                 the pool / cluster / group named does not exist
    ├── InvalidRequest           the provider rejected the request's arguments
    ├── Throttled                too many calls; back off and retry
    ├── Unsupported              the cloud cannot do this verb at all (see CANNOT_DO)
    └── SdkMissing               the cloud's SDK is not installed (with the pip hint)

`map_error` is the ONE place that turns a provider's error code into one of these and into
what it blocks; `ERROR_CODES` is its table, documented in docs/adapters.md.
"""

from __future__ import annotations

import abc
import importlib
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CANNOT_DO",
    "ERROR_CODES",
    "AdapterError",
    "Blocks",
    "CapacityError",
    "Capability",
    "CloudName",
    "GpuOffering",
    "InvalidRequest",
    "NotFound",
    "NotOffered",
    "PermissionDenied",
    "PoolRef",
    "PoolState",
    "PoolUtilisation",
    "PriceQuote",
    "Progress",
    "ProviderAdapter",
    "QuotaExceeded",
    "QuotaInfo",
    "ScaleRequest",
    "ScaleResult",
    "SdkMissing",
    "Throttled",
    "Unsupported",
    "cannot_do_reason",
    "gpu_matches",
    "lazy_import",
    "map_error",
    "normalise_gpu_name",
    "unknown_error",
]

CloudName = Literal["aws", "gcp", "kubernetes"]
Blocks = Literal["zone", "region", "cloud", "request"]
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


# --------------------------------------------------------------------------- errors


class AdapterError(Exception):
    """Base of every adapter error: carries the provider's own code and what it blocks."""

    default_blocks: ClassVar[Blocks] = "request"

    def __init__(
        self,
        message: str,
        *,
        cloud: str,
        code: str = "",
        blocks: Blocks | None = None,
        region: str | None = None,
        zone: str | None = None,
    ) -> None:
        self.cloud = cloud
        self.code = code
        self.blocks: Blocks = blocks or self.default_blocks
        self.region = region
        self.zone = zone
        self.message = message
        where = "/".join(x for x in (cloud, region, zone) if x)
        super().__init__(f"{where}: {code + ': ' if code else ''}{message}")


class CapacityError(AdapterError):
    default_blocks = "zone"


class QuotaExceeded(AdapterError):
    default_blocks = "region"


class NotOffered(AdapterError):
    default_blocks = "zone"


class PermissionDenied(AdapterError):
    default_blocks = "cloud"


class NotFound(AdapterError):
    pass


class InvalidRequest(AdapterError):
    pass


class Throttled(AdapterError):
    pass


class Unsupported(AdapterError):
    default_blocks = "cloud"


class SdkMissing(AdapterError):
    default_blocks = "cloud"


# (cloud, provider code) -> (error type, what it blocks). Codes are matched case-sensitively
# first, then lower-cased (GCP mixes `QUOTA_EXCEEDED` operation codes and `quotaExceeded`
# HTTP reasons). One table, so failover code never parses provider strings itself.
ERROR_CODES: dict[tuple[str, str], tuple[type[AdapterError], Blocks]] = {
    # AWS (EC2 / EKS / Auto Scaling / Service Quotas error codes)
    ("aws", "InsufficientInstanceCapacity"): (CapacityError, "zone"),
    ("aws", "InsufficientCapacity"): (CapacityError, "zone"),
    ("aws", "InsufficientHostCapacity"): (CapacityError, "zone"),
    ("aws", "SpotMaxPriceTooLow"): (CapacityError, "zone"),
    ("aws", "InstanceLimitExceeded"): (QuotaExceeded, "region"),
    ("aws", "VcpuLimitExceeded"): (QuotaExceeded, "region"),
    ("aws", "MaxSpotInstanceCountExceeded"): (QuotaExceeded, "region"),
    ("aws", "ResourceLimitExceeded"): (QuotaExceeded, "region"),
    ("aws", "ServiceQuotaExceededException"): (QuotaExceeded, "region"),
    ("aws", "Unsupported"): (NotOffered, "zone"),
    ("aws", "InvalidInstanceType"): (NotOffered, "region"),
    ("aws", "UnauthorizedOperation"): (PermissionDenied, "cloud"),
    ("aws", "AccessDenied"): (PermissionDenied, "cloud"),
    ("aws", "AccessDeniedException"): (PermissionDenied, "cloud"),
    ("aws", "AuthFailure"): (PermissionDenied, "cloud"),
    ("aws", "UnrecognizedClientException"): (PermissionDenied, "cloud"),
    ("aws", "ExpiredToken"): (PermissionDenied, "cloud"),
    ("aws", "OptInRequired"): (PermissionDenied, "region"),
    ("aws", "ResourceNotFoundException"): (NotFound, "request"),
    ("aws", "NoSuchResourceException"): (NotFound, "request"),
    ("aws", "ValidationError"): (InvalidRequest, "request"),  # Auto Scaling uses it for unknown groups too
    ("aws", "InvalidParameterException"): (InvalidRequest, "request"),
    ("aws", "InvalidParameterValue"): (InvalidRequest, "request"),
    ("aws", "InvalidParameterCombination"): (InvalidRequest, "request"),
    ("aws", "InvalidRequestException"): (InvalidRequest, "request"),
    ("aws", "ResourceInUseException"): (InvalidRequest, "request"),
    ("aws", "Throttling"): (Throttled, "request"),
    ("aws", "ThrottlingException"): (Throttled, "request"),
    ("aws", "RequestLimitExceeded"): (Throttled, "request"),
    ("aws", "TooManyRequestsException"): (Throttled, "request"),
    # GCP (Compute Engine operation error codes and HTTP error reasons)
    ("gcp", "ZONE_RESOURCE_POOL_EXHAUSTED"): (CapacityError, "zone"),
    ("gcp", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"): (CapacityError, "zone"),
    ("gcp", "RESOURCE_POOL_EXHAUSTED"): (CapacityError, "zone"),
    ("gcp", "STOCKOUT"): (CapacityError, "zone"),
    ("gcp", "QUOTA_EXCEEDED"): (QuotaExceeded, "region"),
    ("gcp", "quotaExceeded"): (QuotaExceeded, "region"),
    ("gcp", "rateLimitExceeded"): (Throttled, "request"),
    ("gcp", "userRateLimitExceeded"): (Throttled, "request"),
    ("gcp", "UNSUPPORTED_OPERATION"): (NotOffered, "zone"),
    ("gcp", "RESOURCE_NOT_FOUND"): (NotFound, "request"),
    ("gcp", "notFound"): (NotFound, "request"),
    ("gcp", "forbidden"): (PermissionDenied, "cloud"),
    ("gcp", "accessNotConfigured"): (PermissionDenied, "cloud"),
    ("gcp", "insufficientPermissions"): (PermissionDenied, "cloud"),
    ("gcp", "invalid"): (InvalidRequest, "request"),
    ("gcp", "badRequest"): (InvalidRequest, "request"),
    # Kubernetes (HTTP status reasons of the API server, and scheduler events)
    ("kubernetes", "Forbidden"): (PermissionDenied, "cloud"),
    ("kubernetes", "Unauthorized"): (PermissionDenied, "cloud"),
    ("kubernetes", "NotFound"): (NotFound, "request"),
    ("kubernetes", "Invalid"): (InvalidRequest, "request"),
    ("kubernetes", "BadRequest"): (InvalidRequest, "request"),
    ("kubernetes", "Conflict"): (InvalidRequest, "request"),
    ("kubernetes", "TooManyRequests"): (Throttled, "request"),
}

# HTTP statuses, for errors that carry no better code.
_HTTP_FALLBACK: dict[int, tuple[type[AdapterError], Blocks]] = {
    400: (InvalidRequest, "request"),
    401: (PermissionDenied, "cloud"),
    403: (PermissionDenied, "cloud"),
    404: (NotFound, "request"),
    409: (InvalidRequest, "request"),
    422: (InvalidRequest, "request"),
    429: (Throttled, "request"),
}


def map_error(
    cloud: str,
    code: str,
    message: str,
    *,
    http_status: int | None = None,
    region: str | None = None,
    zone: str | None = None,
) -> AdapterError:
    """Turn a provider error code into the typed error and what it blocks.

    Unknown codes become a plain `AdapterError` blocking only the request, carrying the
    provider's code so nothing is lost.
    """
    hit = ERROR_CODES.get((cloud, code))
    if hit is None:
        lowered = {(c, k.lower()): v for (c, k), v in ERROR_CODES.items()}
        hit = lowered.get((cloud, code.lower()))
    if hit is None and http_status is not None:
        hit = _HTTP_FALLBACK.get(http_status)
    error_type, blocks = hit if hit is not None else (AdapterError, "request")
    return error_type(
        message,
        cloud=cloud,
        code=code or (str(http_status) if http_status else ""),
        blocks=blocks,
        region=region,
        zone=zone,
    )


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


def unknown_error(cloud: str, exc: BaseException, **where: Any) -> AdapterError:
    """Wrap an exception we could not classify, keeping its text (never its credentials)."""
    return AdapterError(str(exc) or type(exc).__name__, cloud=cloud, code=type(exc).__name__, **where)
