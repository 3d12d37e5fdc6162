"""The compiled plan as Kubernetes objects (plain dicts), written once for every backend.

The Pulumi components (`gpufleet.infra.pulumi`) register exactly these objects, and
`gpufleet render manifests` writes them as YAML for GitOps users, so both paths deploy the
same thing. Nothing here recomputes placement: replica counts per pool, warm nodes, KV
capacity and failover order all come from the `Plan`.

How the router finds each replica
---------------------------------
KV-cache-aware routing needs one endpoint per engine process, not a load-balanced Service.
Each (deployment, pool) of the placement is a StatefulSet named `<deployment>-<pool>`, so
its pods are named `<deployment>-<pool>-<k>`: exactly the plan's replica ids. The
StatefulSets of a deployment share one headless Service named after the deployment, which
gives every pod the stable DNS name

    <replica-id>.<deployment>.<namespace>.svc.cluster.local

and the router config lists those names (the default of `gpufleet render router-config`).
Replicas in another cluster than the router's are addressed through the Kubernetes
Multi-Cluster Services DNS (`<replica-id>.<cluster>.<deployment>.<namespace>.svc.clusterset.local`),
which a multi-cluster network (GKE MCS, Submariner Lighthouse ...) must provide.

Objects per cluster (a cloud's cluster: aws EKS, gcp GKE, or the existing `kubernetes` one):
the namespace; PriorityClasses `<fleet>-placeholder` (-10, never preempts) and
`<fleet>-serving`; a placeholder Deployment `warm-<pool>` per pool with warm nodes; the
cluster-autoscaler priority expander ConfigMap (not on GKE, whose managed autoscaler does
not read it); per deployment its headless Service, PodDisruptionBudget and one StatefulSet
per pool of its failover order in this cluster (replicas = the plan's placement there, 0 for
failover-only pools). The router (ConfigMap, ServiceAccount, Deployment, Service) runs in the
cluster of the highest-priority pool.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from gpufleet.infra import render
from gpufleet.infra.plan import DeploymentPlan, Plan, PoolPlan, ReplicaPlan
from gpufleet.router.config import RouterConfig, RouterSettings

__all__ = [
    "GPU_RESOURCE",
    "GPU_TAINT",
    "LABEL_DEPLOYMENT",
    "LABEL_FLEET",
    "LABEL_POOL",
    "LABEL_PRIORITY",
    "PLACEHOLDER_PRIORITY",
    "SERVING_PRIORITY",
    "Cluster",
    "ManifestOptions",
    "admin_secret_name",
    "all_objects",
    "cluster_objects",
    "dump_yaml",
    "clusters",
    "engine_command",
    "expander_configmap",
    "expander_group_pattern",
    "headless_service",
    "model_pdb",
    "model_statefulset",
    "namespace",
    "node_group_name",
    "nvidia_device_plugin",
    "placeholder_deployment",
    "placeholder_priority_class",
    "pool_labels",
    "pool_taints",
    "replica_url",
    "router_cluster",
    "router_config",
    "router_configmap",
    "router_deployment",
    "router_objects",
    "router_service",
    "router_service_account",
    "serving_priority_class",
]

LABEL_POOL = "gpufleet.io/pool"
LABEL_PRIORITY = "gpufleet.io/priority"
LABEL_FLEET = "gpufleet.io/fleet"
LABEL_DEPLOYMENT = "gpufleet.io/deployment"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
# The cluster-autoscaler overprovisioning convention: pods below the default
# --expendable-pods-priority-cutoff (-10) would not trigger scale-up, so -10 exactly.
PLACEHOLDER_PRIORITY = -10
SERVING_PRIORITY = 1000
ROUTER_CONFIG_KEY = "router.yaml"
ROUTER_CONFIG_DIR = "/etc/gpufleet"
ADMIN_TOKEN_ENV = "GPUFLEET_ADMIN_TOKEN"
ADMIN_TOKEN_KEY = "token"
ENGINE_HEALTH_PATH = "/health"  # both vLLM and SGLang serve GET /health


@dataclass(frozen=True)
class ManifestOptions:
    """Deployment choices that are not part of the fleet declaration."""

    router_image: str = "ghcr.io/gpufleet/gpufleet-router:0.1.0"
    router_replicas: int = 1
    router_service_type: str = "ClusterIP"
    placeholder_image: str = "registry.k8s.io/pause:3.10"
    autoscaler_namespace: str = "kube-system"
    hf_token_secret: str | None = None
    shm_size: str = "16Gi"
    # EKS (unlike GKE) does not run NVIDIA's device plugin; without it no node offers nvidia.com/gpu.
    install_device_plugin: bool = True
    device_plugin_image: str = "nvcr.io/nvidia/k8s-device-plugin:v0.17.0"


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
# Clusters and names


def clusters(plan: Plan) -> list[Cluster]:
    """The fleet's clusters, highest pool priority first (local pools have none)."""
    by_cloud: dict[str, list[PoolPlan]] = {}
    for pool in plan.pools:
        if pool.cloud != "local":
            by_cloud.setdefault(pool.cloud, []).append(pool)
    out = []
    for cloud, pools in by_cloud.items():
        cfg = getattr(plan.clouds, cloud, None)
        if cloud == "kubernetes":
            name = (cfg.context if cfg is not None else None) or "kubernetes"
        else:
            name = cfg.cluster
        out.append(Cluster(cloud, name, tuple(pools)))
    order = {p.name: i for i, p in enumerate(plan.pools)}
    out.sort(key=lambda c: (-max(p.priority for p in c.pools), min(order[p.name] for p in c.pools)))
    return out


