"""`ModelDeployment`: one deployment's replicas in one cluster (vLLM or SGLang), with their
headless Service and PodDisruptionBudget."""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi

from gpufleet.infra import manifests
from gpufleet.infra.plan import DeploymentPlan, Plan
from gpufleet.infra.pulumi._kube import apply_object

__all__ = ["ModelDeployment", "ModelDeploymentArgs"]


@dataclass
class ModelDeploymentArgs:
    plan: Plan
    deployment: DeploymentPlan
    cluster: manifests.Cluster
    options: manifests.ManifestOptions = field(default_factory=manifests.ManifestOptions)


class ModelDeployment(pulumi.ComponentResource):
    """A StatefulSet per pool of the failover order in this cluster, sized by the plan's placement.

    Pods are named after the plan's replica ids and reachable at
    `<replica-id>.<deployment>.<namespace>.svc.cluster.local` through the headless Service.
    """

    service_name: pulumi.Output[str]
    replicas: pulumi.Output[dict[str, int]]

    def __init__(self, name: str, args: ModelDeploymentArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpufleet:model:ModelDeployment", name, None, opts)
        plan, dep = args.plan, args.deployment
        child = pulumi.ResourceOptions(parent=self)
        svc = manifests.headless_service(plan, dep)
        apply_object(f"{name}-service", svc, child)
        apply_object(f"{name}-pdb", manifests.model_pdb(plan, dep), child)
        counts: dict[str, int] = {}
        for pool_name in dep.failover:
            if pool_name not in args.cluster.pool_names:
                continue
            obj = manifests.model_statefulset(plan, dep, plan.pool(pool_name), args.options)
            apply_object(
                f"{name}-{pool_name}",
                obj,
                pulumi.ResourceOptions(
                    parent=self,
                    # Pulling an engine image and loading weights takes many minutes.
                    custom_timeouts=pulumi.CustomTimeouts(create="45m", update="45m"),
                ),
            )
            counts[pool_name] = obj["spec"]["replicas"]
            # Its own Service: the router discovers the pool's ready pods by its EndpointSlices.
            apply_object(f"{name}-{pool_name}-service", manifests.pool_service(plan, dep, plan.pool(pool_name)), child)
        self.service_name = pulumi.Output.from_input(svc["metadata"]["name"])
        self.replicas = pulumi.Output.from_input(counts)
        self.register_outputs({"service_name": self.service_name, "replicas": self.replicas})
