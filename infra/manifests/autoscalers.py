"""Warm capacity and node provisioning for the current autoscalers: CapacityBuffer and Karpenter.

A cloud's `warm_capacity: capacity_buffer` holds each pool's declared warm nodes with an
`autoscaling.x-k8s.io/v1beta1` CapacityBuffer (the SIG Autoscaling API that the Cluster
Autoscaler and Karpenter implement) instead of running pause pods: the buffer's chunks are
virtual pods shaped like one placeholder (all of a node's GPUs, the pool's node selector), so
the autoscaler keeps that many nodes provisioned without pods to preempt. Each buffered pool
gets a PodTemplate `warm-<pool>` (the chunk's shape) and a CapacityBuffer `warm-<pool>`
(`replicas` = the pool's warm nodes). The placeholder Deployment `warm-<pool>` stays, at 0
replicas, for the controller's warmth above the declared one (its plan carries those pools'
warm floor as 0, so the buffer's nodes are not counted twice).

A cloud's `karpenter:` renders one `karpenter.sh/v1` NodePool per pool of that cluster:
the pool's machine type, capacity type and zones as requirements, its labels and taints on
the nodes, a GPU limit of `max_nodes` nodes, and `weight` from the pool's priority (Karpenter
tries higher weights first, as the priority expander does for the Cluster Autoscaler).
"""

from __future__ import annotations

from typing import Any

from gpufleet.infra import names
from gpufleet.infra.manifests import _k8s, pools
from gpufleet.infra.names import GPU_RESOURCE, LABEL_POOL
from gpufleet.infra.plan import Plan, PoolPlan
from gpufleet.infra.spec import Karpenter

__all__ = [
    "CAPACITY_BUFFER_API",
    "KARPENTER_API",
    "autoscaler_objects",
    "buffered",
    "capacity_buffer",
    "buffer_pod_template",
    "karpenter_nodepool",
    "karpenter_settings",
    "karpenter_weights",
]

CAPACITY_BUFFER_API = "autoscaling.x-k8s.io/v1beta1"
KARPENTER_API = "karpenter.sh/v1"
ACTIVE_CAPACITY = "buffer.x-k8s.io/active-capacity"


buffered = pools.buffered


def karpenter_settings(plan: Plan, cloud: str) -> Karpenter | None:
    """The cloud's Karpenter settings, when its cluster provisions nodes with Karpenter."""
    cfg = getattr(plan.clouds, cloud, None)
    k = getattr(cfg, "karpenter", None) if cfg is not None else None
    return k if isinstance(k, Karpenter) else None


def buffer_pod_template(
    plan: Plan, pool: PoolPlan, options: _k8s.ManifestOptions = _k8s.DEFAULT_OPTIONS
) -> dict[str, Any]:
    """The shape of one buffer chunk: the placeholder pod (all of one node's GPUs, on the pool)."""
    deployment = pools.placeholder_deployment(plan, pool, options)
    name = names.placeholder_name(pool.name)
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": _k8s.meta(plan, name, {LABEL_POOL: pool.name}),
        "template": deployment["spec"]["template"],
    }


def capacity_buffer(plan: Plan, pool: PoolPlan) -> dict[str, Any]:
    """The CapacityBuffer holding the pool's declared warm nodes (one chunk per node)."""
    name = names.placeholder_name(pool.name)
    return {
        "apiVersion": CAPACITY_BUFFER_API,
        "kind": "CapacityBuffer",
        "metadata": _k8s.meta(plan, name, {LABEL_POOL: pool.name}),
        "spec": {
            "provisioningStrategy": ACTIVE_CAPACITY,
            "podTemplateRef": {"name": name},
            "replicas": pool.warm_nodes,
        },
    }


def karpenter_weights(pool_list: list[PoolPlan]) -> dict[str, int]:
    """NodePool weight (1..100, higher tried first) per pool, in the order of the pools' priorities.

    Priorities already within 1..100 are kept as they are (priority 100 -> weight 100); others
    are mapped linearly onto 1..100, so the order, and equal priorities, are kept.
    """
    prios = [p.priority for p in pool_list]
    if not prios:
        return {}
    if all(1 <= x <= 100 for x in prios):
        return {p.name: p.priority for p in pool_list}
    lo, hi = min(prios), max(prios)
    if lo == hi:
        return {p.name: 100 for p in pool_list}
    return {p.name: 1 + round(99 * (p.priority - lo) / (hi - lo)) for p in pool_list}


def karpenter_nodepool(plan: Plan, pool: PoolPlan, settings: Karpenter, weight: int) -> dict[str, Any]:
    """A karpenter.sh/v1 NodePool launching the pool's machines, tried by weight."""
    requirements: list[dict[str, Any]] = [
        {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": [pool.instance_type]},
        {
            "key": "karpenter.sh/capacity-type",
            "operator": "In",
            "values": ["spot" if pool.capacity_type == "spot" else "on-demand"],
        },
    ]
    if pool.zones:
        requirements.append({"key": "topology.kubernetes.io/zone", "operator": "In", "values": list(pool.zones)})
    return {
        "apiVersion": KARPENTER_API,
        "kind": "NodePool",
        "metadata": _k8s.meta(
            plan, f"{plan.fleet}-{pool.name}"[:63].rstrip("-"), {LABEL_POOL: pool.name}, namespaced=False
        ),
        "spec": {
            "weight": weight,
            "template": {
                "metadata": {"labels": _k8s.pool_labels(pool)},
                "spec": {
                    "nodeClassRef": {
                        "group": settings.node_class_group,
                        "kind": settings.node_class_kind,
                        "name": settings.node_class,
                    },
                    "requirements": requirements,
                    "taints": _k8s.pool_taints(pool),
                },
            },
            "limits": {GPU_RESOURCE: str(pool.max_nodes * pool.gpus_per_node)},
            # Empty GPU nodes go; busy ones are not shuffled by consolidation (KV caches live there).
            "disruption": {"consolidationPolicy": "WhenEmpty", "consolidateAfter": settings.consolidate_after},
        },
    }


def autoscaler_objects(
    plan: Plan, cluster: _k8s.Cluster, options: _k8s.ManifestOptions = _k8s.DEFAULT_OPTIONS
) -> list[dict[str, Any]]:
    """The cluster's CapacityBuffers (with their PodTemplates) and Karpenter NodePools."""
    objs: list[dict[str, Any]] = []
    for pool in cluster.pools:
        if buffered(plan, pool) and pool.warm_nodes > 0:
            objs += [buffer_pod_template(plan, pool, options), capacity_buffer(plan, pool)]
    settings = karpenter_settings(plan, cluster.cloud)
    if settings is not None:
        weights = karpenter_weights(list(cluster.pools))
        objs += [karpenter_nodepool(plan, p, settings, weights[p.name]) for p in cluster.pools]
    return objs