def router_cluster(plan: Plan) -> Cluster | None:
    """The cluster the router runs in: the one holding the highest-priority pool."""
    found = clusters(plan)
    return found[0] if found else None


def _cluster_of(plan: Plan, pool_name: str) -> Cluster:
    for c in clusters(plan):
        if pool_name in c.pool_names:
            return c
    raise KeyError(pool_name)


def node_group_name(plan: Plan, pool: PoolPlan) -> str:
    """Name of the pool's EKS node group / GKE node pool: `<fleet>-<pool>` (at most 63)."""
    return f"{plan.fleet}-{pool.name}"[:63].rstrip("-")


def expander_group_pattern(plan: Plan, pool: PoolPlan) -> str:
    """Regex the priority expander matches against the autoscaler's node-group names.

    EKS managed node groups run in an Auto Scaling group named `eks-<nodegroup>-<uuid>`;
    on an existing cluster the node-group naming is unknown, so the pool name is matched.
    """
    if pool.cloud == "aws":
        return f"^eks-{node_group_name(plan, pool)}-[0-9a-f-]+$"
    return f".*{pool.name}.*"


def admin_secret_name(plan: Plan) -> str:
    """The Kubernetes Secret holding the router's admin token."""
    settings = _settings(plan)
    return settings.admin_token.secret or f"{plan.fleet}-router-admin"


def _settings(plan: Plan) -> RouterSettings:
    return plan.router if isinstance(plan.router, RouterSettings) else RouterSettings.model_validate(plan.router)


def _meta(plan: Plan, name: str, labels: Mapping[str, str] | None = None, namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {
            "app.kubernetes.io/managed-by": "gpufleet",
            "app.kubernetes.io/part-of": "gpufleet",
            LABEL_FLEET: plan.fleet,
            **(labels or {}),
        },
    }
    if namespaced:
        meta["namespace"] = plan.namespace
    return meta


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


def _tolerations(pools: Iterable[PoolPlan]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for pool in pools:
        for t in pool_taints(pool):
            tol = {"key": t["key"], "operator": "Equal", "value": t["value"], "effect": t["effect"]}
            if tol not in out:
                out.append(tol)
    return out


# ---------------------------------------------------------------------------------------
# Cluster-wide objects


def namespace(plan: Plan) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(plan, plan.namespace, namespaced=False)}


def placeholder_priority_class(plan: Plan) -> dict[str, Any]:
    """Lowest priority, never preempting: placeholders yield at once to any replica."""
    return {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": _meta(plan, f"{plan.fleet}-placeholder", namespaced=False),
        "value": PLACEHOLDER_PRIORITY,
        "preemptionPolicy": "Never",
        "globalDefault": False,
        "description": "gpufleet warm-capacity placeholders: evicted as soon as a model replica needs the GPUs",
    }


