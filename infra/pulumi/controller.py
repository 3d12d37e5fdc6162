"""`FailoverController`: the warm-capacity / failover controller (`gpufleet controller run`) with
the plan it reads, its ServiceAccount and the least RBAC its Kubernetes adapter needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi

from gpufleet.infra import manifests, names
from gpufleet.infra.plan import Plan
from gpufleet.infra.pulumi._kube import apply_object

__all__ = ["FailoverController", "FailoverControllerArgs"]


@dataclass
class FailoverControllerArgs:
    plan: Plan
    cluster: manifests.Cluster
    options: manifests.ManifestOptions = field(default_factory=manifests.ManifestOptions)


class FailoverController(pulumi.ComponentResource):
    """The controller's objects in one cluster (see `manifests.controller_objects`).

    In the router's cluster: ConfigMap `<fleet>-controller` with the plan JSON, ServiceAccount
    (cloud-credential annotations when configured), read-only ClusterRole on nodes and pods,
    a Role on the placeholder Deployments' scale, and the Deployment. In another cluster of the
    fleet (only with a kubeconfig Secret): the ServiceAccount and its RBAC.
    """

    service_account: pulumi.Output[str]
    node_scaling: pulumi.Output[bool]

    def __init__(self, name: str, args: FailoverControllerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpufleet:controller:FailoverController", name, None, opts)
        resources: list[pulumi.Resource] = []
        for obj in manifests.controller_objects(args.plan, args.cluster, args.options):
            kind = obj["kind"]
            # The pod starts once its plan, identity and rights exist.
            deps = list(resources) if kind == "Deployment" else []
            resources.append(
                apply_object(f"{name}-{kind.lower()}", obj, pulumi.ResourceOptions(parent=self, depends_on=deps))
            )
        self.service_account = pulumi.Output.from_input(names.controller_name(args.plan.fleet))
        self.node_scaling = pulumi.Output.from_input(manifests.controller_node_scaling(args.plan, args.options))
        self.register_outputs({"service_account": self.service_account, "node_scaling": self.node_scaling})
