"""Every naming rule that more than one part of gpufleet relies on, in one import-free module.

The plan names replicas, the manifests and the Pulumi components name Kubernetes objects and
node groups, the Kubernetes adapter finds pools and placeholders by label and name, and the
controller's CLI finds a pool's EKS node group: each of them reads the rule from here, so the
names the one writes are the names the other looks for. Imports nothing, so any layer can use it.
"""

from __future__ import annotations

__all__ = [
    "GPU_RESOURCE",
    "LABEL_COMPONENT",
    "LABEL_DEPLOYMENT",
    "LABEL_FLEET",
    "LABEL_NAME",
    "LABEL_POOL",
    "LABEL_PRIORITY",
    "PLACEHOLDER_COMPONENT",
    "controller_name",
    "model_service_name",
    "node_group_name",
    "placeholder_name",
    "placeholder_priority_class",
    "replica_host",
    "replica_id",
    "replica_set_name",
    "router_name",
    "service_host",
    "serving_priority_class",
]

# Node labels of every pool (what selectors, affinities and the adapter's node lists use).
LABEL_POOL = "gpufleet.io/pool"
LABEL_PRIORITY = "gpufleet.io/priority"
# Object labels.
LABEL_FLEET = "gpufleet.io/fleet"
LABEL_DEPLOYMENT = "gpufleet.io/deployment"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
# The component label of warm-capacity placeholder pods.
PLACEHOLDER_COMPONENT = "placeholder"
# The extended resource NVIDIA's device plugin advertises.
GPU_RESOURCE = "nvidia.com/gpu"

# EKS node group and GKE node pool names are at most 63 characters.
_MAX_NODE_GROUP = 63


def node_group_name(fleet: str, pool: str) -> str:
    """The pool's EKS node group / GKE node pool: `<fleet>-<pool>` (at most 63 characters)."""
    return f"{fleet}-{pool}"[:_MAX_NODE_GROUP].rstrip("-")


def placeholder_name(pool: str) -> str:
    """The Deployment of pause pods holding the pool's warm nodes."""
    return f"warm-{pool}"


def placeholder_priority_class(fleet: str) -> str:
    """The PriorityClass of the placeholders (lowest: evicted by any replica)."""
    return f"{fleet}-placeholder"


def serving_priority_class(fleet: str) -> str:
    """The PriorityClass of the model replicas (above the placeholders)."""
    return f"{fleet}-serving"


def replica_set_name(deployment: str, pool: str) -> str:
    """The StatefulSet of a deployment's replicas on one pool: `<deployment>-<pool>`."""
    return f"{deployment}-{pool}"


def replica_id(deployment: str, pool: str, index: int) -> str:
    """A replica's id in the plan, which is also its pod's name in the StatefulSet."""
    return f"{replica_set_name(deployment, pool)}-{index}"


def model_service_name(deployment: str) -> str:
    """The headless Service shared by a deployment's StatefulSets (it gives each pod a DNS name)."""
    return deployment


def router_name(fleet: str) -> str:
    """The router's ConfigMap, ServiceAccount, Deployment and Service."""
    return f"{fleet}-router"


def controller_name(fleet: str) -> str:
    """The controller's ConfigMap, ServiceAccount, RBAC objects and Deployment."""
    return f"{fleet}-controller"


def service_host(service: str, namespace: str) -> str:
    """A Service's DNS name inside its cluster."""
    return f"{service}.{namespace}.svc.cluster.local"


def replica_host(replica: str, service: str, namespace: str, cluster: str | None = None) -> str:
    """A replica pod's DNS name: in its own cluster, or (`cluster` given) through Multi-Cluster
    Services DNS from another cluster of the fleet."""
    if cluster is None:
        return f"{replica}.{service_host(service, namespace)}"
    return f"{replica}.{cluster}.{service}.{namespace}.svc.clusterset.local"