def serving_priority_class(plan: Plan) -> dict[str, Any]:
    """Model replicas' priority: above placeholders, so they preempt them."""
    return {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": _meta(plan, f"{plan.fleet}-serving", namespaced=False),
        "value": SERVING_PRIORITY,
        "preemptionPolicy": "PreemptLowerPriority",
        "globalDefault": False,
        "description": "gpufleet model replicas",
    }


def placeholder_deployment(plan: Plan, pool: PoolPlan, options: ManifestOptions = ManifestOptions()) -> dict[str, Any]:
    """Pause pods holding the pool's warm nodes: one per node, each requesting all its GPUs."""
    labels = {"app.kubernetes.io/name": f"warm-{pool.name}", "app.kubernetes.io/component": "placeholder", LABEL_POOL: pool.name}
    gpus = str(pool.gpus_per_node)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(plan, f"warm-{pool.name}", labels),
        "spec": {
            "replicas": pool.warm_nodes,
            "selector": {"matchLabels": {LABEL_FLEET: plan.fleet, "app.kubernetes.io/name": f"warm-{pool.name}"}},
            "template": {
                "metadata": {"labels": {LABEL_FLEET: plan.fleet, **labels}},
                "spec": {
                    "priorityClassName": f"{plan.fleet}-placeholder",
                    # Evicted placeholders must free the GPUs immediately.
                    "terminationGracePeriodSeconds": 0,
                    "automountServiceAccountToken": False,
                    "nodeSelector": {LABEL_POOL: pool.name},
                    "tolerations": _tolerations([pool]),
                    "containers": [
                        {
                            "name": "pause",
                            "image": options.placeholder_image,
                            "resources": {
                                "requests": {GPU_RESOURCE: gpus, "cpu": "10m", "memory": "16Mi"},
                                "limits": {GPU_RESOURCE: gpus, "memory": "32Mi"},
                            },
                            "securityContext": _restricted_security(),
                        }
                    ],
                },
            },
        },
    }


def nvidia_device_plugin(plan: Plan, cluster: Cluster, options: ManifestOptions = ManifestOptions()) -> dict[str, Any]:
    """NVIDIA's device plugin on the cluster's GPU pools (EKS: the NVIDIA AMI has the drivers, not the plugin)."""
    name = f"{plan.fleet}-nvidia-device-plugin"
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "device-plugin"}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {**_meta(plan, name, labels, namespaced=False), "namespace": "kube-system"},
        "spec": {
            "selector": {"matchLabels": {LABEL_FLEET: plan.fleet, "app.kubernetes.io/name": name}},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": {LABEL_FLEET: plan.fleet, **labels}},
                "spec": {
                    "priorityClassName": "system-node-critical",
                    "automountServiceAccountToken": False,
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                        {"matchExpressions": [{"key": LABEL_POOL, "operator": "In", "values": cluster.pool_names}]}]}}},  # fmt: skip
                    "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}, *_tolerations(cluster.pools)],
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


def expander_configmap(plan: Plan, cluster: Cluster, options: ManifestOptions = ManifestOptions()) -> dict[str, Any]:
    """cluster-autoscaler's priority expander config: priority -> node-group name patterns."""
    by_priority: dict[int, list[str]] = {}
    for pool in cluster.pools:
        by_priority.setdefault(pool.priority, []).append(expander_group_pattern(plan, pool))
    priorities = {prio: by_priority[prio] for prio in sorted(by_priority, reverse=True)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            **_meta(plan, "cluster-autoscaler-priority-expander", namespaced=False),
            "namespace": options.autoscaler_namespace,
        },
        "data": {"priorities": yaml.safe_dump(priorities, sort_keys=False)},
    }


# ---------------------------------------------------------------------------------------
# Model deployments


