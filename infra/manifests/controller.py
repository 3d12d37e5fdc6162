"""The warm-capacity / failover controller (`gpufleet controller run`) in the router's cluster:
the plan it reads (a ConfigMap), its identity (a ServiceAccount, with the cloud-credential
annotations when configured), the least RBAC its Kubernetes adapter needs, and its Deployment.
In the fleet's other clusters, with a kubeconfig Secret, only its ServiceAccount and RBAC."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from gpufleet.infra import names
from gpufleet.infra.manifests import _k8s
from gpufleet.infra.manifests import pools as _pools
from gpufleet.infra.manifests.router import CONFIG_DIR
from gpufleet.infra.names import LABEL_FLEET
from gpufleet.infra.plan import Plan

__all__ = [
    "METRICS_PORT",
    "PLAN_KEY",
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
]

PLAN_KEY = "plan.json"
METRICS_PORT = 9102
KUBECONFIG_DIR = "/etc/gpufleet/kube"
KUBECONFIG_KEY = "config"
# Cloud credentials of the controller's pod, bound to its ServiceAccount.
AWS_ROLE_ANNOTATION = "eks.amazonaws.com/role-arn"  # EKS IAM Roles for Service Accounts
GCP_SA_ANNOTATION = "iam.gke.io/gcp-service-account"  # GKE Workload Identity


def _name(plan: Plan) -> str:
    return names.controller_name(plan.fleet)


def _labels(plan: Plan) -> dict[str, str]:
    return _k8s.component_labels(_name(plan), "controller")


def _plan_text(plan: Plan) -> str:
    data = plan.to_json_dict()
    # A CapacityBuffer holds a buffered pool's declared warm nodes: the controller's placeholder
    # floor there is 0, so its extra warmth comes on top of the buffer instead of doubling it.
    for pool_json, pool in zip(data["pools"], plan.pools):
        if _pools.buffered(plan, pool):
            pool_json["warm_nodes"] = 0
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def controller_configmap(plan: Plan) -> dict[str, Any]:
    """The compiled plan (`gpufleet plan -o json`) the controller reads with `--config`."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _k8s.meta(plan, _name(plan), _labels(plan)),
        "data": {PLAN_KEY: _plan_text(plan)},
    }


def _controller_credentials(plan: Plan, options: _k8s.ManifestOptions) -> dict[str, str]:
    """ServiceAccount annotations giving the controller's pod cloud credentials.

    IRSA works only for a pod on EKS and Workload Identity only on GKE: the controller runs in
    the router's cluster, so only that cloud's setting applies (`check_controller_options`).
    """
    home = _k8s.router_cluster(plan)
    out: dict[str, str] = {}
    if home is not None and home.cloud == "aws" and options.controller_aws_role_arn:
        out[AWS_ROLE_ANNOTATION] = options.controller_aws_role_arn
    if home is not None and home.cloud == "gcp" and options.controller_gcp_service_account:
        out[GCP_SA_ANNOTATION] = options.controller_gcp_service_account
    return out


def check_controller_options(plan: Plan, options: _k8s.ManifestOptions) -> list[str]:
    """Controller settings that cannot work for this plan, one message each (empty: fine)."""
    if not options.controller:
        return []
    home = _k8s.router_cluster(plan)
    where = home.cloud if home is not None else "no"
    problems = []
    if options.controller_aws_role_arn and where != "aws":
        problems.append(f"controllerAwsRoleArn: the controller runs in the {where} cluster; IRSA works only on EKS")
    if options.controller_gcp_service_account and where != "gcp":
        problems.append(
            f"controllerGcpServiceAccount: the controller runs in the {where} cluster; Workload Identity works only on GKE"
        )
    pool_names = {p.name for p in plan.pools}
    unknown = sorted(set(options.controller_provider_names) - pool_names)
    if unknown:
        problems.append(
            f"controllerProviderNames: no pool named {', '.join(unknown)}; pools: {', '.join(sorted(pool_names))}"
        )
    clouds = {c.cloud for c in _k8s.clusters(plan)}
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


