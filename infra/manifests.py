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

from gpufleet.infra import names
from gpufleet.infra import router_config as router_config_mod
from gpufleet.infra.names import GPU_RESOURCE, LABEL_DEPLOYMENT, LABEL_FLEET, LABEL_POOL, LABEL_PRIORITY
from gpufleet.infra.plan import DeploymentPlan, Plan, PoolPlan, ReplicaPlan
from gpufleet.router.config import RouterConfig

__all__ = [
    "GPU_TAINT",
    "PLACEHOLDER_PRIORITY",
    "SERVING_PRIORITY",
    "Cluster",
    "ManifestOptions",
    "admin_secret_name",
    "all_objects",
    "cluster_objects",
    "dump_yaml",
    "clusters",
    "check_controller_options",
    "controller_args",
    "controller_cluster_role",
    "controller_cluster_role_binding",
    "controller_configmap",
    "controller_deployment",
    "controller_node_scaling",
    "controller_objects",
    "controller_role",
    "controller_role_binding",
    "controller_service_account",
    "engine_command",
    "expander_configmap",
    "expander_group_pattern",
    "headless_service",
    "model_pdb",
    "model_statefulset",
    "namespace",
    "nvidia_device_plugin",
    "placeholder_deployment",
    "placeholder_pools",
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

GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
# The cluster-autoscaler overprovisioning convention: pods below the default
# --expendable-pods-priority-cutoff (-10) would not trigger scale-up, so -10 exactly.
PLACEHOLDER_PRIORITY = -10
SERVING_PRIORITY = 1000
ROUTER_CONFIG_KEY = "router.yaml"
ROUTER_CONFIG_DIR = "/etc/gpufleet"
ADMIN_TOKEN_ENV = "GPUFLEET_ADMIN_TOKEN"
ADMIN_TOKEN_KEY = "token"
ENGINE_HEALTH_PATH = "/health"  # both vLLM and SGLang serve GET /health
PLAN_KEY = "plan.json"
CONTROLLER_METRICS_PORT = 9102
CONTROLLER_KUBECONFIG_DIR = "/etc/gpufleet/kube"
CONTROLLER_KUBECONFIG_KEY = "config"
# Cloud credentials of the controller's pod, bound to its ServiceAccount.
AWS_ROLE_ANNOTATION = "eks.amazonaws.com/role-arn"  # EKS IAM Roles for Service Accounts
GCP_SA_ANNOTATION = "iam.gke.io/gcp-service-account"  # GKE Workload Identity


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
    # The warm-capacity / failover controller (`gpufleet controller run`), in the router's cluster.
    controller: bool = True
    # An image with `gpufleet[router,kubernetes]` and the cloud extras (`aws`, `gcp`) installed.
    controller_image: str = "ghcr.io/gpufleet/gpufleet-controller:0.1.0"
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


def expander_group_pattern(plan: Plan, pool: PoolPlan) -> str:
    """Regex the priority expander matches against the autoscaler's node-group names.

    EKS managed node groups run in an Auto Scaling group named `eks-<nodegroup>-<uuid>`;
    on an existing cluster the node-group naming is unknown, so the pool name is matched.
    """
    if pool.cloud == "aws":
        return f"^eks-{names.node_group_name(plan.fleet, pool.name)}-[0-9a-f-]+$"
    return f".*{pool.name}.*"


def admin_secret_name(plan: Plan) -> str:
    """The Kubernetes Secret holding the router's admin token."""
    settings = plan.router
    return settings.admin_token.secret or f"{plan.fleet}-router-admin"


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


def _priority_class(plan: Plan, name: str, value: int, preemption: str, description: str) -> dict[str, Any]:
    return {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": _meta(plan, name, namespaced=False),
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


def placeholder_deployment(plan: Plan, pool: PoolPlan, options: ManifestOptions = ManifestOptions()) -> dict[str, Any]:
    """Pause pods holding the pool's warm nodes: one per node, each requesting all its GPUs."""
    name = names.placeholder_name(pool.name)
    labels = {
        names.LABEL_NAME: name,
        names.LABEL_COMPONENT: names.PLACEHOLDER_COMPONENT,
        LABEL_POOL: pool.name,
    }
    gpus = str(pool.gpus_per_node)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(plan, name, labels),
        "spec": {
            "replicas": pool.warm_nodes,
            "selector": {"matchLabels": {LABEL_FLEET: plan.fleet, names.LABEL_NAME: name}},
            "template": {
                "metadata": {"labels": {LABEL_FLEET: plan.fleet, **labels}},
                "spec": {
                    "priorityClassName": names.placeholder_priority_class(plan.fleet),
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
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            {"key": LABEL_POOL, "operator": "In", "values": cluster.pool_names}
                                        ]
                                    }
                                ]
                            }
                        }
                    },  # fmt: skip
                    "tolerations": [
                        {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
                        *_tolerations(cluster.pools),
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


def _affinity(
    plan: Plan, dep: DeploymentPlan, pool: PoolPlan, same_cluster: list[PoolPlan]
) -> tuple[dict[str, Any], list[PoolPlan]]:
    """Node affinity: the planned pool first, then lower-priority pools of the same cluster.

    Weights fall with the failover order, so the scheduler spills a replica to the next
    pool only when its own pool has no room; it never moves up past the plan.
    """
    allowed = [
        p for p in same_cluster if p.name in dep.failover and (p.name == pool.name or p.priority < pool.priority)
    ]
    allowed.sort(key=lambda p: (p.name != pool.name, dep.failover.index(p.name)))
    preferred = [
        {
            "weight": max(1, 100 - 10 * rank),
            "preference": {"matchExpressions": [{"key": LABEL_POOL, "operator": "In", "values": [p.name]}]},
        }
        for rank, p in enumerate(allowed)
    ]
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": LABEL_POOL, "operator": "In", "values": [p.name for p in allowed]}]}
                ]
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
    set_name = names.replica_set_name(dep.name, pool.name)
    cluster = _cluster_of(plan, pool.name)
    affinity, allowed = _affinity(plan, dep, pool, list(cluster.pools))
    labels = {
        **_dep_labels(plan, dep),
        "app.kubernetes.io/name": dep.name,
        "app.kubernetes.io/component": "replica",
        "app.kubernetes.io/instance": set_name,
        LABEL_POOL: pool.name,
    }
    gpus = str(dep.gpus_per_replica)
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": "/cache/huggingface"}]
    if options.hf_token_secret:
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": options.hf_token_secret, "key": "token"}}}
        )

    def probe(period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": ENGINE_HEALTH_PATH, "port": "http"},
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": failures,
        }

    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(plan, set_name, labels),
        "spec": {
            "replicas": replicas,
            "serviceName": names.model_service_name(dep.name),
            # Replicas are independent: start them all at once, not one after another.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {**_dep_labels(plan, dep), "app.kubernetes.io/instance": set_name}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(dep.port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "priorityClassName": names.serving_priority_class(plan.fleet),
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
        "metadata": _meta(
            plan, names.model_service_name(dep.name), {"app.kubernetes.io/name": dep.name, LABEL_DEPLOYMENT: dep.name}
        ),
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
    service = names.model_service_name(dep.name)
    if home is None or cluster.name == home.name and cluster.cloud == home.cloud:
        host = names.replica_host(replica.id, service, plan.namespace)
    else:
        host = names.replica_host(replica.id, service, plan.namespace, cluster.name)
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
    return router_config_mod.render(k8s_plan, lambda r: replica_url(plan, r))


def _router_config_text(cfg: RouterConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)


def _router_name(plan: Plan) -> str:
    return names.router_name(plan.fleet)


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


def router_deployment(
    plan: Plan, options: ManifestOptions = ManifestOptions(), cfg: RouterConfig | None = None
) -> dict[str, Any]:
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
        env.append(
            {
                "name": token.env or ADMIN_TOKEN_ENV,
                "valueFrom": {"secretKeyRef": {"name": secret, "key": ADMIN_TOKEN_KEY}},
            }
        )
    port = settings.port
    digest = hashlib.sha256(_router_config_text(cfg).encode()).hexdigest()[:16]

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": "http"},
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": failures,
        }

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
                            "args": [
                                "router",
                                "serve",
                                "--config",
                                f"{ROUTER_CONFIG_DIR}/{ROUTER_CONFIG_KEY}",
                                "--host",
                                "0.0.0.0",
                                "--port",
                                str(port),
                            ],
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
    port = plan.router.port
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
# The warm-capacity / failover controller