def engine_command(dep: DeploymentPlan) -> list[str]:
    """The engine's command line from the plan (vLLM `vllm serve` or SGLang `launch_server`)."""
    if dep.engine == "vllm":
        cmd = [
            "vllm", "serve", dep.model,
            "--host", "0.0.0.0",
            "--port", str(dep.port),
            "--max-model-len", str(dep.max_model_len),
            "--enable-prefix-caching",
            "--tensor-parallel-size", str(dep.gpus_per_replica),
            "--gpu-memory-utilization", str(dep.gpu_memory_utilization),
            "--max-num-seqs", str(dep.max_concurrent_requests),
        ]  # fmt: skip
    else:
        # SGLang's radix (prefix) cache is on unless --disable-radix-cache is given.
        cmd = [
            "python3", "-m", "sglang.launch_server",
            "--model-path", dep.model,
            "--host", "0.0.0.0",
            "--port", str(dep.port),
            "--context-length", str(dep.max_model_len),
            "--tp-size", str(dep.gpus_per_replica),
            "--mem-fraction-static", str(dep.gpu_memory_utilization),
            "--max-running-requests", str(dep.max_concurrent_requests),
            "--enable-metrics",
        ]  # fmt: skip
    return [*cmd, *dep.engine_args]


def _affinity(plan: Plan, dep: DeploymentPlan, pool: PoolPlan, same_cluster: list[PoolPlan]) -> tuple[dict[str, Any], list[PoolPlan]]:
    """Node affinity: the planned pool first, then lower-priority pools of the same cluster.

    Weights fall with the failover order, so the scheduler spills a replica to the next
    pool only when its own pool has no room; it never moves up past the plan.
    """
    allowed = [p for p in same_cluster if p.name in dep.failover and (p.name == pool.name or p.priority < pool.priority)]
    allowed.sort(key=lambda p: (p.name != pool.name, dep.failover.index(p.name)))
    preferred = [
        {"weight": max(1, 100 - 10 * rank), "preference": {"matchExpressions": [{"key": LABEL_POOL, "operator": "In", "values": [p.name]}]}}
        for rank, p in enumerate(allowed)
    ]
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": LABEL_POOL, "operator": "In", "values": [p.name for p in allowed]}]}]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": preferred,
        }
    }
    return affinity, allowed


def _dep_labels(plan: Plan, dep: DeploymentPlan) -> dict[str, str]:
    return {LABEL_FLEET: plan.fleet, LABEL_DEPLOYMENT: dep.name}


def model_statefulset(
    plan: Plan, dep: DeploymentPlan, pool: PoolPlan, options: ManifestOptions = ManifestOptions()
) -> dict[str, Any]:
    """The replicas of `dep` placed on `pool`: pods named after the plan's replica ids."""
    replicas = sum(p.replicas for p in dep.placement if p.pool == pool.name)
    cluster = _cluster_of(plan, pool.name)
    affinity, allowed = _affinity(plan, dep, pool, list(cluster.pools))
    labels = {
        **_dep_labels(plan, dep),
        "app.kubernetes.io/name": dep.name,
        "app.kubernetes.io/component": "replica",
        "app.kubernetes.io/instance": f"{dep.name}-{pool.name}",
        LABEL_POOL: pool.name,
    }
    gpus = str(dep.gpus_per_replica)
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": "/cache/huggingface"}]
    if options.hf_token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": options.hf_token_secret, "key": "token"}}})

    def probe(period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": ENGINE_HEALTH_PATH, "port": "http"}, "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": failures}

    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(plan, f"{dep.name}-{pool.name}", labels),
        "spec": {
            "replicas": replicas,
            "serviceName": dep.name,
            # Replicas are independent: start them all at once, not one after another.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {**_dep_labels(plan, dep), "app.kubernetes.io/instance": f"{dep.name}-{pool.name}"}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(dep.port), "prometheus.io/path": "/metrics"},
                },
                "spec": {
                    "priorityClassName": f"{plan.fleet}-serving",
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 60,
                    "affinity": affinity,
                    "tolerations": _tolerations(allowed),
                    "containers": [
                        {
                            "name": "engine",
                            "image": dep.image,
                            "command": engine_command(dep)[:1],
                            "args": engine_command(dep)[1:],
                            "ports": [{"name": "http", "containerPort": dep.port, "protocol": "TCP"}],
                            "env": env,
                            "resources": {"requests": {GPU_RESOURCE: gpus}, "limits": {GPU_RESOURCE: gpus}},
                            # Loading weights takes minutes: the startup probe allows 30.
                            "startupProbe": probe(10, 180),
                            "readinessProbe": probe(5, 3),
                            "livenessProbe": probe(15, 4),
                            "volumeMounts": [
                                {"name": "shm", "mountPath": "/dev/shm"},
                                {"name": "cache", "mountPath": "/cache"},
                            ],
                        }
                    ],
                    "volumes": [
                        # Tensor parallelism talks through shared memory; the default 64Mi is too small.
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size}},
                        {"name": "cache", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def headless_service(plan: Plan, dep: DeploymentPlan) -> dict[str, Any]:
    """Gives every replica pod a stable DNS name `<replica-id>.<deployment>.<ns>.svc`."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(plan, dep.name, {"app.kubernetes.io/name": dep.name, LABEL_DEPLOYMENT: dep.name}),
        "spec": {
            "clusterIP": "None",
            "selector": _dep_labels(plan, dep),
            "ports": [{"name": "http", "port": dep.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def model_pdb(plan: Plan, dep: DeploymentPlan) -> dict[str, Any]:
    """Voluntary disruptions (node drains, upgrades) take one replica at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(plan, dep.name, {"app.kubernetes.io/name": dep.name, LABEL_DEPLOYMENT: dep.name}),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _dep_labels(plan, dep)}},
    }