def _scaled_provider_names(plan: Plan, options: _k8s.ManifestOptions) -> dict[str, str]:
    """`--provider-name` entries for the pools whose cloud the controller has credentials for."""
    creds = _controller_credentials(plan, options)
    ok = {"aws"} if AWS_ROLE_ANNOTATION in creds else {"gcp"} if GCP_SA_ANNOTATION in creds else set()
    clouds = {p.name: p.cloud for p in plan.pools}
    return {k: v for k, v in sorted(options.controller_provider_names.items()) if clouds.get(k) in ok}


def controller_node_scaling(plan: Plan, options: _k8s.ManifestOptions) -> bool:
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


def controller_args(plan: Plan, options: _k8s.ManifestOptions = _k8s.DEFAULT_OPTIONS) -> list[str]:
    """Arguments of `gpufleet` in the controller's container (flags of `gpufleet controller run`)."""
    args = [
        "controller", "run",
        "--config", f"{CONFIG_DIR}/{PLAN_KEY}",
        "--metrics-port", str(METRICS_PORT),
        "--metrics-host", "0.0.0.0",
    ]  # fmt: skip
    home = _k8s.router_cluster(plan)
    # Each router pod counts only its own requests and a scrape through the Service reaches one
    # pod: the controller finds every router pod in the Service's EndpointSlices and adds them up.
    if home is not None:
        args += ["--router-service", names.router_name(plan.fleet)]
    if controller_node_scaling(plan, options):
        for pool, name in _scaled_provider_names(plan, options).items():
            args += ["--provider-name", f"{pool}={name}"]
    else:
        args.append("--no-node-scaling")
    if options.controller_kubeconfig_secret:
        args += ["--kubeconfig", f"{KUBECONFIG_DIR}/{KUBECONFIG_KEY}"]
        for cloud, context in sorted(options.controller_kube_contexts.items()):
            args += ["--kube-context", f"{cloud}={context}"]
    return args


def controller_service_account(
    plan: Plan, options: _k8s.ManifestOptions = _k8s.DEFAULT_OPTIONS, *, home: bool = True
) -> dict[str, Any]:
    """The controller's identity; in its own cluster it carries the cloud-credential annotations.

    The API token is mounted by the pod spec only (the account itself does not automount).
    """
    metadata = _k8s.meta(plan, _name(plan), _labels(plan))
    creds = _controller_credentials(plan, options) if home else {}
    if creds:
        metadata["annotations"] = creds
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata, "automountServiceAccountToken": False}


