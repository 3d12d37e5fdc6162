"""`GpuNodepool`: one pool's GPU nodes: an EKS managed node group, a GKE node pool, or (on an
existing cluster) nothing to create, the pool being the nodes that carry its label."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pulumi

from gpufleet.infra import manifests, names
from gpufleet.infra.plan import Plan, PoolPlan

__all__ = ["AWS_GPU_AMI_TYPE", "GKE_ACCELERATORS", "GKE_ACCELERATOR_BY_FAMILY", "GpuNodepool", "GpuNodepoolArgs"]

AWS_GPU_AMI_TYPE = "AL2023_x86_64_NVIDIA"
# GKE accelerator type names of the catalog's GPU models.
GKE_ACCELERATORS = {
    "L4": "nvidia-l4",
    "A100-40GB": "nvidia-tesla-a100",
    "A100-80GB": "nvidia-a100-80gb",
    "H100": "nvidia-h100-80gb",
    "H200": "nvidia-h200-141gb",
    "B200": "nvidia-b200",
}
# Machine families whose GPU needs a different accelerator name than the GPU model's.
GKE_ACCELERATOR_BY_FAMILY = {"a3-megagpu": "nvidia-h100-mega-80gb"}
_TAINT_EFFECTS = {"NoSchedule": "NO_SCHEDULE", "PreferNoSchedule": "PREFER_NO_SCHEDULE", "NoExecute": "NO_EXECUTE"}


@dataclass
class GpuNodepoolArgs:
    """What a pool's nodes need besides the plan: where its cluster is and how nodes join it."""

    plan: Plan
    pool: PoolPlan
    cluster_name: pulumi.Input[str] | None = None
    node_role_arn: pulumi.Input[str] | None = None  # aws
    subnet_ids: pulumi.Input[list[str]] | None = None  # aws
    project: str | None = None  # gcp
    service_account: str | None = None  # gcp
    disk_size_gb: int = 200


def _taints(pool: PoolPlan) -> list[dict[str, str]]:
    return [
        {"key": t["key"], "value": t["value"], "effect": _TAINT_EFFECTS[t["effect"]]}
        for t in manifests.pool_taints(pool)
    ]


class GpuNodepool(pulumi.ComponentResource):
    """A pool's GPU nodes, sized from the plan: desired = baseline + warm, within min..max."""

    node_group_name: pulumi.Output[str]
    cloud: pulumi.Output[str]

    def __init__(self, name: str, args: GpuNodepoolArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpufleet:nodepool:GpuNodepool", name, None, opts)
        pool, plan = args.pool, args.plan
        group = names.node_group_name(plan.fleet, pool.name)
        child = pulumi.ResourceOptions(parent=self)
        self.resource: pulumi.CustomResource | None = None
        if pool.cloud == "aws":
            self.resource = self._aws(name, args, group, child)
        elif pool.cloud == "gcp":
            self.resource = self._gcp(name, args, group, child)
        elif pool.cloud != "kubernetes":
            raise ValueError(f"pool {pool.name}: a {pool.cloud} pool has no cluster nodes")
        self.node_group_name = pulumi.Output.from_input(group)
        self.cloud = pulumi.Output.from_input(pool.cloud)
        self.register_outputs({"node_group_name": self.node_group_name, "cloud": self.cloud})

    @staticmethod
    def _aws(name: str, args: GpuNodepoolArgs, group: str, opts: pulumi.ResourceOptions) -> pulumi.CustomResource:
        import pulumi_aws as aws

        pool = args.pool
        if args.cluster_name is None or args.node_role_arn is None or args.subnet_ids is None:
            raise ValueError(f"pool {pool.name}: an EKS node group needs cluster_name, node_role_arn and subnet_ids")
        return aws.eks.NodeGroup(
            f"{name}-nodegroup",
            cluster_name=args.cluster_name,
            node_group_name=group,
            node_role_arn=args.node_role_arn,
            subnet_ids=args.subnet_ids,
            instance_types=[pool.instance_type],
            ami_type=AWS_GPU_AMI_TYPE,
            capacity_type="SPOT" if pool.capacity_type == "spot" else "ON_DEMAND",
            disk_size=args.disk_size_gb,
            scaling_config=aws.eks.NodeGroupScalingConfigArgs(
                min_size=pool.min_nodes,
                desired_size=pool.baseline_nodes + pool.warm_nodes,
                max_size=pool.max_nodes,
            ),
            labels=manifests.pool_labels(pool),
            taints=[aws.eks.NodeGroupTaintArgs(**t) for t in _taints(pool)],
            tags={names.LABEL_FLEET: args.plan.fleet, names.LABEL_POOL: pool.name},
            # The cluster-autoscaler owns the current size once the group exists.
            opts=pulumi.ResourceOptions.merge(
                opts, pulumi.ResourceOptions(ignore_changes=["scalingConfig.desiredSize"])
            ),
        )

    @staticmethod
    def _gcp(name: str, args: GpuNodepoolArgs, group: str, opts: pulumi.ResourceOptions) -> pulumi.CustomResource:
        import pulumi_gcp as gcp

        pool = args.pool
        family = "-".join(pool.instance_type.split("-")[:2])
        accelerator = GKE_ACCELERATOR_BY_FAMILY.get(family) or GKE_ACCELERATORS.get(pool.gpu)
        if accelerator is None:
            raise ValueError(
                f"pool {pool.name}: no GKE accelerator type known for GPU {pool.gpu}; known: {', '.join(GKE_ACCELERATORS)}"
            )
        if args.cluster_name is None:
            raise ValueError(f"pool {pool.name}: a GKE node pool needs cluster_name")
        desired = pool.baseline_nodes + pool.warm_nodes
        # GKE counts initial nodes per zone; the totals bound the whole pool.
        per_zone = math.ceil(desired / max(1, len(pool.zones)))
        node_config: dict[str, Any] = {
            "machine_type": pool.instance_type,
            "spot": pool.capacity_type == "spot",
            "disk_size_gb": args.disk_size_gb,
            "labels": manifests.pool_labels(pool),
            "taints": [gcp.container.NodePoolNodeConfigTaintArgs(**t) for t in _taints(pool)],
            "guest_accelerators": [
                gcp.container.NodePoolNodeConfigGuestAcceleratorArgs(
                    type=accelerator,
                    count=pool.gpus_per_node,
                    gpu_driver_installation_config=gcp.container.NodePoolNodeConfigGuestAcceleratorGpuDriverInstallationConfigArgs(
                        gpu_driver_version="LATEST"
                    ),
                )
            ],
            "oauth_scopes": ["https://www.googleapis.com/auth/cloud-platform"],
        }
        if args.service_account:
            node_config["service_account"] = args.service_account
        return gcp.container.NodePool(
            f"{name}-nodepool",
            name=group,
            cluster=args.cluster_name,
            location=pool.region,
            project=args.project,
            node_locations=list(pool.zones) or None,
            initial_node_count=per_zone,
            autoscaling=gcp.container.NodePoolAutoscalingArgs(
                total_min_node_count=pool.min_nodes,
                total_max_node_count=pool.max_nodes,
                location_policy="ANY",
            ),
            management=gcp.container.NodePoolManagementArgs(auto_repair=True, auto_upgrade=True),
            node_config=gcp.container.NodePoolNodeConfigArgs(**node_config),
            opts=pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(ignore_changes=["initialNodeCount"])),
        )
