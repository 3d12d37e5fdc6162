"""GCP adapter over google-cloud-compute: GPU machine and accelerator types per zone, regional
GPU quotas, and the zonal managed instance group (MIG) behind a GKE node pool.

Prices are not read (see `base.CANNOT_DO`). A MIG holds no min/max: those bounds live in the
GKE node pool's autoscaling settings, so `PoolState.min_nodes/max_nodes` are None here and
callers enforce the plan's bounds.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from gpufleet.provider_adapters import base, errors
from gpufleet.provider_adapters.base import (
    GpuOffering,
    PoolRef,
    PoolState,
    Progress,
    ProviderAdapter,
    QuotaInfo,
    ScaleRequest,
    ScaleResult,
)

__all__ = ["GPU_MEMORY_GIB", "AcceleratorOffering", "GcpAdapter", "emulator_factory", "quota_gpu_model"]

# Compute Engine does not report GPU memory; these are the published sizes per accelerator type.
GPU_MEMORY_GIB: dict[str, float] = {
    "nvidia-b200": 180,
    "nvidia-h200-141gb": 141,
    "nvidia-h100-80gb": 80,
    "nvidia-h100-mega-80gb": 80,
    "nvidia-a100-80gb": 80,
    "nvidia-tesla-a100": 40,
    "nvidia-l4": 24,
    "nvidia-tesla-t4": 16,
    "nvidia-tesla-v100": 16,
    "nvidia-tesla-p100": 16,
    "nvidia-tesla-p4": 8,
}

OPERATION_TIMEOUT_S = 120.0


class AcceleratorOffering(base._Frozen):
    """An accelerator type attachable in a zone (N1-style GPUs, and those of GPU machine families)."""

    zone: str
    accelerator_type: str
    gpu_model: str
    max_per_instance: int


def quota_gpu_model(metric: str) -> str | None:
    """`PREEMPTIBLE_NVIDIA_A100_80GB_GPUS` -> `A100-80GB`; None for non-GPU metrics."""
    match = re.fullmatch(r"(?:PREEMPTIBLE_|COMMITTED_)?NVIDIA_(.+)_GPUS", metric)
    if not match:
        return None
    raw = match.group(1).replace("_", "-")
    return "A100-40GB" if raw == "A100" else base.normalise_gpu_name(raw)


def emulator_factory(endpoint: str) -> Callable[[Any], Any]:
    """Client factory for a Compute Engine emulator at `endpoint` (`http://host:port`): REST
    transport, anonymous credentials. Real endpoints use the default factory instead."""
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise errors.InvalidRequest(
            f"GCP endpoint {endpoint!r}: expected http://host:port", cloud="gcp", code="BadEndpoint"
        )

    def build(client_class: Any) -> Any:
        from google.auth.credentials import AnonymousCredentials

        transport = client_class.get_transport_class("rest")(
            # google-auth's credentials classes have no annotations
            host=parts.netloc,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            url_scheme=parts.scheme,
        )
        return client_class(transport=transport)

    return build


def _gpu_memory(accelerator_type: str) -> float:
    if accelerator_type in GPU_MEMORY_GIB:
        return GPU_MEMORY_GIB[accelerator_type]
    match = re.search(r"-(\d+)gb$", accelerator_type)
    return float(match.group(1)) if match else 0.0


def _error_code(exc: Any) -> str:
    """The most specific code a google.api_core error carries (operation code or HTTP reason)."""
    for item in getattr(exc, "errors", None) or []:
        if isinstance(item, dict):
            code = item.get("reason") or item.get("code")
        else:
            code = getattr(item, "code", None) or getattr(item, "reason", None)
        if code:
            return str(code)
    return str(getattr(exc, "reason", None) or "")


class GcpAdapter(ProviderAdapter):
    """google-cloud-compute facade for one project.

    `client_factory(ClientClass)` builds each client; by default the client's own
    (Application Default Credentials) construction. Tests pass a factory that points the REST
    transport at a local fake.
    """

    cloud: ClassVar[base.CloudName] = "gcp"

    def __init__(self, project: str, *, client_factory: Callable[[Any], Any] | None = None) -> None:
        self._compute = base.lazy_import("google.cloud.compute_v1", cloud="gcp")
        self.project = project
        self._factory = client_factory or (lambda cls: cls())
        self._clients: dict[str, Any] = {}

    def _client(self, name: str) -> Any:
        if name not in self._clients:
            self._clients[name] = self._factory(getattr(self._compute, name))
        return self._clients[name]

    @contextlib.contextmanager
    def _errors(self, region: str | None = None, zone: str | None = None) -> Iterator[None]:
        """Map google.api_core / google.auth failures to typed adapter errors."""
        core = base.lazy_import("google.api_core.exceptions", cloud="gcp")
        auth = base.lazy_import("google.auth.exceptions", cloud="gcp")
        try:
            yield
        except core.GoogleAPICallError as exc:
            status = getattr(exc, "code", None)
            raise errors.map_error(
                "gcp",
                _error_code(exc),
                getattr(exc, "message", str(exc)),
                http_status=status if isinstance(status, int) else None,
                region=region,
                zone=zone,
            ) from None
        except auth.DefaultCredentialsError:
            raise errors.PermissionDenied(
                "no GCP credentials (run `gcloud auth application-default login`)",
                cloud="gcp",
                code="DefaultCredentialsError",
                region=region,
            ) from None

    # ------------------------------------------------------------------ offerings

    def zones(self, region: str | None = None) -> list[str]:
        """Zones of the project, optionally of one region."""
        with self._errors(region):
            items = list(self._client("ZonesClient").list(project=self.project))
        return sorted(z.name for z in items if region is None or z.region.rsplit("/", 1)[-1] == region)

    def regions(self) -> list[str]:
        with self._errors():
            items = list(self._client("ZonesClient").list(project=self.project))
        return sorted({z.region.rsplit("/", 1)[-1] for z in items})

    def offerings(self, region: str, *, gpu: str | None = None, progress: Progress | None = None) -> list[GpuOffering]:
        """Machine types with attached GPUs (a2, a3, a4, g2 ...) per zone of `region`."""
        found: dict[str, tuple[Any, set[str]]] = {}
        for zone in self.zones(region):
            with self._errors(region, zone):
                machine_types = list(self._client("MachineTypesClient").list(project=self.project, zone=zone))
            for mt in machine_types:
                if mt.accelerators:
                    found.setdefault(mt.name, (mt, set()))[1].add(zone)
            if progress:
                progress(zone)
        out = []
        for name, (mt, zones) in sorted(found.items()):
            acc = mt.accelerators[0]
            memory = _gpu_memory(acc.guest_accelerator_type)
            model = base.normalise_gpu_name(acc.guest_accelerator_type, memory)
            if not base.gpu_matches(gpu, model):
                continue
            out.append(
                GpuOffering(
                    cloud="gcp",
                    machine_type=name,
                    gpu_model=model,
                    gpu_count=sum(a.guest_accelerator_count for a in mt.accelerators),
                    gpu_memory_gib=memory,
                    vcpus=mt.guest_cpus,
                    ram_gib=round(mt.memory_mb / 1024, 1),
                    region=region,
                    zones=tuple(sorted(zones)),
                )
            )
        return out

    def accelerators(self, region: str, *, progress: Progress | None = None) -> list[AcceleratorOffering]:
        """Accelerator types per zone of `region` (what `guestAccelerators` may name)."""
        out: list[AcceleratorOffering] = []
        for zone in self.zones(region):
            with self._errors(region, zone):
                items = list(self._client("AcceleratorTypesClient").list(project=self.project, zone=zone))
            out.extend(
                AcceleratorOffering(
                    zone=zone,
                    accelerator_type=a.name,
                    max_per_instance=a.maximum_cards_per_instance,
                    gpu_model=base.normalise_gpu_name(a.name, _gpu_memory(a.name)),
                )
                for a in items
            )
            if progress:
                progress(zone)
        return out

    def quotas(self, region: str) -> list[QuotaInfo]:
        """Regional GPU quotas (`regions.get` quotas whose metric counts NVIDIA GPUs)."""
        with self._errors(region):
            reg = self._client("RegionsClient").get(project=self.project, region=region)
        out = []
        for q in reg.quotas:
            model = quota_gpu_model(q.metric)
            if model is None:
                continue
            out.append(
                QuotaInfo(
                    cloud="gcp",
                    region=region,
                    name=q.metric,
                    unit="gpu",
                    limit=q.limit,
                    usage=q.usage,
                    spot=q.metric.startswith("PREEMPTIBLE_"),
                    applies_to=(model,),
                )
            )
        return out

    # ------------------------------------------------------------------ pools

    def _zone_of(self, ref: PoolRef) -> str:
        if not ref.zone:
            raise errors.InvalidRequest(
                f"pool {ref.name!r}: a GCE managed instance group needs its zone",
                cloud="gcp",
                code="MissingZone",
                region=ref.region,
            )
        return ref.zone

    def pool_state(self, ref: PoolRef) -> PoolState:
        zone = self._zone_of(ref)
        with self._errors(ref.region, zone):
            igm = self._client("InstanceGroupManagersClient")
            group = igm.get(project=self.project, zone=zone, instance_group_manager=ref.target)
            members = list(
                igm.list_managed_instances(project=self.project, zone=zone, instance_group_manager=ref.target)
            )
        ready = sum(1 for m in members if m.current_action == "NONE" and m.instance_status == "RUNNING")
        return PoolState(
            ref=ref,
            desired_nodes=group.target_size,
            ready_nodes=ready,
            status="STABLE" if group.status.is_stable else "UPDATING",
        )

    def scale_pool(self, request: ScaleRequest) -> ScaleResult:
        """Resize the MIG and wait for the operation; the caller enforces min/max (see module doc)."""
        ref = request.ref
        zone = self._zone_of(ref)
        before = self.pool_state(ref)
        with self._errors(ref.region, zone):
            op = self._client("InstanceGroupManagersClient").resize(
                project=self.project, zone=zone, instance_group_manager=ref.target, size=request.desired_nodes
            )
            op.result(timeout=OPERATION_TIMEOUT_S)
        return ScaleResult(
            ref=ref, previous_desired=before.desired_nodes, desired_nodes=request.desired_nodes, operation=str(op.name)
        )