def controller_cluster_role(plan: Plan) -> dict[str, Any]:
    """Cluster-wide, read-only: exactly the two lists `KubernetesAdapter.utilisations` makes
    (`list_node` by pool label, `list_pod_for_all_namespaces`) and nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": _k8s.meta(plan, _name(plan), _labels(plan), namespaced=False),
        "rules": [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        ],
    }


def controller_cluster_role_binding(plan: Plan) -> dict[str, Any]:
    name = _name(plan)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": _k8s.meta(plan, name, _labels(plan), namespaced=False),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": plan.namespace}],
    }


def controller_role(plan: Plan) -> dict[str, Any]:
    """In the fleet namespace: the scale of the placeholder Deployments, and of the replica
    StatefulSets (read the set, patch its scale), each by name; and the list of EndpointSlices
    that finds the router pods (`--router-service`).

    `KubernetesAdapter` reads `deployments/scale` (`read_namespaced_deployment_scale`) and
    patches it (`patch_namespaced_deployment_scale`); it never reads or changes the
    Deployments themselves. The names cover every pool of the plan, placeholder or not: the
    controller asks about each pool it observes, and a missing one must answer 404 (no
    placeholder, noted) rather than 403 (which fails the whole cluster's observation).
    """
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _k8s.meta(plan, _name(plan), _labels(plan)),
        "rules": [
            {
                "apiGroups": ["apps"],
                "resources": ["deployments/scale"],
                "resourceNames": [names.placeholder_name(p.name) for p in plan.pools],
                "verbs": ["get", "patch"],
            },
            # The replica autoscaler (`infra.controller.scaler`): it reads each (deployment,
            # pool) StatefulSet (`read_namespaced_stateful_set`) and patches only its scale
            # (`patch_namespaced_stateful_set_scale`), named one by one like the placeholders.
            {
                "apiGroups": ["apps"],
                "resources": ["statefulsets"],
                "resourceNames": _replica_sets(plan),
                "verbs": ["get"],
            },
            {
                "apiGroups": ["apps"],
                "resources": ["statefulsets/scale"],
                "resourceNames": _replica_sets(plan),
                "verbs": ["patch"],
            },
            # The router pods to read load from: the router Service's EndpointSlices, listed once
            # a round by the `kubernetes.io/service-name` label (a list cannot be limited by name).
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]},
        ],
    }


def _replica_sets(plan: Plan) -> list[str]:
    """Every (deployment, pool) StatefulSet of the plan's failover chains."""
    return [names.replica_set_name(d.name, pool) for d in plan.deployments for pool in d.failover]


def controller_role_binding(plan: Plan) -> dict[str, Any]:
    name = _name(plan)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _k8s.meta(plan, name, _labels(plan)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": plan.namespace}],
    }


def controller_deployment(plan: Plan, options: _k8s.ManifestOptions = _k8s.DEFAULT_OPTIONS) -> dict[str, Any]:
    """One `gpufleet controller run` pod reading the plan ConfigMap, metrics on :9102."""
    name = _name(plan)
    labels = _labels(plan)
    digest = hashlib.sha256(_plan_text(plan).encode()).hexdigest()[:16]
    mounts: list[dict[str, Any]] = [{"name": "plan", "mountPath": CONFIG_DIR, "readOnly": True}]
    volumes: list[dict[str, Any]] = [{"name": "plan", "configMap": {"name": name}}]
    tmp_mount, tmp_volume = _k8s.writable_tmp()
    mounts.append(tmp_mount)
    volumes.append(tmp_volume)
    if options.controller_kubeconfig_secret:
        mounts.append({"name": "kubeconfig", "mountPath": KUBECONFIG_DIR, "readOnly": True})
        volumes.append({"name": "kubeconfig", "secret": {"secretName": options.controller_kubeconfig_secret}})

    def probe(period_s: int, failures: int) -> dict[str, Any]:
        # The metrics server is the controller's only HTTP surface; it starts before the first round.
        return _k8s.http_probe("/metrics", "metrics", period_s=period_s, timeout_s=3, failures=failures)

    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _k8s.meta(plan, name, labels),
        "spec": {
            # One controller: two would act on the same placeholders with separate memories.
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {LABEL_FLEET: plan.fleet, **labels}},
            "template": {
                "metadata": {
                    "labels": {LABEL_FLEET: plan.fleet, **labels},
                    # A changed plan rolls the controller.
                    "annotations": {**_k8s.scrape_annotations(METRICS_PORT), "gpufleet.io/config-sha256": digest},
                },
                "spec": {
                    "serviceAccountName": name,
                    # The controller talks to the Kubernetes API: it needs its token.
                    "automountServiceAccountToken": True,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    **_k8s.off_gpu_nodes(plan),
                    "containers": [
                        {
                            "name": "controller",
                            "image": options.controller_image,
                            "command": ["gpufleet"],
                            "args": controller_args(plan, options),
                            "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "256Mi"},
                                "limits": {"memory": "512Mi"},
                            },
                            "startupProbe": probe(2, 60),
                            "readinessProbe": probe(10, 3),
                            "livenessProbe": probe(20, 3),
                            "securityContext": _k8s.restricted_security(),
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


def controller_objects(
    plan: Plan, cluster: _k8s.Cluster, options: _k8s.ManifestOptions = _k8s.DEFAULT_OPTIONS
) -> list[dict[str, Any]]:
    """The controller's objects in `cluster`.

    In the router's cluster: the plan ConfigMap, ServiceAccount, ClusterRole + binding, Role +
    binding and the Deployment. In the fleet's other _k8s.clusters, only when a kubeconfig Secret is
    configured (the controller then reaches them with that ServiceAccount's token): the
    ServiceAccount and its RBAC. Nothing when the controller is turned off.
    """
    home = _k8s.router_cluster(plan)
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
