"""AWS adapter over boto3: EC2 GPU offerings and spot prices, Service Quotas, EKS node groups,
Auto Scaling warm pools.

On-demand prices are not read here: EC2 has no price call (the Pricing API is a separate,
us-east-1-only service not wrapped yet), so `PriceQuote.on_demand_usd_per_h` stays None and
the bundled catalog's on-demand price stands.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import re
from collections.abc import Iterator
from typing import Any, ClassVar, cast

from gpufleet.provider_adapters import base, errors
from gpufleet.provider_adapters.base import (
    GpuOffering,
    PoolRef,
    PoolState,
    PriceQuote,
    Progress,
    ProviderAdapter,
    QuotaInfo,
    ScaleRequest,
    ScaleResult,
)

__all__ = ["EC2_GPU_QUOTAS", "AwsAdapter", "gpu_quota_code"]

# Service Quotas codes that cap GPU machines, counted in vCPUs. (code, description, family
# prefixes, spot?). P covers p2..p6, G covers g4dn..g7e and VT.
EC2_GPU_QUOTAS: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    ("L-417A185B", "Running On-Demand P instances", ("p",), False),
    ("L-DB2E81BA", "Running On-Demand G and VT instances", ("g", "vt"), False),
    ("L-7212CCBC", "All P Spot Instance Requests", ("p",), True),
    ("L-3819A6DF", "All G and VT Spot Instance Requests", ("g", "vt"), True),
)


_GPU_FAMILY_GLOBS = ("p*", "g*", "vt*")


def _family(machine_type: str) -> str:
    match = re.match(r"[a-z]+", machine_type)
    return match.group(0) if match else ""


def gpu_quota_code(machine_type: str, *, spot: bool = False) -> str | None:
    """The Service Quotas code that caps `machine_type` (None for non-GPU families)."""
    family = _family(machine_type)
    for code, _desc, prefixes, is_spot in EC2_GPU_QUOTAS:
        if is_spot == spot and any(family.startswith(p) for p in prefixes):
            return code
    return None


class AwsAdapter(ProviderAdapter):
    """boto3 facade. One client per (service, region), created on first use."""

    cloud: ClassVar[base.CloudName] = "aws"

    def __init__(self, *, session: Any = None, profile: str | None = None, default_region: str = "us-east-1") -> None:
        boto3 = base.lazy_import("boto3", cloud="aws")
        self._session = session or boto3.session.Session(profile_name=profile)
        self._default_region = default_region
        self._clients: dict[tuple[str, str], Any] = {}
        self._type_facts: dict[str, dict[str, dict[str, Any]]] = {}  # region -> type -> facts

    # ------------------------------------------------------------------ plumbing

    def _client(self, service: str, region: str) -> Any:
        key = (service, region)
        if key not in self._clients:
            self._clients[key] = self._session.client(service, region_name=region)
        return self._clients[key]

    @contextlib.contextmanager
    def _errors(self, region: str | None = None, zone: str | None = None) -> Iterator[None]:
        """Map botocore failures to typed adapter errors (the only place this module does so)."""
        botocore_exc = base.lazy_import("botocore.exceptions", cloud="aws")
        try:
            yield
        except botocore_exc.ClientError as exc:
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise errors.map_error(
                "aws",
                str(err.get("Code", "")),
                str(err.get("Message", "")),
                http_status=status,
                region=region,
                zone=zone,
            ) from None
        except botocore_exc.NoCredentialsError:
            raise errors.PermissionDenied(
                "no AWS credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID)",
                cloud="aws",
                code="NoCredentials",
                region=region,
            ) from None
        except botocore_exc.EndpointConnectionError as exc:
            raise errors.AdapterError(
                f"cannot reach {exc.kwargs.get('endpoint_url', 'AWS')}",
                cloud="aws",
                code="EndpointConnectionError",
                blocks="region",
                region=region,
            ) from None

    # ------------------------------------------------------------------ offerings

    def regions(self) -> list[str]:
        with self._errors(self._default_region):
            out = self._client("ec2", self._default_region).describe_regions()
        return sorted(r["RegionName"] for r in out["Regions"])

    def _gpu_types(self, region: str) -> dict[str, dict[str, Any]]:
        """Every instance type with GPUs that `region` knows, keyed by name (cached per region:
        newer types exist only in some regions)."""
        if region not in self._type_facts:
            facts: dict[str, dict[str, Any]] = {}
            with self._errors(region):
                # Every NVIDIA GPU family is p*, g* or vt*; the filter saves paging ~900 types.
                pages = (
                    self._client("ec2", region)
                    .get_paginator("describe_instance_types")
                    .paginate(Filters=[{"Name": "instance-type", "Values": list(_GPU_FAMILY_GLOBS)}])
                )
                for page in pages:
                    for item in page["InstanceTypes"]:
                        if item.get("GpuInfo", {}).get("Gpus"):
                            facts[item["InstanceType"]] = item
            self._type_facts[region] = facts
        return self._type_facts[region]

    def _offering(self, region: str, item: dict[str, Any], zones: tuple[str, ...]) -> GpuOffering:
        gpu = item["GpuInfo"]["Gpus"][0]
        mem_gib = gpu.get("MemoryInfo", {}).get("SizeInMiB", 0) / 1024
        return GpuOffering(
            cloud="aws",
            machine_type=item["InstanceType"],
            gpu_model=base.normalise_gpu_name(gpu.get("Name", "?"), mem_gib),
            gpu_count=sum(g.get("Count", 0) for g in item["GpuInfo"]["Gpus"]),
            gpu_memory_gib=round(mem_gib, 1),
            vcpus=item.get("VCpuInfo", {}).get("DefaultVCpus", 0),
            ram_gib=round(item.get("MemoryInfo", {}).get("SizeInMiB", 0) / 1024, 1),
            region=region,
            zones=zones,
        )

    def offerings(self, region: str, *, gpu: str | None = None, progress: Progress | None = None) -> list[GpuOffering]:
        types = self._gpu_types(region)
        wanted = sorted(
            name for name, item in types.items() if base.gpu_matches(gpu, self._offering(region, item, ()).gpu_model)
        )
        zones: dict[str, set[str]] = {}
        with self._errors(region):
            pages = self._client("ec2", region).get_paginator("describe_instance_type_offerings")
            # The API caps filter values; ask in chunks.
            for start in range(0, len(wanted), 100):
                chunk = wanted[start : start + 100]
                for page in pages.paginate(
                    LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": chunk}]
                ):
                    for off in page["InstanceTypeOfferings"]:
                        zones.setdefault(off["InstanceType"], set()).add(off["Location"])
        if progress:
            progress(region)
        return [self._offering(region, types[name], tuple(sorted(zones[name]))) for name in wanted if name in zones]

    def prices(self, region: str, machine_types: list[str]) -> list[PriceQuote]:
        """Latest Linux spot price per (machine type, zone). On-demand: see module docstring."""
        latest: dict[tuple[str, str], tuple[_dt.datetime, float]] = {}
        with self._errors(region):
            pages = self._client("ec2", region).get_paginator("describe_spot_price_history")
            start = _dt.datetime.now(_dt.UTC) - _dt.timedelta(hours=6)
            for page in pages.paginate(
                InstanceTypes=machine_types,
                StartTime=start,
                ProductDescriptions=["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
            ):
                for item in page["SpotPriceHistory"]:
                    if not item.get("ProductDescription", "").startswith("Linux/UNIX"):
                        continue
                    key = (item["InstanceType"], item["AvailabilityZone"])
                    stamp = item["Timestamp"]
                    if key not in latest or stamp > latest[key][0]:
                        latest[key] = (stamp, float(item["SpotPrice"]))
        return [
            PriceQuote(
                cloud="aws",
                machine_type=mt,
                region=region,
                zone=zone,
                spot_usd_per_h=price,
                observed_at_s=stamp.timestamp(),
            )
            for (mt, zone), (stamp, price) in sorted(latest.items())
        ]

    # ------------------------------------------------------------------ quotas

    def _running_vcpus(self, region: str) -> dict[tuple[str, bool], int]:
        """vCPUs of running/pending instances per (quota family prefix, spot?)."""
        used: dict[tuple[str, bool], int] = {}
        types = self._gpu_types(region)
        with self._errors(region):
            pages = (
                self._client("ec2", region)
                .get_paginator("describe_instances")
                .paginate(Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}])
            )
            for page in pages:
                for reservation in page["Reservations"]:
                    for inst in reservation["Instances"]:
                        mt = inst["InstanceType"]
                        cpu = inst.get("CpuOptions") or {}
                        vcpus = (cpu.get("CoreCount", 0) * cpu.get("ThreadsPerCore", 1)) or (
                            types.get(mt, {}).get("VCpuInfo", {}).get("DefaultVCpus", 0)
                        )
                        spot = inst.get("InstanceLifecycle") == "spot"
                        code = gpu_quota_code(mt, spot=spot)
                        if code:
                            used[(code, spot)] = used.get((code, spot), 0) + vcpus
        return used

    def quotas(self, region: str) -> list[QuotaInfo]:
        """GPU vCPU quotas (Service Quotas) with usage counted from running instances."""
        out: list[QuotaInfo] = []
        last_error: errors.AdapterError | None = None
        used = self._running_vcpus(region)
        for code, desc, prefixes, spot in EC2_GPU_QUOTAS:
            try:
                with self._errors(region):
                    q = self._client("service-quotas", region).get_service_quota(ServiceCode="ec2", QuotaCode=code)
            except errors.NotFound as exc:
                last_error = exc
                continue
            out.append(
                QuotaInfo(
                    cloud="aws",
                    region=region,
                    name=code,
                    description=desc,
                    unit="vcpu",
                    limit=float(q["Quota"]["Value"]),
                    usage=float(used.get((code, spot), 0)),
                    spot=spot,
                    applies_to=prefixes,
                )
            )
        if not out and last_error is not None:
            raise last_error
        return out

    # ------------------------------------------------------------------ pools

    def _nodegroup(self, ref: PoolRef) -> dict[str, Any]:
        if not ref.cluster:
            raise errors.InvalidRequest(
                f"pool {ref.name!r} has no EKS cluster name", cloud="aws", code="MissingCluster", region=ref.region
            )
        with self._errors(ref.region):
            out = self._client("eks", ref.region).describe_nodegroup(clusterName=ref.cluster, nodegroupName=ref.target)
            return cast("dict[str, Any]", out["nodegroup"])  # boto3's responses are untyped

    def _asg_name(self, ref: PoolRef, nodegroup: dict[str, Any] | None) -> str | None:
        if ref.autoscaling_group:
            return ref.autoscaling_group
        groups = ((nodegroup or {}).get("resources") or {}).get("autoScalingGroups") or []
        return groups[0]["name"] if groups else None

    def pool_state(self, ref: PoolRef) -> PoolState:
        ng = self._nodegroup(ref)
        scaling = ng.get("scalingConfig", {})
        ready: int | None = None
        warm: int | None = None
        asg = self._asg_name(ref, ng)
        if asg:
            with self._errors(ref.region):
                client = self._client("autoscaling", ref.region)
                groups = client.describe_auto_scaling_groups(AutoScalingGroupNames=[asg])["AutoScalingGroups"]
                if groups:
                    ready = sum(1 for i in groups[0].get("Instances", []) if i.get("LifecycleState") == "InService")
                    if groups[0].get("WarmPoolConfiguration"):
                        warm = int(groups[0]["WarmPoolConfiguration"].get("MinSize", 0))
                    else:
                        conf = client.describe_warm_pool(AutoScalingGroupName=asg).get("WarmPoolConfiguration")
                        warm = int(conf.get("MinSize", 0)) if conf else None
        return PoolState(
            ref=ref,
            desired_nodes=int(scaling.get("desiredSize", 0)),
            ready_nodes=ready,
            min_nodes=int(scaling.get("minSize", 0)),
            max_nodes=int(scaling.get("maxSize", 0)),
            warm_pool_nodes=warm,
            status=str(ng.get("status", "")),
        )

    def scale_pool(self, request: ScaleRequest) -> ScaleResult:
        ref = request.ref
        current = self.pool_state(ref)
        # EKS always reports both bounds, so the `or 0` only satisfies the type checker.
        lo = (current.min_nodes or 0) if request.min_nodes is None else request.min_nodes
        hi = (current.max_nodes or 0) if request.max_nodes is None else request.max_nodes
        if not lo <= request.desired_nodes <= hi:
            raise errors.InvalidRequest(
                f"desired {request.desired_nodes} outside [{lo}, {hi}] for node group {ref.target!r}",
                cloud="aws",
                code="InvalidParameterException",
                region=ref.region,
            )
        with self._errors(ref.region):
            update = self._client("eks", ref.region).update_nodegroup_config(
                clusterName=ref.cluster,
                nodegroupName=ref.target,
                scalingConfig={"minSize": lo, "maxSize": hi, "desiredSize": request.desired_nodes},
            )["update"]
        return ScaleResult(
            ref=ref,
            previous_desired=current.desired_nodes,
            desired_nodes=request.desired_nodes,
            operation=str(update.get("id", "")),
        )

    def set_warm_pool(self, ref: PoolRef, min_nodes: int) -> PoolState:
        """Put an EC2 Auto Scaling warm pool of `min_nodes` stopped instances beside the node group's ASG."""
        asg = self._asg_name(ref, self._nodegroup(ref))
        if not asg:
            raise errors.NotFound(
                f"node group {ref.target!r} has no Auto Scaling group",
                cloud="aws",
                code="NoAutoScalingGroup",
                region=ref.region,
            )
        with self._errors(ref.region):
            self._client("autoscaling", ref.region).put_warm_pool(
                AutoScalingGroupName=asg, MinSize=min_nodes, PoolState="Stopped"
            )
        return self.pool_state(ref)
