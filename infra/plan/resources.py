"""A replica's CPU and host-memory requests: its share of what a node leaves to pods.

Pure arithmetic on the catalog's machine facts (docs/plan.md, "Engine CPU and memory"):

- capacity = the catalog's RAM less `VM_MEMORY_OVERHEAD` (7.5%): what the kernel reports, and so
  the kubelet, is below the instance's nominal memory (firmware, kernel, crash kernel);
  Karpenter assumes the same 7.5% (`vmMemoryOverheadPercent`) when it picks a node for a pod;
- allocatable = capacity - the kubelet's kube/system reservation - the hard eviction threshold
  (100 MiB), as the cloud's node image computes them:
  - gcp (GKE): memory 25% of the first 4 GiB, 20% of the next 4, 10% of the next 8, 6% of the
    next 112, 2% above 128 GiB (255 MiB under 1 GiB); CPU 6% of the first core, 1% of the
    next, 0.5% of the next 2, 0.25% above 4
    (https://cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes);
  - aws (EKS AMI, nodeadm): memory 11 MiB x max_pods + 255 MiB (max_pods: the catalog's
    eni-max-pods value, else the kubelet's 110); CPU the same steps as GKE
    (awslabs/amazon-eks-ami nodeadm/internal/kubelet/config.go);
  - kubernetes (an existing cluster) and local: the larger of the two, with 110 pods;
- from allocatable, room for the pods every node runs (kube-proxy, the CNI and CSI node
  agents, logging and metrics agents, the NVIDIA device plugin and DCGM exporter):
  `DAEMONSET_CPU_MILLICORES` and `DAEMONSET_MEMORY_MIB` per node, about what those request on
  EKS and GKE together, with headroom;
- a replica's share = that room x gpus_per_replica / gpus_per_node (replicas per node when
  the GPUs divide evenly; so deployments of different sizes packed on one node still fit);
- the engine container requests its whole share of CPU (no CPU limit: no CFS throttling of the
  engine's busy loops) and of memory, with the memory limit equal to the request. The CPU KV
  tier (`kv_offload.cpu_gib`, pinned host memory) lives inside that share: the engine's own
  need (`tiers.engine_host_gib`) plus the tier must fit it, else the plan errs.
"""

from __future__ import annotations

import math

from gpufleet.infra import spec
from gpufleet.infra.plan.model import EngineResources
from gpufleet.infra.plan.pools import PoolMachine
from gpufleet.infra.plan.tiers import engine_host_gib, node_reserved_gib

__all__ = [
    "DAEMONSET_CPU_MILLICORES",
    "DAEMONSET_MEMORY_MIB",
    "ENGINE_CPU_BASE",
    "EVICTION_MIB",
    "KUBELET_MAX_PODS",
    "VM_MEMORY_OVERHEAD",
    "cpu_short",
    "engine_resources",
    "memory_problem",
    "reserved",
]

EVICTION_MIB = 100  # evictionHard memory.available on both GKE and EKS
KUBELET_MAX_PODS = 110  # the kubelet's default maxPods
VM_MEMORY_OVERHEAD = 0.075
DAEMONSET_CPU_MILLICORES = 500
DAEMONSET_MEMORY_MIB = 1024
ENGINE_CPU_BASE = 2
"""Cores an engine keeps busy besides one per GPU worker: the API server and the engine core's scheduler."""

_MIB_PER_GIB = 1024
# (cores in the step, share reserved): 6% of the first core, 1% of the next, 0.5% of the next 2, 0.25% above.
_CPU_STEPS = ((1.0, 0.06), (1.0, 0.01), (2.0, 0.005), (math.inf, 0.0025))


def _cpu_reserved_millicores(vcpus: int) -> int:
    left, out = float(vcpus), 0.0
    for size, frac in _CPU_STEPS:
        part = min(left, size)
        out += part * frac * 1000
        left -= part
        if left <= 0:
            break
    return math.ceil(out)


def _gke_memory_mib(ram_gib: float) -> int:
    if ram_gib < 1:
        return 255
    return math.ceil(node_reserved_gib(ram_gib) * _MIB_PER_GIB)


