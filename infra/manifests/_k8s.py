"""What every object builder of `gpufleet.infra.manifests` shares: the options, the fleet's
clusters, object metadata, pool labels and taints, one HTTP probe, one node-affinity builder
(and with it the "keep off the GPU nodes" placement) and the restricted security context."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpufleet.infra import names, version
from gpufleet.infra.names import GPU_RESOURCE, LABEL_FLEET, LABEL_POOL, LABEL_PRIORITY
from gpufleet.infra.plan import Plan, PoolPlan

__all__ = [
    "GPU_TAINT",
    "DEFAULT_OPTIONS",
    "Cluster",
    "ManifestOptions",
    "cluster_of",
    "clusters",
    "component_labels",
    "http_probe",
    "meta",
    "node_affinity",
    "off_gpu_nodes",
    "pool_labels",
    "pool_taints",
    "restricted_security",
    "router_cluster",
    "scrape_annotations",
    "tolerations",
    "writable_tmp",
]

GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}


@dataclass(frozen=True)
class ManifestOptions:
    """Deployment choices that are not part of the fleet declaration."""

    # Default images: the project's own, tagged with the package version (infra/version.py).
    router_image: str = version.ROUTER_IMAGE
    # Two by default: a PodDisruptionBudget and a pod anti-affinity keep one serving (router.py).
    router_replicas: int = 2
    router_service_type: str = "ClusterIP"
    placeholder_image: str = "registry.k8s.io/pause:3.10"
    autoscaler_namespace: str = "kube-system"
    hf_token_secret: str | None = None
    # The engines' model cache (/cache: HF_HOME): None keeps an emptyDir (weights are fetched
    # again by every new pod); a storage class gives each replica a PersistentVolumeClaim of
    # `model_cache_size` that outlives the pod; `model_cache_host_path` shares a node directory.
    model_cache_storage_class: str | None = None
    model_cache_size: str = "200Gi"
    model_cache_host_path: str | None = None
    shm_size: str = "16Gi"
    # EKS (unlike GKE) does not run NVIDIA's device plugin; without it no node offers nvidia.com/gpu.
    install_device_plugin: bool = True
    device_plugin_image: str = "nvcr.io/nvidia/k8s-device-plugin:v0.17.0"
    # The warm-capacity / failover controller (`gpufleet controller run`), in the router's cluster.
    controller: bool = True
    # An image with `gpufleet[controller]` (aws, gcp, kubernetes) installed: images/controller.
    controller_image: str = version.CONTROLLER_IMAGE
    # IAM role for IRSA (controller on EKS): lets it resize EKS node groups.
    controller_aws_role_arn: str | None = None
    # Google service account for Workload Identity (controller on GKE): lets it resize instance groups.
    controller_gcp_service_account: str | None = None
    # POOL -> EKS node group / GCE instance group behind it (`--provider-name`); GKE pools need it.
    controller_provider_names: Mapping[str, str] = field(default_factory=dict)
    # Multi-cluster fleets: a Secret (key `config`) holding a kubeconfig with a context per
    # cluster, and CLOUD -> context. Without it the controller sees its own cluster only.
    controller_kubeconfig_secret: str | None = None
    controller_kube_contexts: Mapping[str, str] = field(default_factory=dict)


DEFAULT_OPTIONS = ManifestOptions()


@dataclass(frozen=True)
class Cluster:
    """One Kubernetes cluster of the fleet and the pools whose nodes it holds."""

    cloud: str  # aws | gcp | kubernetes
    name: str
    pools: tuple[PoolPlan, ...] = field(default_factory=tuple)

    @property
    def pool_names(self) -> list[str]:
        return [p.name for p in self.pools]


# ---------------------------------------------------------------------------------------
# Clusters


def clusters(plan: Plan) -> list[Cluster]:
    """The fleet's clusters, highest pool priority first (local pools have none)."""
    by_cloud: dict[str, list[PoolPlan]] = {}
    for pool in plan.pools:
        if pool.cloud != "local":
            by_cloud.setdefault(pool.cloud, []).append(pool)
    out = []
    for cloud, pools in by_cloud.items():
        if cloud == "kubernetes":
            k8s = plan.clouds.kubernetes
            name = (k8s.context if k8s is not None else None) or "kubernetes"
        else:
            cfg = plan.clouds.aws if cloud == "aws" else plan.clouds.gcp
            assert cfg is not None  # the declaration's checks require the cloud of every pool
            name = cfg.cluster
        out.append(Cluster(cloud, name, tuple(pools)))
    order = {p.name: i for i, p in enumerate(plan.pools)}
    out.sort(key=lambda c: (-max(p.priority for p in c.pools), min(order[p.name] for p in c.pools)))
    return out


