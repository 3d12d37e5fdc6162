"""Register a plain Kubernetes object dict (from `gpufleet.infra.manifests`) as a Pulumi resource,
and write the kubeconfig of an EKS or GKE cluster for the Kubernetes provider.

The object builders are written once in `infra.manifests`; this module only maps an
object's kind to its `pulumi_kubernetes` class. Top-level fields become the class's
keyword arguments; nested fields stay in Kubernetes' camelCase, which pulumi_kubernetes
passes through unchanged, so Pulumi applies exactly what `gpufleet render manifests` writes.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

__all__ = ["KINDS", "apply_object", "eks_kubeconfig", "gke_kubeconfig"]

CUSTOM_GROUPS = ("autoscaling.x-k8s.io", "karpenter.sh")

KINDS: dict[tuple[str, str], type[pulumi.CustomResource]] = {
    ("v1", "Namespace"): k8s.core.v1.Namespace,
    ("v1", "ConfigMap"): k8s.core.v1.ConfigMap,
    ("v1", "PodTemplate"): k8s.core.v1.PodTemplate,
    ("v1", "Secret"): k8s.core.v1.Secret,
    ("v1", "Service"): k8s.core.v1.Service,
    ("v1", "ServiceAccount"): k8s.core.v1.ServiceAccount,
    ("apps/v1", "Deployment"): k8s.apps.v1.Deployment,
    ("apps/v1", "StatefulSet"): k8s.apps.v1.StatefulSet,
    ("apps/v1", "DaemonSet"): k8s.apps.v1.DaemonSet,
    ("policy/v1", "PodDisruptionBudget"): k8s.policy.v1.PodDisruptionBudget,
    ("scheduling.k8s.io/v1", "PriorityClass"): k8s.scheduling.v1.PriorityClass,
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): k8s.rbac.v1.ClusterRole,
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): k8s.rbac.v1.ClusterRoleBinding,
    ("rbac.authorization.k8s.io/v1", "Role"): k8s.rbac.v1.Role,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): k8s.rbac.v1.RoleBinding,
}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def apply_object(resource_name: str, obj: dict[str, Any], opts: pulumi.ResourceOptions) -> pulumi.CustomResource:
    """Register `obj` (a Kubernetes object dict) under `resource_name` with `opts`."""
    cls = KINDS.get((obj["apiVersion"], obj["kind"]))
    if cls is None and obj["apiVersion"].split("/")[0] in CUSTOM_GROUPS:
        # Custom resources (CapacityBuffer, Karpenter NodePool): their CRDs come with the autoscaler.
        fields = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        return k8s.apiextensions.CustomResource(
            resource_name, api_version=obj["apiVersion"], kind=obj["kind"], opts=opts, **fields
        )
    if cls is None:
        raise ValueError(f"no Pulumi class for {obj['apiVersion']} {obj['kind']}")
    kwargs = {_snake(k): v for k, v in obj.items() if k not in ("apiVersion", "kind")}
    return cls(resource_name, opts=opts, **kwargs)


def _kubeconfig(
    cluster: str, server: pulumi.Input[str], ca: pulumi.Input[str], exec_: dict[str, Any]
) -> pulumi.Output[str]:
    """A one-cluster kubeconfig whose user authenticates through an exec credential plugin."""
    return pulumi.Output.all(server, ca).apply(
        lambda a: json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": cluster, "cluster": {"server": a[0], "certificate-authority-data": a[1]}}],
                "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": cluster}}],
                "current-context": cluster,
                "users": [
                    {"name": cluster, "user": {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", **exec_}}}
                ],
            }
        )
    )


def eks_kubeconfig(cluster: str, region: str, endpoint: pulumi.Input[str], ca: pulumi.Input[str]) -> pulumi.Output[str]:
    """Authenticates with `aws eks get-token` (the AWS CLI's credentials)."""
    return _kubeconfig(
        cluster,
        endpoint,
        ca,
        {"command": "aws", "args": ["eks", "get-token", "--cluster-name", cluster, "--region", region]},
    )


def gke_kubeconfig(cluster: str, endpoint: pulumi.Input[str], ca: pulumi.Input[str]) -> pulumi.Output[str]:
    """Authenticates with `gke-gcloud-auth-plugin` (gcloud's credentials); GKE gives a bare IP."""
    server = pulumi.Output.from_input(endpoint).apply(lambda e: f"https://{e}")
    exec_ = {
        "command": "gke-gcloud-auth-plugin",
        "provideClusterInfo": True,
        "installHint": "gcloud components install gke-gcloud-auth-plugin",
    }
    return _kubeconfig(cluster, server, ca, exec_)
