"""The router in the cluster of the highest-priority pool: its config in a ConfigMap (the
replicas of its own cluster discovered from their EndpointSlices, the others at their pod DNS
names; with several router replicas, the others found from the router Service's slices for their
queue state), a ServiceAccount (with a Role to get/list/watch EndpointSlices in the fleet
namespace when it discovers), the Deployment of `gpufleet router serve` and its Service. The admin-token
Secret is never rendered (its value is a secret); the Pulumi component creates it from a Pulumi
secret."""

from __future__ import annotations

import hashlib
from typing import Any

import yaml

from gpufleet.infra import names
from gpufleet.infra import router_config as router_config_mod
from gpufleet.infra.manifests import _k8s
from gpufleet.infra.names import LABEL_FLEET
from gpufleet.infra.plan import Plan, ReplicaPlan
from gpufleet.router.config import (
    DiscoverySettings,
    DiscoveryTarget,
    KubernetesDiscovery,
    PeerDiscovery,
    PeerSettings,
    RouterConfig,
)

__all__ = [
    "ADMIN_TOKEN_ENV",
    "ADMIN_TOKEN_KEY",
    "CONFIG_DIR",
    "ROUTER_CONFIG_KEY",
    "SESSION_KEY_KEY",
    "admin_secret_name",
    "discovery_targets",
    "replica_url",
    "router_config",
    "router_configmap",
    "router_deployment",
    "router_objects",
    "router_pdb",
    "router_role",
    "router_role_binding",
    "router_service",
    "router_service_account",
]

ROUTER_CONFIG_KEY = "router.yaml"
CONFIG_DIR = "/etc/gpufleet"  # where the router's config (and the controller's plan) is mounted
ADMIN_TOKEN_ENV = "GPUFLEET_ADMIN_TOKEN"
ADMIN_TOKEN_KEY = "token"
SESSION_KEY_KEY = "session-key"
"""Key of the router Secret holding the session-token signing key every router replica shares."""


def admin_secret_name(plan: Plan) -> str:
    """The Kubernetes Secret holding the router's admin token."""
    return plan.router.admin_token.secret or f"{names.router_name(plan.fleet)}-admin"


def replica_url(plan: Plan, replica: ReplicaPlan) -> str:
    """The replica's base URL as seen from the router's cluster (see the package docstring)."""
    dep = plan.deployment(replica.deployment)
    home = _k8s.router_cluster(plan)
    cluster = _k8s.cluster_of(plan, replica.pool)
    service = names.model_service_name(dep.name)
    if home is None or cluster.name == home.name and cluster.cloud == home.cloud:
        host = names.replica_host(replica.id, service, plan.namespace)
    else:
        host = names.replica_host(replica.id, service, plan.namespace, cluster.name)
    return f"http://{host}:{dep.port}"


TOKENIZER_DIR = "/tokenizer"  # where the router's tokenizer is fetched to (precise mode)


def _single_model(plan: Plan) -> str | None:
    models = {d.model for d in plan.deployments}
    return models.pop() if len(models) == 1 else None


def router_config(plan: Plan, options: _k8s.ManifestOptions = _k8s.DEFAULT_OPTIONS) -> RouterConfig:
    """The router config for the Kubernetes backends: the replicas of the router's own cluster
    are discovered from their EndpointSlices (every replica between min and max, as it becomes
    ready); the others are listed at their pod DNS names. With several router replicas
    (`options.router_replicas`) each reads the others' queue state (`router.peers`), found as the
    ready endpoints of the router's own Service.

    Precise mode without a tokenizer path gets the one the router's init container fetches
    (`router_deployment`), when the fleet serves one model."""
    if plan.router.kv_events.enabled and plan.router.kv_events.tokenizer is None and _single_model(plan):
        kv = plan.router.kv_events.model_copy(update={"tokenizer": TOKENIZER_DIR})
        plan = plan.model_copy(update={"router": plan.router.model_copy(update={"kv_events": kv})})
    found = _discovered(plan)
    k8s_plan = plan.model_copy(
        update={
            "deployments": [
                d.model_copy(
                    update={
                        "replicas": [
                            r for r in d.replicas if plan.pool(r.pool).cloud != "local" and r.pool not in found
                        ]
                    }
                )
                for d in plan.deployments
            ]
        }
    )
    cfg = router_config_mod.render(k8s_plan, lambda r: replica_url(plan, r))
    targets = discovery_targets(plan)
    peers = PeerSettings(
        kubernetes=PeerDiscovery(namespace=plan.namespace, service=names.router_name(plan.fleet), port="http")
        if options.router_replicas > 1
        else None
    )
    if not targets and peers.kubernetes is None:
        return cfg
    discovery = (
        KubernetesDiscovery(
            namespace=plan.namespace,
            label_selector=f"{LABEL_FLEET}={plan.fleet},{names.LABEL_POOL}",
            deployment_label=names.LABEL_DEPLOYMENT,
            pool_label=names.LABEL_POOL,
            targets=targets,
        )
        if targets
        else None
    )
    return cfg.model_copy(update={"discovery": DiscoverySettings(kubernetes=discovery, peers=peers)})


