"""Cluster-wide objects and the objects of the pools: the namespace, the placeholder and serving
PriorityClasses, the warm-capacity placeholders, NVIDIA's device plugin and the
cluster-autoscaler priority expander."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from gpufleet.infra import names
from gpufleet.infra.manifests import _k8s
from gpufleet.infra.names import GPU_RESOURCE, LABEL_FLEET, LABEL_POOL
from gpufleet.infra.plan import Plan, PoolPlan

__all__ = [
    "buffered",
    "PLACEHOLDER_PRIORITY",
    "SERVING_PRIORITY",
    "expander_configmap",
    "expander_group_pattern",
    "namespace",
    "nvidia_device_plugin",
    "placeholder_deployment",
    "placeholder_pools",
    "placeholder_priority_class",
    "serving_priority_class",
]

# The cluster-autoscaler overprovisioning convention: pods below the default
# --expendable-pods-priority-cutoff (-10) would not trigger scale-up, so -10 exactly.
PLACEHOLDER_PRIORITY = -10
SERVING_PRIORITY = 1000


def namespace(plan: Plan) -> dict[str, Any]:
    """The fleet's namespace."""
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _k8s.meta(plan, plan.namespace, namespaced=False)}


def _priority_class(plan: Plan, name: str, value: int, preemption: str, description: str) -> dict[str, Any]:
    return {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": _k8s.meta(plan, name, namespaced=False),
        "value": value,
        "preemptionPolicy": preemption,
        "globalDefault": False,
        "description": description,
    }


def placeholder_priority_class(plan: Plan) -> dict[str, Any]:
    """Lowest priority, never preempting: placeholders yield at once to any replica."""
    return _priority_class(
        plan,
        names.placeholder_priority_class(plan.fleet),
        PLACEHOLDER_PRIORITY,
        "Never",
        "gpufleet warm-capacity placeholders: evicted as soon as a model replica needs the GPUs",
    )


def serving_priority_class(plan: Plan) -> dict[str, Any]:
    """Model replicas' priority: above placeholders, so they preempt them."""
    return _priority_class(
        plan,
        names.serving_priority_class(plan.fleet),
        SERVING_PRIORITY,
        "PreemptLowerPriority",
        "gpufleet model replicas",
    )


def buffered(plan: Plan, pool: PoolPlan) -> bool:
    """Whether the pool's declared warm nodes are held by a CapacityBuffer (`autoscalers`), not pause pods."""
    cfg = getattr(plan.clouds, pool.cloud, None)
    return cfg is not None and getattr(cfg, "warm_capacity", "placeholders") == "capacity_buffer"


def placeholder_deployment(
    plan: Plan, pool: PoolPlan, options: _k8s.ManifestOptions = _k8s.DEFAULT_OPTIONS
) -> dict[str, Any]:
    """Pause pods holding the pool's warm nodes: one per node, each requesting all its GPUs."""
    name = names.placeholder_name(pool.name)
    labels = {**_k8s.component_labels(name, names.PLACEHOLDER_COMPONENT), LABEL_POOL: pool.name}
    gpus = str(pool.gpus_per_node)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _k8s.meta(plan, name, labels),
        "spec": {
            # A CapacityBuffer holds the declared warm nodes of a buffered pool; the controller
            # may still scale this Deployment for warmth above them.
            "replicas": 0 if buffered(plan, pool) else pool.warm_nodes,
            "selector": {"matchLabels": {LABEL_FLEET: plan.fleet, names.LABEL_NAME: name}},
            "template": {
                "metadata": {"labels": {LABEL_FLEET: plan.fleet, **labels}},
                "spec": {
                    "priorityClassName": names.placeholder_priority_class(plan.fleet),
                    # Evicted placeholders must free the GPUs immediately.
                    "terminationGracePeriodSeconds": 0,
                    "automountServiceAccountToken": False,
                    "nodeSelector": {LABEL_POOL: pool.name},
                    "tolerations": _k8s.tolerations([pool]),
                    "containers": [
                        {
                            "name": "pause",
                            "image": options.placeholder_image,
                            "resources": {
                                "requests": {GPU_RESOURCE: gpus, "cpu": "10m", "memory": "16Mi"},
                                "limits": {GPU_RESOURCE: gpus, "memory": "32Mi"},
                            },
                            "securityContext": _k8s.restricted_security(),
                        }
                    ],
                },
            },
        },
    }


