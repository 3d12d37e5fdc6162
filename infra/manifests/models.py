"""The model deployments: per (deployment, pool) a StatefulSet of engine pods named after the
plan's replica ids, and per deployment its headless Service and PodDisruptionBudget."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from gpufleet.infra import names
from gpufleet.infra.manifests import _k8s
from gpufleet.infra.names import GPU_RESOURCE, LABEL_DEPLOYMENT, LABEL_FLEET, LABEL_POOL
from gpufleet.infra.plan import DeploymentPlan, Plan, PoolPlan
from gpufleet.router.config import KvEventsSettings

__all__ = [
    "ENGINE_HEALTH_PATH",
    "KV_DISK_PATH",
    "engine_command",
    "engine_option_problems",
    "engine_resources",
    "headless_service",
    "kv_events_args",
    "kv_events_ports",
    "kv_offload_args",
    "kv_offload_env",
    "model_pdb",
    "model_statefulset",
    "pool_service",
]

ENGINE_HEALTH_PATH = "/health"  # both vLLM and SGLang serve GET /health
KV_DISK_PATH = "/kv-disk"  # where a disk KV tier lives in the engine container
_LMCACHE_CONNECTOR = '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'


def kv_offload_args(dep: DeploymentPlan) -> list[str]:
    """The engine flags of the deployment's KV tiers (none without `kv_offload`).

    vLLM native: `--kv-offloading-backend native --kv-offloading-size GiB` (vLLM's CacheConfig:
    the size is the replica's total over its TP ranks). vLLM lmcache: the LMCache connector
    (`--kv-transfer-config`), sized by LMCache's environment (`kv_offload_env`). SGLang:
    `--enable-hierarchical-cache --hicache-size GB` (per TP rank, whole GB) and, with a disk
    tier, `--hicache-storage-backend file`.
    """
    off = dep.kv_offload
    if off is None:
        return []
    backend = off.backend or ("native" if dep.engine == "vllm" else "hicache")
    if backend == "native":
        return ["--kv-offloading-backend", "native", "--kv-offloading-size", f"{off.cpu_gib:g}"]
    if backend == "lmcache":
        return ["--kv-transfer-config", _LMCACHE_CONNECTOR]
    per_rank_gb = max(1, int(off.cpu_gib * 2**30 / 1e9 / dep.gpus_per_replica))
    args = [
        "--enable-hierarchical-cache",
        "--hicache-size",
        str(per_rank_gb),
        "--hicache-write-policy",
        "write_through",
    ]
    if off.disk_gib:
        args += ["--hicache-storage-backend", "file"]
    return args


def kv_offload_env(dep: DeploymentPlan) -> list[dict[str, str]]:
    """The engine environment of the deployment's KV tiers (LMCache's sizes, SGLang's file store)."""
    off = dep.kv_offload
    if off is None:
        return []
    backend = off.backend or ("native" if dep.engine == "vllm" else "hicache")
    env: list[tuple[str, str]] = []
    if backend == "lmcache":
        env += [("LMCACHE_LOCAL_CPU", "True"), ("LMCACHE_MAX_LOCAL_CPU_SIZE", f"{off.cpu_gib:g}")]
        if off.disk_gib:
            env += [
                ("LMCACHE_LOCAL_DISK", f"file://{KV_DISK_PATH}/"),
                ("LMCACHE_MAX_LOCAL_DISK_SIZE", f"{off.disk_gib:g}"),
            ]
    elif backend == "hicache" and off.disk_gib:
        env.append(("SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR", KV_DISK_PATH))
    return [{"name": k, "value": v} for k, v in env]


def kv_events_args(kv: KvEventsSettings | None) -> list[str]:
    """`--kv-events-config` when the router reads KV events (precise mode): a ZMQ PUB on
    `kv.port` and the replay ROUTER on `kv.replay_port`, the router's topic. vLLM and SGLang take
    the same flag and JSON (vLLM's `KVEventsConfig`)."""
    if kv is None or not kv.enabled:
        return []
    config: dict[str, Any] = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{kv.port}",
        "topic": kv.topic,
    }
    if kv.replay_port is not None:
        config["replay_endpoint"] = f"tcp://*:{kv.replay_port}"
    return ["--kv-events-config", json.dumps(config, separators=(",", ":"))]


def kv_events_ports(kv: KvEventsSettings | None) -> list[dict[str, Any]]:
    """The engine container's KV-event ports (none unless precise mode is on)."""
    if kv is None or not kv.enabled:
        return []
    ports = [{"name": "kv-events", "containerPort": kv.port, "protocol": "TCP"}]
    if kv.replay_port is not None:
        ports.append({"name": "kv-replay", "containerPort": kv.replay_port, "protocol": "TCP"})
    return ports