def _controller_name(plan: Plan) -> str:
    return names.controller_name(plan.fleet)


def _controller_labels(plan: Plan) -> dict[str, str]:
    return {"app.kubernetes.io/name": _controller_name(plan), "app.kubernetes.io/component": "controller"}


def _plan_text(plan: Plan) -> str:
    return json.dumps(plan.to_json_dict(), indent=2, sort_keys=True) + "\n"


def controller_configmap(plan: Plan) -> dict[str, Any]:
    """The compiled plan (`gpufleet plan --format json`) the controller reads with `--config`."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(plan, _controller_name(plan), _controller_labels(plan)),
        "data": {PLAN_KEY: _plan_text(plan)},
    }


def _controller_credentials(plan: Plan, options: ManifestOptions) -> dict[str, str]:
    """ServiceAccount annotations giving the controller's pod cloud credentials.

    IRSA works only for a pod on EKS and Workload Identity only on GKE: the controller runs in
    the router's cluster, so only that cloud's setting applies (`check_controller_options`).
    """
    home = router_cluster(plan)
    out: dict[str, str] = {}
    if home is not None and home.cloud == "aws" and options.controller_aws_role_arn:
        out[AWS_ROLE_ANNOTATION] = options.controller_aws_role_arn
    if home is not None and home.cloud == "gcp" and options.controller_gcp_service_account:
        out[GCP_SA_ANNOTATION] = options.controller_gcp_service_account
    return out


def check_controller_options(plan: Plan, options: ManifestOptions) -> list[str]:
    """Controller settings that cannot work for this plan, one message each (empty: fine)."""
    if not options.controller:
        return []
    home = router_cluster(plan)
    where = home.cloud if home is not None else "no"
    problems = []
    if options.controller_aws_role_arn and where != "aws":
        problems.append(f"controllerAwsRoleArn: the controller runs in the {where} cluster; IRSA works only on EKS")
    if options.controller_gcp_service_account and where != "gcp":
        problems.append(
            f"controllerGcpServiceAccount: the controller runs in the {where} cluster; Workload Identity works only on GKE"
        )
    names = {p.name for p in plan.pools}
    unknown = sorted(set(options.controller_provider_names) - names)
    if unknown:
        problems.append(
            f"controllerProviderNames: no pool named {', '.join(unknown)}; pools: {', '.join(sorted(names))}"
        )
    clouds = {c.cloud for c in clusters(plan)}
    if options.controller_kube_contexts and not options.controller_kubeconfig_secret:
        problems.append(
            "controllerKubeContexts: needs controllerKubeconfigSecret (the kubeconfig holding those contexts)"
        )
    wrong = sorted(set(options.controller_kube_contexts) - clouds)
    if wrong:
        problems.append(
            f"controllerKubeContexts: {', '.join(wrong)} holds no pool of this fleet; clouds: {', '.join(sorted(clouds))}"
        )
    return problems


def _scaled_provider_names(plan: Plan, options: ManifestOptions) -> dict[str, str]:
    """`--provider-name` entries for the pools whose cloud the controller has credentials for."""
    creds = _controller_credentials(plan, options)
    ok = {"aws"} if AWS_ROLE_ANNOTATION in creds else {"gcp"} if GCP_SA_ANNOTATION in creds else set()
    clouds = {p.name: p.cloud for p in plan.pools}
    return {k: v for k, v in sorted(options.controller_provider_names.items()) if clouds.get(k) in ok}


def controller_node_scaling(plan: Plan, options: ManifestOptions) -> bool:
    """Whether the controller may raise node counts, i.e. has the cloud credentials to.

    With node scaling on, `gpufleet controller run` reads every EKS pool's node group: without
    AWS credentials none of those pools would be observed at all (no sample, no action), so
    node scaling stays off and the controller manages placeholders only. GKE pools are read
    only when their instance group is named (`controller_provider_names`).
    """
    creds = _controller_credentials(plan, options)
    has_aws_pools = any(p.cloud == "aws" for p in plan.pools)
    if has_aws_pools and AWS_ROLE_ANNOTATION not in creds:
        return False
    if AWS_ROLE_ANNOTATION in creds:
        return True
    return GCP_SA_ANNOTATION in creds and any(
        plan.pool(n).cloud == "gcp" for n in _scaled_provider_names(plan, options)
    )


def controller_args(plan: Plan, options: ManifestOptions = ManifestOptions()) -> list[str]:
    """Arguments of `gpufleet` in the controller's container (flags of `gpufleet controller run`)."""
    args = [
        "controller", "run",
        "--config", f"{ROUTER_CONFIG_DIR}/{PLAN_KEY}",
        "--metrics-port", str(CONTROLLER_METRICS_PORT),
        "--metrics-host", "0.0.0.0",
    ]  # fmt: skip
    home = router_cluster(plan)
    # Each router pod gauges only its own in-flight requests and the Service reaches one pod
    # per scrape: with several routers the saturation would be understated, so GPU pressure
    # alone drives the controller then.
    if options.router_replicas == 1 and home is not None:
        url = f"http://{names.service_host(_router_name(plan), plan.namespace)}:{plan.router.port}/metrics"
        args += ["--router-metrics", url]
    if controller_node_scaling(plan, options):
        for pool, name in _scaled_provider_names(plan, options).items():
            args += ["--provider-name", f"{pool}={name}"]
    else:
        args.append("--no-node-scaling")
    if options.controller_kubeconfig_secret:
        args += ["--kubeconfig", f"{CONTROLLER_KUBECONFIG_DIR}/{CONTROLLER_KUBECONFIG_KEY}"]
        for cloud, context in sorted(options.controller_kube_contexts.items()):
            args += ["--kube-context", f"{cloud}={context}"]
    return args