def placeholder_pools(plan: Plan, pools: Iterable[PoolPlan]) -> list[PoolPlan]:
    """The pools among `pools` that get a placeholder Deployment `warm-<pool>`.

    Those with declared warm nodes, and every pool that follows the first one in some
    deployment's failover chain (with `warm_nodes` replicas, possibly 0): the controller can
    only warm a pool ahead of spill-over by scaling a placeholder Deployment that exists.
    """
    later: set[str] = set()
    for dep in plan.deployments:
        # The controller's chain: the failover order, then any placed pool not in it.
        chain = list(dep.failover) + [p.pool for p in dep.placement if p.pool not in dep.failover]
        later.update(chain[1:])
    return [p for p in pools if p.warm_nodes > 0 or p.name in later]


def nvidia_device_plugin(
    plan: Plan, cluster: _k8s.Cluster, options: _k8s.ManifestOptions = _k8s.DEFAULT_OPTIONS
) -> dict[str, Any]:
    """NVIDIA's device plugin on the cluster's GPU pools (EKS: the NVIDIA AMI has the drivers, not the plugin)."""
    name = f"{plan.fleet}-nvidia-device-plugin"
    labels = _k8s.component_labels(name, "device-plugin")
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {**_k8s.meta(plan, name, labels, namespaced=False), "namespace": "kube-system"},
        "spec": {
            "selector": {"matchLabels": {LABEL_FLEET: plan.fleet, names.LABEL_NAME: name}},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": {LABEL_FLEET: plan.fleet, **labels}},
                "spec": {
                    "priorityClassName": "system-node-critical",
                    "automountServiceAccountToken": False,
                    "affinity": _k8s.node_affinity({"key": LABEL_POOL, "operator": "In", "values": cluster.pool_names}),
                    "tolerations": [
                        {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
                        *_k8s.tolerations(cluster.pools),
                    ],
                    "containers": [
                        {
                            "name": "nvidia-device-plugin",
                            "image": options.device_plugin_image,
                            "env": [{"name": "FAIL_ON_INIT_ERROR", "value": "false"}],
                            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
                            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                            "volumeMounts": [{"name": "device-plugin", "mountPath": "/var/lib/kubelet/device-plugins"}],
                        }
                    ],
                    "volumes": [{"name": "device-plugin", "hostPath": {"path": "/var/lib/kubelet/device-plugins"}}],
                },
            },
        },
    }


def expander_group_pattern(plan: Plan, pool: PoolPlan) -> str:
    """Regex the priority expander matches against the autoscaler's node-group names.

    EKS managed node groups run in an Auto Scaling group named `eks-<nodegroup>-<uuid>`;
    on an existing cluster the node-group naming is unknown, so the pool name is matched.
    """
    if pool.cloud == "aws":
        return f"^eks-{names.node_group_name(plan.fleet, pool.name)}-[0-9a-f-]+$"
    return f".*{pool.name}.*"


def expander_configmap(
    plan: Plan, cluster: _k8s.Cluster, options: _k8s.ManifestOptions = _k8s.DEFAULT_OPTIONS
) -> dict[str, Any]:
    """cluster-autoscaler's priority expander config: priority -> node-group name patterns."""
    by_priority: dict[int, list[str]] = {}
    for pool in cluster.pools:
        by_priority.setdefault(pool.priority, []).append(expander_group_pattern(plan, pool))
    priorities = {prio: by_priority[prio] for prio in sorted(by_priority, reverse=True)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            **_k8s.meta(plan, "cluster-autoscaler-priority-expander", namespaced=False),
            "namespace": options.autoscaler_namespace,
        },
        "data": {"priorities": yaml.safe_dump(priorities, sort_keys=False)},
    }