def engine_command(dep: DeploymentPlan, kv_events: KvEventsSettings | None = None) -> list[str]:
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
    return [*cmd, *kv_offload_args(dep), *kv_events_args(kv_events), *dep.engine_args]


def _affinity(
    dep: DeploymentPlan, pool: PoolPlan, same_cluster: list[PoolPlan]
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
    required = {"key": LABEL_POOL, "operator": "In", "values": [p.name for p in allowed]}
    return _k8s.node_affinity(required, preferred), allowed


def _dep_labels(plan: Plan, dep: DeploymentPlan) -> dict[str, str]:
    return {LABEL_FLEET: plan.fleet, LABEL_DEPLOYMENT: dep.name}


def model_statefulset(
    plan: Plan, dep: DeploymentPlan, pool: PoolPlan, options: _k8s.ManifestOptions = _k8s.DEFAULT_OPTIONS
) -> dict[str, Any]:
    """The replicas of `dep` placed on `pool`: pods named after the plan's replica ids."""
    replicas = sum(p.replicas for p in dep.placement if p.pool == pool.name)
    set_name = names.replica_set_name(dep.name, pool.name)
    cluster = _k8s.cluster_of(plan, pool.name)
    affinity, allowed = _affinity(dep, pool, list(cluster.pools))
    labels = {
        **_dep_labels(plan, dep),
        names.LABEL_NAME: dep.name,
        names.LABEL_COMPONENT: "replica",
        "app.kubernetes.io/instance": set_name,
        LABEL_POOL: pool.name,
    }
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": "/cache/huggingface"}]
    if options.hf_token_secret:
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": options.hf_token_secret, "key": "token"}}}
        )

    env += kv_offload_env(dep)
    requests, limits = engine_resources(dep, pool, allowed)
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    claims: list[dict[str, Any]] = []
    tiers = next((pp.kv_tiers for pp in dep.pools if pp.pool == pool.name), None)
    if tiers is not None:
        if tiers.disk_gib:
            mounts.append({"name": "kv-disk", "mountPath": KV_DISK_PATH})
            size = f"{tiers.disk_gib:g}Gi"
            if tiers.disk_medium == "local_nvme":
                requests["ephemeral-storage"] = size
                volumes.append({"name": "kv-disk", "emptyDir": {"sizeLimit": size}})
            else:
                claims.append(
                    {
                        "metadata": {"name": "kv-disk"},
                        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
                    }
                )

    def probe(period_s: int, failures: int) -> dict[str, Any]:
        return _k8s.http_probe(ENGINE_HEALTH_PATH, "http", period_s=period_s, timeout_s=5, failures=failures)

    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _k8s.meta(plan, set_name, labels),
        "spec": {
            "replicas": replicas,
            "serviceName": names.model_service_name(dep.name),
            # Replicas are independent: start them all at once, not one after another.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {**_dep_labels(plan, dep), "app.kubernetes.io/instance": set_name}},
            "template": {
                "metadata": {"labels": labels, "annotations": _k8s.scrape_annotations(dep.port)},
                "spec": {
                    "priorityClassName": names.serving_priority_class(plan.fleet),
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 60,
                    "affinity": affinity,
                    "tolerations": _k8s.tolerations(allowed),
                    "containers": [
                        {
                            "name": "engine",
                            "image": dep.image,
                            "command": engine_command(dep, plan.router.kv_events)[:1],
                            "args": engine_command(dep, plan.router.kv_events)[1:],
                            "ports": [
                                {"name": "http", "containerPort": dep.port, "protocol": "TCP"},
                                *kv_events_ports(plan.router.kv_events),
                            ],
                            "env": env,
                            "resources": {"requests": requests, "limits": limits},
                            # Loading weights takes minutes: the startup probe allows 30.
                            "startupProbe": probe(10, 180),
                            "readinessProbe": probe(5, 3),
                            "livenessProbe": probe(15, 4),
                            "volumeMounts": [
                                {"name": "shm", "mountPath": "/dev/shm"},
                                {"name": "cache", "mountPath": "/cache"},
                                *mounts,
                            ],
                        }
                    ],
                    "volumes": [
                        # Tensor parallelism talks through shared memory; the default 64Mi is too small.
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size}},
                        *_cache_volume(options),
                        *volumes,
                    ],
                },
            },
            **({"volumeClaimTemplates": claims + _cache_claim(options)} if claims or _cache_claim(options) else {}),
        },
    }