def _eks_memory_mib(max_pods: int) -> int:
    return 11 * max_pods + 255


def reserved(machine: PoolMachine) -> tuple[int, int, str]:
    """What the kubelet keeps of a node: (CPU millicores, memory MiB incl. eviction, whose formula)."""
    assert machine.vcpus is not None and machine.ram_gib is not None
    cpu = _cpu_reserved_millicores(machine.vcpus)
    if machine.cloud == "gcp":
        return cpu, _gke_memory_mib(machine.ram_gib) + EVICTION_MIB, "gke"
    if machine.cloud == "aws":
        return cpu, _eks_memory_mib(machine.max_pods or KUBELET_MAX_PODS) + EVICTION_MIB, "eks"
    memory = max(_gke_memory_mib(machine.ram_gib), _eks_memory_mib(machine.max_pods or KUBELET_MAX_PODS))
    return cpu, memory + EVICTION_MIB, "larger of gke and eks"


def engine_resources(dep: spec.Deployment, machine: PoolMachine) -> EngineResources | None:
    """The engine container's CPU and memory on `machine` (None when the catalog lacks its vCPU/RAM)."""
    if machine.vcpus is None or machine.ram_gib is None:
        return None
    cpu_res, mem_res, source = reserved(machine)
    node_cpu = max(0, machine.vcpus * 1000 - cpu_res - DAEMONSET_CPU_MILLICORES)
    capacity = int(machine.ram_gib * _MIB_PER_GIB * (1 - VM_MEMORY_OVERHEAD))
    node_mem = max(0, capacity - mem_res - DAEMONSET_MEMORY_MIB)
    share = dep.gpus_per_replica / machine.gpus_per_node
    tier = dep.kv_offload.cpu_gib if dep.kv_offload is not None else 0.0
    return EngineResources(
        cpu_millicores=int(node_cpu * share),
        memory_mib=int(node_mem * share),
        engine_memory_gib=engine_host_gib(dep),
        kv_tier_memory_gib=tier,
        node_cpu_millicores=node_cpu,
        node_memory_mib=node_mem,
        reserve=source,
    )


def memory_problem(dep: spec.Deployment, pool: str, machine: PoolMachine) -> str | None:
    """Why the engine (and its CPU KV tier) does not fit its share of `pool`'s nodes; None when it fits."""
    res = engine_resources(dep, machine)
    if res is None:
        return None
    share = res.memory_mib / _MIB_PER_GIB
    engine, tier = res.engine_memory_gib, res.kv_tier_memory_gib
    if engine + tier <= share:
        return None
    where = (
        f"a replica's share of a node of pool {pool!r} ({dep.gpus_per_replica} of {machine.gpus_per_node} GPUs) "
        f"is {share:.1f} GiB of the {res.node_memory_mib / _MIB_PER_GIB:.1f} GiB a {machine.ram_gib:g} GiB RAM node "
        f"leaves to pods ({VM_MEMORY_OVERHEAD:.1%} VM overhead, {res.reserve} kubelet reservation, "
        f"{DAEMONSET_MEMORY_MIB} MiB for system daemonsets)"
    )
    if tier:
        fits = max(0.0, share - engine)
        return f"{tier:g} GiB per replica does not fit: {where}, less {engine:g} GiB engine; at most {fits:.1f} GiB per replica"
    return f"{where}: below the {engine:g} GiB its engine needs"


def cpu_short(dep: spec.Deployment, pool: str, machine: PoolMachine) -> str | None:
    """Why a replica's CPU share on `pool` is below what its engine keeps busy; None when it is not."""
    res = engine_resources(dep, machine)
    if res is None:
        return None
    need = ENGINE_CPU_BASE + dep.gpus_per_replica
    if res.cpu_millicores >= need * 1000:
        return None
    return (
        f"a replica on pool {pool!r} gets {res.cpu_millicores}m CPU ({dep.gpus_per_replica} of "
        f"{machine.gpus_per_node} GPUs of a {machine.vcpus}-vCPU node, after the kubelet and system daemonsets); "
        f"its engine keeps about {need} cores busy ({ENGINE_CPU_BASE} + 1 per GPU)"
    )