# ---------------------------------------------------------------------------------------
# Router


def replica_url(plan: Plan, replica: ReplicaPlan) -> str:
    """The replica's base URL as seen from the router's cluster (see the module docstring)."""
    dep = plan.deployment(replica.deployment)
    home = router_cluster(plan)
    cluster = _cluster_of(plan, replica.pool)
    if home is None or cluster.name == home.name and cluster.cloud == home.cloud:
        host = f"{replica.id}.{dep.name}.{plan.namespace}.svc.cluster.local"
    else:
        host = f"{replica.id}.{cluster.name}.{dep.name}.{plan.namespace}.svc.clusterset.local"
    return f"http://{host}:{dep.port}"


def router_config(plan: Plan) -> RouterConfig:
    """The router config for the Kubernetes backends (replicas at their pod DNS names)."""
    k8s_plan = plan.model_copy(
        update={
            "deployments": [
                d.model_copy(update={"replicas": [r for r in d.replicas if plan.pool(r.pool).cloud != "local"]})
                for d in plan.deployments
            ]
        }
    )
    return render.router_config(k8s_plan, lambda r: replica_url(plan, r))


def _router_config_text(cfg: RouterConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)


def _router_name(plan: Plan) -> str:
    return f"{plan.fleet}-router"


def _router_labels(plan: Plan) -> dict[str, str]:
    return {"app.kubernetes.io/name": _router_name(plan), "app.kubernetes.io/component": "router"}


def router_configmap(plan: Plan, cfg: RouterConfig | None = None) -> dict[str, Any]:
    cfg = cfg or router_config(plan)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(plan, _router_name(plan), _router_labels(plan)),
        "data": {ROUTER_CONFIG_KEY: _router_config_text(cfg)},
    }