def engine_resources(
    dep: DeploymentPlan, pool: PoolPlan, allowed: list[PoolPlan]
) -> tuple[dict[str, str], dict[str, str]]:
    """The engine container's requests and limits: its GPUs, and the plan's CPU and memory share
    (`PoolPerf.resources`) of the smallest node among the pools its affinity allows, so that a pod
    spilled to a lower pool still fits there. The CPU KV tier lives inside the memory share; the
    memory limit equals the request (no CPU limit: a throttled engine stalls every stream)."""
    gpus = str(dep.gpus_per_replica)
    requests: dict[str, str] = {GPU_RESOURCE: gpus}
    limits: dict[str, str] = {GPU_RESOURCE: gpus}
    names_allowed = {p.name for p in allowed} | {pool.name}
    known = [pp.resources for pp in dep.pools if pp.pool in names_allowed and pp.resources is not None]
    if known:
        requests["cpu"] = f"{min(r.cpu_millicores for r in known)}m"
        requests["memory"] = limits["memory"] = f"{min(r.memory_mib for r in known)}Mi"
        return requests, limits
    tiers = next((pp.kv_tiers for pp in dep.pools if pp.pool == pool.name), None)
    if tiers is not None:
        # No node facts (an existing cluster's own machines): still ask for the pinned CPU tier.
        requests["memory"] = f"{tiers.host_memory_gib:g}Gi"
    return requests, limits


_OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?([KMGTPE]i|[kMGTPE])?")


def engine_option_problems(options: _k8s.ManifestOptions, label: Callable[[str], str]) -> list[str]:
    """Why the engines' options (HF token Secret, model cache) cannot work, one line each; `label`
    names an option field the way its reader spells it (`--model-cache-size`, `gpufleet:modelCacheSize`)."""
    out: list[str] = []
    for name in ("hf_token_secret", "model_cache_storage_class"):
        value = getattr(options, name)
        if value is not None and not _OBJECT_NAME.fullmatch(value):
            out.append(f"{label(name)} {value!r}: not a Kubernetes object name (lowercase letters, digits, '-', '.')")
    if options.model_cache_storage_class is not None and options.model_cache_host_path is not None:
        out.append(f"{label('model_cache_storage_class')} and {label('model_cache_host_path')}: give one of them")
    host_path = options.model_cache_host_path
    if host_path is not None and not host_path.startswith("/"):
        out.append(f"{label('model_cache_host_path')} {host_path!r}: must be an absolute path")
    if not _QUANTITY.fullmatch(options.model_cache_size):
        out.append(f"{label('model_cache_size')} {options.model_cache_size!r}: a Kubernetes quantity, e.g. 200Gi")
    return out


def _cache_claim(options: _k8s.ManifestOptions) -> list[dict[str, Any]]:
    """A PersistentVolumeClaim per replica for the model cache, when a storage class is given."""
    if options.model_cache_storage_class is None:
        return []
    return [
        {
            "metadata": {"name": "cache"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": options.model_cache_storage_class,
                "resources": {"requests": {"storage": options.model_cache_size}},
            },
        }
    ]


def _cache_volume(options: _k8s.ManifestOptions) -> list[dict[str, Any]]:
    """The pod volume of the model cache (none when a claim template provides it)."""
    if options.model_cache_storage_class is not None:
        return []
    if options.model_cache_host_path is not None:
        return [{"name": "cache", "hostPath": {"path": options.model_cache_host_path, "type": "DirectoryOrCreate"}}]
    return [{"name": "cache", "emptyDir": {}}]


def _model_meta(plan: Plan, name: str, dep: DeploymentPlan) -> dict[str, Any]:
    return _k8s.meta(plan, name, {names.LABEL_NAME: dep.name, LABEL_DEPLOYMENT: dep.name})


def headless_service(plan: Plan, dep: DeploymentPlan) -> dict[str, Any]:
    """Gives every replica pod a stable DNS name `<replica-id>.<deployment>.<ns>.svc`."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _model_meta(plan, names.model_service_name(dep.name), dep),
        "spec": {
            "clusterIP": "None",
            "selector": _dep_labels(plan, dep),
            "ports": [{"name": "http", "port": dep.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def pool_service(plan: Plan, dep: DeploymentPlan, pool: PoolPlan) -> dict[str, Any]:
    """The headless Service of one (deployment, pool) StatefulSet: its EndpointSlices carry these
    labels (fleet, deployment, pool), by which the router's discovery finds the plan's facts."""
    set_name = names.replica_set_name(dep.name, pool.name)
    labels = {names.LABEL_NAME: dep.name, LABEL_DEPLOYMENT: dep.name, LABEL_POOL: pool.name}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _k8s.meta(plan, set_name, labels),
        "spec": {
            "clusterIP": "None",
            "selector": {**_dep_labels(plan, dep), "app.kubernetes.io/instance": set_name},
            "ports": [{"name": "http", "port": dep.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def model_pdb(plan: Plan, dep: DeploymentPlan) -> dict[str, Any]:
    """Voluntary disruptions (node drains, upgrades) take one replica at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _model_meta(plan, dep.name, dep),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _dep_labels(plan, dep)}},
    }