def router_cluster(plan: Plan) -> Cluster | None:
    """The cluster the router runs in: the one holding the highest-priority pool."""
    found = clusters(plan)
    return found[0] if found else None


def cluster_of(plan: Plan, pool_name: str) -> Cluster:
    """The cluster holding the pool's nodes."""
    for c in clusters(plan):
        if pool_name in c.pool_names:
            return c
    raise KeyError(pool_name)


# ---------------------------------------------------------------------------------------
# Object parts


def meta(plan: Plan, name: str, labels: Mapping[str, str] | None = None, namespaced: bool = True) -> dict[str, Any]:
    """`metadata` of a fleet object: its name, gpufleet's labels and the fleet's namespace."""
    out: dict[str, Any] = {
        "name": name,
        "labels": {
            "app.kubernetes.io/managed-by": "gpufleet",
            "app.kubernetes.io/part-of": "gpufleet",
            LABEL_FLEET: plan.fleet,
            **(labels or {}),
        },
    }
    if namespaced:
        out["namespace"] = plan.namespace
    return out


def component_labels(name: str, component: str) -> dict[str, str]:
    """The `app.kubernetes.io` name and component labels of one workload."""
    return {names.LABEL_NAME: name, names.LABEL_COMPONENT: component}


def scrape_annotations(port: int) -> dict[str, str]:
    """Prometheus scrape annotations of a pod serving /metrics on `port`."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def pool_labels(pool: PoolPlan) -> dict[str, str]:
    """Node labels of a pool: its name and priority (what selectors and affinities use)."""
    return {**pool.labels, LABEL_POOL: pool.name, LABEL_PRIORITY: str(pool.priority)}


def pool_taints(pool: PoolPlan) -> list[dict[str, str]]:
    """Node taints of a pool: the GPU taint, then the declared ones."""
    out = [dict(GPU_TAINT)]
    for t in pool.taints:
        item = {"key": t.key, "value": t.value, "effect": t.effect}
        if item not in out:
            out.append(item)
    return out


def tolerations(pools: Iterable[PoolPlan]) -> list[dict[str, str]]:
    """Tolerations of every taint of the pools' nodes."""
    out: list[dict[str, str]] = []
    for pool in pools:
        for t in pool_taints(pool):
            tol = {"key": t["key"], "operator": "Equal", "value": t["value"], "effect": t["effect"]}
            if tol not in out:
                out.append(tol)
    return out


def node_affinity(required: dict[str, Any], preferred: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A pod's node affinity: nodes must match the `required` expression; `preferred` terms weigh in."""
    affinity: dict[str, Any] = {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [required]}]}
    }
    if preferred is not None:
        affinity["preferredDuringSchedulingIgnoredDuringExecution"] = preferred
    return {"nodeAffinity": affinity}


def off_gpu_nodes(plan: Plan) -> dict[str, Any]:
    """Pod-spec placement of a workload that needs no GPU: off every pool's nodes (they are
    tainted, and it needs none). Nothing when the fleet has no cluster."""
    if router_cluster(plan) is None:
        return {}
    return {"affinity": node_affinity({"key": LABEL_POOL, "operator": "DoesNotExist"})}


def http_probe(path: str, port: str, *, period_s: int, timeout_s: int, failures: int) -> dict[str, Any]:
    """A startup, readiness or liveness probe: GET `path` on the named container port."""
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period_s,
        "timeoutSeconds": timeout_s,
        "failureThreshold": failures,
    }


def writable_tmp() -> tuple[dict[str, Any], dict[str, Any]]:
    """The volume mount and volume of a small emptyDir at /tmp: the root filesystem is read-only
    (`restricted_security`), and Python's tempfile needs one directory it may write (the kubernetes
    client writes a kubeconfig's inline certificates there). The images set HOME=/tmp too."""
    return {"name": "tmp", "mountPath": "/tmp"}, {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}


def restricted_security() -> dict[str, Any]:
    """A container security context that meets the `restricted` Pod Security Standard."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
