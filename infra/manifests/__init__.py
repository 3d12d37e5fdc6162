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
cluster of the highest-priority pool, and so does the warm-capacity / failover controller.
With `warm_capacity: capacity_buffer` or `karpenter:` on a cloud, `autoscalers` adds the
CapacityBuffers (and their PodTemplates) and the Karpenter NodePools (no expander ConfigMap then).

Modules: `_k8s` (options, clusters, metadata, labels, probes, affinities), `pools` (namespace,
priority classes, placeholders, device plugin, expander), `models` (StatefulSets, Services,
PDBs), `router`, `controller`; this package assembles them per cluster and dumps the YAML.
The naming rules come from `gpufleet.infra.names`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from gpufleet.infra.manifests import autoscalers, controller, models, pools, router
from gpufleet.infra.manifests._k8s import (
    DEFAULT_OPTIONS,
    GPU_TAINT,
    Cluster,
    ManifestOptions,
    clusters,
    pool_labels,
    pool_taints,
    router_cluster,
)
from gpufleet.infra.manifests.autoscalers import *  # noqa: F403 - the public API of each module, in its __all__
from gpufleet.infra.manifests.controller import *  # noqa: F403
from gpufleet.infra.manifests.models import *  # noqa: F403
from gpufleet.infra.manifests.pools import *  # noqa: F403
from gpufleet.infra.manifests.router import *  # noqa: F403
from gpufleet.infra.plan import Plan

__all__ = [
    "GPU_TAINT",
    "Cluster",
    "ManifestOptions",
    "all_objects",
    "cluster_objects",
    "clusters",
    "dump_yaml",
    "pool_labels",
    "pool_taints",
    "router_cluster",
]
__all__ += autoscalers.__all__
__all__ += controller.__all__
__all__ += models.__all__
__all__ += pools.__all__
__all__ += router.__all__


def cluster_objects(plan: Plan, cluster: Cluster, options: ManifestOptions = DEFAULT_OPTIONS) -> list[dict[str, Any]]:
    """Every object of one cluster, in apply order (namespace and priority classes first)."""
    objs = [pools.namespace(plan), pools.placeholder_priority_class(plan), pools.serving_priority_class(plan)]
    if cluster.cloud != "gcp" and autoscalers.karpenter_settings(plan, cluster.cloud) is None:
        objs.append(pools.expander_configmap(plan, cluster, options))
    if cluster.cloud == "aws" and options.install_device_plugin:
        objs.append(pools.nvidia_device_plugin(plan, cluster, options))
    objs += [pools.placeholder_deployment(plan, p, options) for p in pools.placeholder_pools(plan, cluster.pools)]
    objs += autoscalers.autoscaler_objects(plan, cluster, options)
    for dep in plan.deployments:
        in_cluster = [plan.pool(n) for n in dep.failover if n in cluster.pool_names]
        if not in_cluster:
            continue
        objs += [models.headless_service(plan, dep), models.model_pdb(plan, dep)]
        objs += [models.model_statefulset(plan, dep, p, options) for p in in_cluster]
        objs += [models.pool_service(plan, dep, p) for p in in_cluster]
    home = router_cluster(plan)
    if home is not None and home.cloud == cluster.cloud:
        objs += router.router_objects(plan, options)
    objs += controller.controller_objects(plan, cluster, options)
    return objs


def all_objects(plan: Plan, options: ManifestOptions = DEFAULT_OPTIONS) -> dict[str, list[dict[str, Any]]]:
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