def router_service_account(plan: Plan) -> dict[str, Any]:
    """The router reads its config from a mounted ConfigMap and talks to no Kubernetes API:
    its least RBAC is none at all, and no API token is mounted."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(plan, _router_name(plan), _router_labels(plan)),
        "automountServiceAccountToken": False,
    }


def _restricted_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def router_deployment(plan: Plan, options: ManifestOptions = ManifestOptions(), cfg: RouterConfig | None = None) -> dict[str, Any]:
    """`gpufleet router serve` with the rendered config and the admin token from a Secret."""
    cfg = cfg or router_config(plan)
    settings = cfg.settings
    name = _router_name(plan)
    secret = admin_secret_name(plan)
    env: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": ROUTER_CONFIG_DIR, "readOnly": True}]
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": name}}]
    token = settings.admin_token
    if token.file is not None:
        # subPath mounts just the one file: a directory mount would hide what else is there.
        mounts.append({"name": "admin-token", "mountPath": token.file, "subPath": ADMIN_TOKEN_KEY, "readOnly": True})
        volumes.append({"name": "admin-token", "secret": {"secretName": secret}})
    else:
        # `env` names the variable; a `secret` reference is read from GPUFLEET_ADMIN_TOKEN.
        env.append({"name": token.env or ADMIN_TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": secret, "key": ADMIN_TOKEN_KEY}}})
    port = settings.port
    digest = hashlib.sha256(_router_config_text(cfg).encode()).hexdigest()[:16]

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": 2, "failureThreshold": failures}

    home = router_cluster(plan)
    placement: dict[str, Any] = {}
    if home is not None:
        # Keep the router off the GPU nodes: they are tainted, and it needs none.
        placement = {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": LABEL_POOL, "operator": "DoesNotExist"}]}]}}}}  # fmt: skip
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(plan, name, _router_labels(plan)),
        "spec": {
            "replicas": options.router_replicas,
            "selector": {"matchLabels": {LABEL_FLEET: plan.fleet, **_router_labels(plan)}},
            "template": {
                "metadata": {
                    "labels": {LABEL_FLEET: plan.fleet, **_router_labels(plan)},
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(port),
                        "prometheus.io/path": "/metrics",
                        # A changed config rolls the router.
                        "gpufleet.io/config-sha256": digest,
                    },
                },
                "spec": {
                    "serviceAccountName": name,
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    **placement,
                    "containers": [
                        {
                            "name": "router",
                            "image": options.router_image,
                            "command": ["gpufleet"],
                            "args": ["router", "serve", "--config", f"{ROUTER_CONFIG_DIR}/{ROUTER_CONFIG_KEY}", "--host", "0.0.0.0", "--port", str(port)],
                            "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
                            "env": env,
                            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
                            "startupProbe": probe("/health", 2, 30),
                            "readinessProbe": probe("/ready", 5, 2),
                            "livenessProbe": probe("/health", 10, 3),
                            "securityContext": _restricted_security(),
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


def router_service(plan: Plan, options: ManifestOptions = ManifestOptions()) -> dict[str, Any]:
    port = _settings(plan).port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(plan, _router_name(plan), _router_labels(plan)),
        "spec": {
            "type": options.router_service_type,
            "selector": {LABEL_FLEET: plan.fleet, **_router_labels(plan)},
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def router_objects(plan: Plan, options: ManifestOptions = ManifestOptions()) -> list[dict[str, Any]]:
    """The router's objects, except the admin-token Secret (its value is never rendered)."""
    cfg = router_config(plan)
    return [
        router_configmap(plan, cfg),
        router_service_account(plan),
        router_deployment(plan, options, cfg),
        router_service(plan, options),
    ]


# ---------------------------------------------------------------------------------------
# Everything


def cluster_objects(plan: Plan, cluster: Cluster, options: ManifestOptions = ManifestOptions()) -> list[dict[str, Any]]:
    """Every object of one cluster, in apply order (namespace and priority classes first)."""
    objs = [namespace(plan), placeholder_priority_class(plan), serving_priority_class(plan)]
    if cluster.cloud != "gcp":
        objs.append(expander_configmap(plan, cluster, options))
    if cluster.cloud == "aws" and options.install_device_plugin:
        objs.append(nvidia_device_plugin(plan, cluster, options))
    objs += [placeholder_deployment(plan, p, options) for p in cluster.pools if p.warm_nodes > 0]
    for dep in plan.deployments:
        pools = [plan.pool(n) for n in dep.failover if n in cluster.pool_names]
        if not pools:
            continue
        objs += [headless_service(plan, dep), model_pdb(plan, dep)]
        objs += [model_statefulset(plan, dep, p, options) for p in pools]
    home = router_cluster(plan)
    if home is not None and home.cloud == cluster.cloud:
        objs += router_objects(plan, options)
    return objs


def all_objects(plan: Plan, options: ManifestOptions = ManifestOptions()) -> dict[str, list[dict[str, Any]]]:
    """Objects per cluster, keyed `<cloud>-<cluster name>`."""
    return {f"{c.cloud}-{c.name}": cluster_objects(plan, c, options) for c in clusters(plan)}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the router config, the expander priorities) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(objs: Iterable[Mapping[str, Any]]) -> str:
    """A multi-document YAML stream of the objects."""
    return yaml.dump_all([json.loads(json.dumps(o)) for o in objs], Dumper=_Dumper, sort_keys=False)
