"""Tiered KV capacity: what a deployment's `kv_offload` holds, costs and needs of the node.

Pure arithmetic on the catalog's facts (docs/plan.md, "KV offload tiers"):

- host memory of a replica = the engine's own (`ENGINE_HOST_BASE_GIB` + `ENGINE_HOST_PER_GPU_GIB`
  per GPU: the process, CUDA contexts, pinned staging buffers) + its CPU tier `cpu_gib`;
- the CPU tier must fit the replica's share of what its node leaves to pods, beside the
  engine's own host memory (`resources.memory_problem`: the kubelet's reservation per cloud,
  the system daemonsets, the replica's GPU share of the node);
- CPU KV tokens = cpu_gib / KV bytes per token; a CPU hit moves at the machine family's host
  link (PCIe generation, catalog `host_links`) times the replica's GPUs (one x16 link each);
- disk KV tokens = disk_gib / KV bytes per token; the disk is the node's local NVMe when the
  replicas' disks fit it (already paid for), else the cloud's block storage (catalog
  `network_disk`, priced per GiB-month and slower).

The CPU tier costs nothing extra: host memory comes with the node.
"""

from __future__ import annotations

from gpufleet.infra import catalog as catalog_mod
from gpufleet.infra import spec
from gpufleet.infra.plan.model import HOURS_PER_MONTH, KvTierPlan
from gpufleet.infra.plan.pools import PoolMachine

__all__ = [
    "ENGINE_HOST_BASE_GIB",
    "ENGINE_HOST_PER_GPU_GIB",
    "TIER_LOAD_LATENCY_S",
    "engine_host_gib",
    "node_reserved_gib",
    "tier_plan",
]

ENGINE_HOST_BASE_GIB = 6.0
ENGINE_HOST_PER_GPU_GIB = 2.0
TIER_LOAD_LATENCY_S = 0.002
"""Fixed cost of a load from a lower tier (one scheduler round and the DMA set-up), seconds."""

_GIB = catalog_mod.GIB
# GKE's memory reservation: 25% of the first 4 GiB, 20% of the next 4, 10% of the next 8,
# 6% of the next 112, 2% of the rest (https://cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes).
_RESERVE_STEPS = ((4.0, 0.25), (4.0, 0.20), (8.0, 0.10), (112.0, 0.06), (float("inf"), 0.02))


def node_reserved_gib(ram_gib: float) -> float:
    """Host memory the kubelet and system keep on a node of `ram_gib`."""
    left, out = ram_gib, 0.0
    for size, frac in _RESERVE_STEPS:
        part = min(left, size)
        out += part * frac
        left -= part
        if left <= 0:
            break
    return out


def engine_host_gib(dep: spec.Deployment) -> float:
    """Host memory the engine itself needs per replica, without any KV tier."""
    return ENGINE_HOST_BASE_GIB + ENGINE_HOST_PER_GPU_GIB * dep.gpus_per_replica


def tier_plan(dep: spec.Deployment, model: catalog_mod.ModelInfo, machine: PoolMachine) -> KvTierPlan | None:
    """The KV tiers of one replica of `dep` on `machine` (None without `kv_offload`)."""
    off = dep.kv_offload
    backend = dep.offload_backend
    if off is None or backend is None:
        return None
    kv = model.kv_bytes_per_token
    link = machine.host_link
    cpu_gb_s = link.host_to_device_gb_per_s * dep.gpus_per_replica
    disk_medium, disk_gb_s, disk_usd_h, disk_source = None, 0.0, 0.0, ""
    if off.disk_gib:
        per_node = machine.gpus_per_node // dep.gpus_per_replica
        net = machine.network_disk
        if per_node * off.disk_gib <= machine.local_nvme_gib or net is None:
            # One replica reads its share of the node's striped NVMe.
            disk_medium, disk_gb_s = "local_nvme", link.nvme_read_gb_per_s / per_node
            disk_source = link.source if machine.local_nvme_gib else "assumed: local disk"
        else:
            disk_medium, disk_gb_s = net.name, net.read_gb_per_s
            disk_usd_h = off.disk_gib * net.usd_per_gib_month / HOURS_PER_MONTH
            disk_source = net.source
    return KvTierPlan(
        backend=backend,
        cpu_gib=off.cpu_gib,
        disk_gib=off.disk_gib,
        cpu_kv_tokens=int(off.cpu_gib * _GIB // kv),
        disk_kv_tokens=int(off.disk_gib * _GIB // kv),
        pcie_gen=link.pcie_gen,
        cpu_hit_gb_per_s=round(cpu_gb_s, 2),
        cpu_hit_tokens_per_s=round(cpu_gb_s * 1e9 / kv, 1),
        host_link_source=link.source,
        disk_medium=disk_medium,
        disk_hit_gb_per_s=round(disk_gb_s, 3),
        disk_hit_tokens_per_s=round(disk_gb_s * 1e9 / kv, 1),
        disk_source=disk_source,
        load_latency_s=TIER_LOAD_LATENCY_S,
        host_memory_gib=round(engine_host_gib(dep) + off.cpu_gib, 2),
        usd_per_hour=round(disk_usd_h, 4),
    )
