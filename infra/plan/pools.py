"""Stage 1 of the plan: what each pool is made of (GPU model, GPUs per node) and what it costs.

Every pool is checked against the catalog; a pool that cannot be priced or sized reports its
problem and is left out of the later stages (which then skip it without another message).
"""

from __future__ import annotations

from dataclasses import dataclass

from gpufleet.infra import catalog as catalog_mod
from gpufleet.infra import spec

__all__ = ["DEFAULT_SPOT_FRACTION", "PoolMachine", "pool_machines", "pool_region"]

DEFAULT_SPOT_FRACTION = 0.4  # of on-demand, when the catalog has no spot estimate


@dataclass(frozen=True)
class PoolMachine:
    """The facts the plan needs about one pool's machines and their price."""

    gpu_name: str
    gpu: catalog_mod.GpuModel
    gpus_per_node: int
    usd_per_node_hour: float
    price_source: str
    ram_gib: float | None = None
    """Host memory per node (None: not in the catalog; a CPU KV tier cannot be checked)."""
    vcpus: int | None = None
    """vCPUs per node (None: not in the catalog; the engine gets no CPU request)."""
    cloud: str = "kubernetes"
    max_pods: int | None = None
    """EKS: pods per node the VPC CNI allows, which sizes the kubelet's memory reservation."""
    local_nvme_gib: float = 0.0
    host_link: catalog_mod.HostLink = catalog_mod.DEFAULT_HOST_LINK
    network_disk: catalog_mod.NetworkDisk | None = None


def pool_region(fleet: spec.Fleet, pool: spec.Nodepool) -> str | None:
    """The pool's region: its own, else its cloud's."""
    return pool.region or getattr(getattr(fleet.clouds, pool.cloud, None), "region", None)


def _price(pool: spec.Nodepool, machine: catalog_mod.MachineType | None) -> tuple[float, str]:
    """$/node-hour and where it comes from."""
    if pool.usd_per_node_hour is not None:
        return pool.usd_per_node_hour, "declared"
    if pool.cloud == "local":
        return 0.0, "local"
    if machine is None:
        return 0.0, "unknown (existing cluster; declare usd_per_node_hour)"
    if pool.capacity_type == "spot":
        if machine.spot_usd_per_hour is not None:
            return machine.spot_usd_per_hour, f"catalog {machine.cloud} spot estimate"
        return (
            machine.usd_per_hour * DEFAULT_SPOT_FRACTION,
            f"catalog {machine.cloud} on-demand x {DEFAULT_SPOT_FRACTION}",
        )
    return machine.usd_per_hour, f"catalog {machine.cloud} on-demand"


def _similar(catalog: catalog_mod.Catalog, pool: spec.Nodepool) -> list[str]:
    """Catalog machine names of the pool's cloud in the same family as its instance type."""
    family = pool.instance_type.split(".")[0].split("-")[0]
    return [n for n in catalog.machine_names(pool.cloud) if n.split(".")[0].split("-")[0] == family]


def pool_machines(
    fleet: spec.Fleet, catalog: catalog_mod.Catalog, smap: spec.SourceMap, issues: list[spec.FleetIssue]
) -> dict[str, PoolMachine]:
    """The machine facts of every pool that has them; the others' problems go to `issues`."""
    out: dict[str, PoolMachine] = {}
    for i, pool in enumerate(fleet.nodepools):
        loc = ("nodepools", i)
        region = pool_region(fleet, pool)
        machine = catalog.machine(pool.cloud, pool.instance_type)
        if machine is None and pool.cloud in ("aws", "gcp", "local"):
            close = _similar(catalog, pool)
            hint = f"; known {pool.cloud} types like it: {', '.join(close[:8])}" if close else ""
            issues.append(
                smap.issue(
                    loc + ("instance_type",),
                    f"{pool.instance_type!r} is not in the {pool.cloud} catalog{hint} (add it with a user catalog file)",
                )
            )
            continue
        if (
            machine is not None
            and pool.cloud in ("aws", "gcp")
            and region
            and machine.regions
            and region not in machine.regions
        ):
            issues.append(
                smap.issue(
                    loc + ("region" if pool.region else "instance_type",),
                    f"{pool.instance_type} is not offered in {region}; offered in: {', '.join(machine.regions)}",
                )
            )
        gpu_name = pool.gpu or (machine.gpu if machine else None)
        gpus = pool.gpus_per_node or (machine.gpus if machine else None)
        if machine is not None and pool.gpus_per_node and pool.gpus_per_node != machine.gpus:
            issues.append(
                smap.issue(
                    loc + ("gpus_per_node",),
                    f"{pool.gpus_per_node} does not match {pool.instance_type}, which has {machine.gpus} GPUs",
                )
            )
        if gpu_name is None or gpus is None:
            issues.append(
                smap.issue(
                    loc + ("instance_type",),
                    f"{pool.instance_type!r} is not in the catalog: declare `gpu` and `gpus_per_node` for this pool",
                )
            )
            continue
        gpu = catalog.gpu(gpu_name)
        if gpu is None:
            issues.append(
                smap.issue(loc + ("gpu",), f"{gpu_name!r} is not a known GPU; known: {', '.join(sorted(catalog.gpus))}")
            )
            continue
        price, source = _price(pool, machine)
        out[pool.name] = PoolMachine(
            gpu_name,
            gpu,
            gpus,
            price,
            source,
            ram_gib=machine.ram_gib if machine else None,
            vcpus=machine.vcpus if machine else None,
            cloud=pool.cloud,
            max_pods=machine.max_pods if machine else None,
            local_nvme_gib=machine.local_nvme_gib if machine else 0.0,
            host_link=catalog.host_link(machine),
            network_disk=catalog.network_disks.get(machine.cloud) if machine else None,
        )
    return out