def _talks_to_api(cfg: RouterConfig) -> bool:
    """Whether the router reads EndpointSlices (its replicas or its peers): it needs its token and the Role."""
    return cfg.discovery.kubernetes is not None or cfg.discovery.peers.kubernetes is not None


def _discovered(plan: Plan) -> set[str]:
    """The pools whose replicas the router discovers: those of its own cluster (it can watch
    only its own API server; replicas elsewhere stay listed at their Multi-Cluster DNS names)."""
    home = _k8s.router_cluster(plan)
    return set(home.pool_names) if home is not None else set()


def discovery_targets(plan: Plan) -> list[DiscoveryTarget]:
    """Per (deployment, pool) of the router's cluster: what the plan knows of its replicas."""
    pools = _discovered(plan)
    out = []
    for dep in plan.deployments:
        for perf in dep.pools:
            if perf.pool not in pools or perf.pool not in dep.failover:
                continue
            out.append(
                DiscoveryTarget(
                    deployment=dep.name,
                    pool=perf.pool,
                    model=dep.model,
                    priority=plan.pool(perf.pool).priority,
                    kv_capacity_tokens=perf.kv_cache_tokens_per_replica,
                    max_model_len=dep.max_model_len,
                    max_concurrent_requests=dep.max_concurrent_requests,
                    prefill_tokens_per_s=perf.prefill_tokens_per_s or None,
                    decode_tokens_per_s=perf.decode_tokens_per_s or None,
                    data_parallel_size=router_config_mod.data_parallel_size(dep),
                    max_batched_tokens=router_config_mod.step_tokens(dep),
                )
            )
    return out


def _config_text(cfg: RouterConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)


def _labels(plan: Plan) -> dict[str, str]:
    return _k8s.component_labels(names.router_name(plan.fleet), "router")


def router_configmap(plan: Plan, cfg: RouterConfig | None = None) -> dict[str, Any]:
    """The rendered router config, mounted at /etc/gpufleet/router.yaml."""
    cfg = cfg or router_config(plan)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _k8s.meta(plan, names.router_name(plan.fleet), _labels(plan)),
        "data": {ROUTER_CONFIG_KEY: _config_text(cfg)},
    }


def router_service_account(plan: Plan, cfg: RouterConfig | None = None) -> dict[str, Any]:
    """The router's identity. Its API token is mounted only when it discovers replicas or its
    peers (`router_role`); without discovery it talks to no Kubernetes API at all."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _k8s.meta(plan, names.router_name(plan.fleet), _labels(plan)),
        "automountServiceAccountToken": _talks_to_api(cfg or router_config(plan)),
    }


def router_role(plan: Plan) -> dict[str, Any]:
    """What discovery calls, in the fleet namespace only: `list_namespaced_endpoint_slice`
    (list, and watch; the peers' discovery lists the router Service's slices)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _k8s.meta(plan, names.router_name(plan.fleet), _labels(plan)),
        "rules": [
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
        ],
    }


def router_role_binding(plan: Plan) -> dict[str, Any]:
    name = names.router_name(plan.fleet)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _k8s.meta(plan, name, _labels(plan)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": plan.namespace}],
    }