def controller_service_account(
    plan: Plan, options: ManifestOptions = ManifestOptions(), *, home: bool = True
) -> dict[str, Any]:
    """The controller's identity; in its own cluster it carries the cloud-credential annotations.

    The API token is mounted by the pod spec only (the account itself does not automount).
    """
    meta = _meta(plan, _controller_name(plan), _controller_labels(plan))
    creds = _controller_credentials(plan, options) if home else {}
    if creds:
        meta["annotations"] = creds
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta, "automountServiceAccountToken": False}


def controller_cluster_role(plan: Plan) -> dict[str, Any]:
    """Cluster-wide, read-only: exactly the two lists `KubernetesAdapter.utilisations` makes
    (`list_node` by pool label, `list_pod_for_all_namespaces`) and nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": _meta(plan, _controller_name(plan), _controller_labels(plan), namespaced=False),
        "rules": [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        ],
    }


def controller_cluster_role_binding(plan: Plan) -> dict[str, Any]:
    name = _controller_name(plan)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": _meta(plan, name, _controller_labels(plan), namespaced=False),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": plan.namespace}],
    }


def controller_role(plan: Plan) -> dict[str, Any]:
    """In the fleet namespace: read and patch the scale of the placeholder Deployments only.

    `KubernetesAdapter` reads `deployments/scale` (`read_namespaced_deployment_scale`) and
    patches it (`patch_namespaced_deployment_scale`); it never reads or changes the
    Deployments themselves. The names cover every pool of the plan, placeholder or not: the
    controller asks about each pool it observes, and a missing one must answer 404 (no
    placeholder, noted) rather than 403 (which fails the whole cluster's observation).
    """
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(plan, _controller_name(plan), _controller_labels(plan)),
        "rules": [
            {
                "apiGroups": ["apps"],
                "resources": ["deployments/scale"],
                "resourceNames": [names.placeholder_name(p.name) for p in plan.pools],
                "verbs": ["get", "patch"],
            }
        ],
    }


def controller_role_binding(plan: Plan) -> dict[str, Any]:
    name = _controller_name(plan)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(plan, name, _controller_labels(plan)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": plan.namespace}],
    }


def controller_deployment(plan: Plan, options: ManifestOptions = ManifestOptions()) -> dict[str, Any]:
    """One `gpufleet controller run` pod reading the plan ConfigMap, metrics on :9102."""
    name = _controller_name(plan)
    labels = _controller_labels(plan)
    mounts: list[dict[str, Any]] = [{"name": "plan", "mountPath": ROUTER_CONFIG_DIR, "readOnly": True}]
    volumes: list[dict[str, Any]] = [{"name": "plan", "configMap": {"name": name}}]
    if options.controller_kubeconfig_secret:
        mounts.append({"name": "kubeconfig", "mountPath": CONTROLLER_KUBECONFIG_DIR, "readOnly": True})
        volumes.append({"name": "kubeconfig", "secret": {"secretName": options.controller_kubeconfig_secret}})

    def probe(period: int, failures: int) -> dict[str, Any]:
        # The metrics server is the controller's only HTTP surface; it starts before the first round.
        return {
            "httpGet": {"path": "/metrics", "port": "metrics"},
            "periodSeconds": period,
            "timeoutSeconds": 3,
            "failureThreshold": failures,
        }

    placement: dict[str, Any] = {}
    if router_cluster(plan) is not None:
        placement = {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": LABEL_POOL, "operator": "DoesNotExist"}]}]}}}}  # fmt: skip
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(plan, name, labels),
        "spec": {
            # One controller: two would act on the same placeholders with separate memories.
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {LABEL_FLEET: plan.fleet, **labels}},
            "template": {
                "metadata": {
                    "labels": {LABEL_FLEET: plan.fleet, **labels},
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(CONTROLLER_METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                        # A changed plan rolls the controller.
                        "gpufleet.io/config-sha256": hashlib.sha256(_plan_text(plan).encode()).hexdigest()[:16],
                    },
                },
                "spec": {
                    "serviceAccountName": name,
                    # The controller talks to the Kubernetes API: it needs its token.
                    "automountServiceAccountToken": True,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    **placement,
                    "containers": [
                        {
                            "name": "controller",
                            "image": options.controller_image,
                            "command": ["gpufleet"],
                            "args": controller_args(plan, options),
                            "ports": [{"name": "metrics", "containerPort": CONTROLLER_METRICS_PORT, "protocol": "TCP"}],
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "256Mi"},
                                "limits": {"memory": "512Mi"},
                            },
                            "startupProbe": probe(2, 60),
                            "readinessProbe": probe(10, 3),
                            "livenessProbe": probe(20, 3),
                            "securityContext": _restricted_security(),
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


def controller_objects(
    plan: Plan, cluster: Cluster, options: ManifestOptions = ManifestOptions()
) -> list[dict[str, Any]]:
    """The controller's objects in `cluster`.

    In the router's cluster: the plan ConfigMap, ServiceAccount, ClusterRole + binding, Role +
    binding and the Deployment. In the fleet's other clusters, only when a kubeconfig Secret is
    configured (the controller then reaches them with that ServiceAccount's token): the
    ServiceAccount and its RBAC. Nothing when the controller is turned off.
    """
    home = router_cluster(plan)
    if not options.controller or home is None:
        return []
    rbac = [
        controller_cluster_role(plan),
        controller_cluster_role_binding(plan),
        controller_role(plan),
        controller_role_binding(plan),
    ]
    if home.cloud == cluster.cloud:
        return [
            controller_configmap(plan),
            controller_service_account(plan, options),
            *rbac,
            controller_deployment(plan, options),
        ]
    if options.controller_kubeconfig_secret:
        return [controller_service_account(plan, options, home=False), *rbac]
    return []


# ---------------------------------------------------------------------------------------
# Everything


def cluster_objects(plan: Plan, cluster: Cluster, options: ManifestOptions = ManifestOptions()) -> list[dict[str, Any]]:
    """Every object of one cluster, in apply order (namespace and priority classes first)."""
    objs = [namespace(plan), placeholder_priority_class(plan), serving_priority_class(plan)]
    if cluster.cloud != "gcp":
        objs.append(expander_configmap(plan, cluster, options))
    if cluster.cloud == "aws" and options.install_device_plugin:
        objs.append(nvidia_device_plugin(plan, cluster, options))
    objs += [placeholder_deployment(plan, p, options) for p in placeholder_pools(plan, cluster.pools)]
    for dep in plan.deployments:
        pools = [plan.pool(n) for n in dep.failover if n in cluster.pool_names]
        if not pools:
            continue
        objs += [headless_service(plan, dep), model_pdb(plan, dep)]
        objs += [model_statefulset(plan, dep, p, options) for p in pools]
    home = router_cluster(plan)
    if home is not None and home.cloud == cluster.cloud:
        objs += router_objects(plan, options)
    objs += controller_objects(plan, cluster, options)
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