def router_deployment(
    plan: Plan, options: _k8s.ManifestOptions = _k8s.DEFAULT_OPTIONS, cfg: RouterConfig | None = None
) -> dict[str, Any]:
    """`gpufleet router serve` with the rendered config and the admin token from a Secret."""
    cfg = cfg or router_config(plan, options)
    settings = cfg.settings
    name = names.router_name(plan.fleet)
    secret = admin_secret_name(plan)
    env: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": name}}]
    tmp_mount, tmp_volume = _k8s.writable_tmp()
    mounts.append(tmp_mount)
    volumes.append(tmp_volume)
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
    session_key = settings.session.secret
    if session_key.file is None and session_key.env is not None:
        # Every router replica signs and checks session tokens with the same key (optional: without
        # it the routers issue no tokens and keep sessions each in its own memory).
        env.append(
            {
                "name": session_key.env,
                "valueFrom": {"secretKeyRef": {"name": secret, "key": SESSION_KEY_KEY, "optional": True}},
            }
        )
    port = settings.port
    digest = hashlib.sha256(_config_text(cfg).encode()).hexdigest()[:16]
    init: list[dict[str, Any]] = []
    model = _single_model(plan)
    if settings.kv_events.enabled and settings.kv_events.tokenizer == TOKENIZER_DIR and model is not None:
        # Precise mode tokenizes as the engine does: fetch the model's tokenizer files (not its
        # weights) from the hub at start, with the same HF token secret the engines use.
        hf_env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": "/tmp/hf"}]
        if options.hf_token_secret:
            hf_env.append(
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": options.hf_token_secret, "key": "token"}}}
            )
        init.append(
            {
                "name": "tokenizer",
                "image": options.router_image,
                "command": ["python", "-c"],
                "args": [
                    "import sys; from huggingface_hub import hf_hub_download as d\n"
                    "for f in ('tokenizer.json', 'tokenizer_config.json'):\n"
                    "    d(sys.argv[1], f, local_dir=sys.argv[2])",
                    model,
                    TOKENIZER_DIR,
                ],
                "env": hf_env,
                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
                "securityContext": _k8s.restricted_security(),
                "volumeMounts": [
                    {"name": "tokenizer", "mountPath": TOKENIZER_DIR},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
            }
        )
        mounts.append({"name": "tokenizer", "mountPath": TOKENIZER_DIR, "readOnly": True})
        volumes += [{"name": "tokenizer", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]

    def probe(path: str, period_s: int, failures: int) -> dict[str, Any]:
        return _k8s.http_probe(path, "http", period_s=period_s, timeout_s=2, failures=failures)

    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _k8s.meta(plan, name, _labels(plan)),
        "spec": {
            "replicas": options.router_replicas,
            "selector": {"matchLabels": {LABEL_FLEET: plan.fleet, **_labels(plan)}},
            "template": {
                "metadata": {
                    "labels": {LABEL_FLEET: plan.fleet, **_labels(plan)},
                    # A changed config rolls the router.
                    "annotations": {**_k8s.scrape_annotations(port), "gpufleet.io/config-sha256": digest},
                },
                "spec": {
                    "serviceAccountName": name,
                    "automountServiceAccountToken": _talks_to_api(cfg),
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    **_router_placement(plan, options),
                    **({"initContainers": init} if init else {}),
                    "containers": [
                        {
                            "name": "router",
                            "image": options.router_image,
                            "command": ["gpufleet"],
                            "args": [
                                "router",
                                "serve",
                                "--config",
                                f"{CONFIG_DIR}/{ROUTER_CONFIG_KEY}",
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
                            "securityContext": _k8s.restricted_security(),
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


def _router_placement(plan: Plan, options: _k8s.ManifestOptions) -> dict[str, Any]:
    """Off the GPU nodes; with several router pods, preferably one per node (a node that goes
    takes one router with it, not all)."""
    placement = _k8s.off_gpu_nodes(plan)
    if options.router_replicas < 2:
        return placement
    affinity = dict(placement.get("affinity", {}))
    affinity["podAntiAffinity"] = {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 100,
                "podAffinityTerm": {
                    "labelSelector": {"matchLabels": {LABEL_FLEET: plan.fleet, **_labels(plan)}},
                    "topologyKey": "kubernetes.io/hostname",
                },
            }
        ]
    }
    return {"affinity": affinity}


def router_pdb(plan: Plan) -> dict[str, Any]:
    """With several router pods: voluntary disruptions (drains, upgrades) leave one serving."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _k8s.meta(plan, names.router_name(plan.fleet), _labels(plan)),
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {LABEL_FLEET: plan.fleet, **_labels(plan)}}},
    }


def router_service(plan: Plan, options: _k8s.ManifestOptions = _k8s.DEFAULT_OPTIONS) -> dict[str, Any]:
    """The router's Service (ClusterIP by default)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _k8s.meta(plan, names.router_name(plan.fleet), _labels(plan)),
        "spec": {
            "type": options.router_service_type,
            "selector": {LABEL_FLEET: plan.fleet, **_labels(plan)},
            "ports": [{"name": "http", "port": plan.router.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def router_objects(plan: Plan, options: _k8s.ManifestOptions = _k8s.DEFAULT_OPTIONS) -> list[dict[str, Any]]:
    """The router's objects, except the admin-token Secret (its value is never rendered)."""
    cfg = router_config(plan, options)
    rbac = [router_role(plan), router_role_binding(plan)] if _talks_to_api(cfg) else []
    return [
        router_configmap(plan, cfg),
        router_service_account(plan, cfg),
        *rbac,
        router_deployment(plan, options, cfg),
        router_service(plan, options),
        *([router_pdb(plan)] if options.router_replicas > 1 else []),
    ]
