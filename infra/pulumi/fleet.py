"""`Fleet`: the top component. Declaration -> plan -> providers, node pools, warm capacity,
failover priorities, model deployments, the router and the warm-capacity / failover
controller, across every cluster of the fleet.

The declaration is compiled before anything is registered: an invalid declaration raises
`InvalidFleet` (a `pulumi.RunError`, shown by Pulumi as one message without a traceback)
and no resource exists yet.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi

from gpufleet.infra import catalog as catalog_mod
from gpufleet.infra import manifests, names, spec
from gpufleet.infra import plan as plan_mod
from gpufleet.infra.plan import Plan
from gpufleet.infra.pulumi._kube import apply_object, eks_kubeconfig, gke_kubeconfig
from gpufleet.infra.pulumi.controller import FailoverController, FailoverControllerArgs
from gpufleet.infra.pulumi.failover import FailoverPriorities, FailoverPrioritiesArgs
from gpufleet.infra.pulumi.model import ModelDeployment, ModelDeploymentArgs
from gpufleet.infra.pulumi.nodepool import GpuNodepool, GpuNodepoolArgs
from gpufleet.infra.pulumi.router import CacheAwareRouter, CacheAwareRouterArgs
from gpufleet.infra.pulumi.warm import WarmCapacity, WarmCapacityArgs

__all__ = ["Fleet", "FleetArgs", "InvalidFleet"]

_EKS_NODE_POLICIES = (
    "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy",
    "arn:aws:iam::aws:policy/AmazonEKS_CNI_Policy",
    "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly",
)


class InvalidFleet(pulumi.RunError):
    """The declaration does not compile; `issues` lists every problem (file, line, field)."""

    def __init__(self, error: spec.FleetError | catalog_mod.CatalogError | ValueError) -> None:
        self.issues = list(getattr(error, "issues", []))
        super().__init__(str(error))


@dataclass
class FleetArgs:
    """The declaration (inline, as a file, or already compiled) and the secrets and choices
    that are not part of it."""

    admin_token: pulumi.Input[str]
    fleet: Mapping[str, Any] | None = None
    fleet_file: str | None = None
    plan: Plan | None = None
    hf_token: pulumi.Input[str] | None = None
    options: manifests.ManifestOptions = field(default_factory=manifests.ManifestOptions)
    kubeconfigs: Mapping[str, pulumi.Input[str]] = field(default_factory=dict)
    base_dir: Path | None = None


def _compile(args: FleetArgs) -> Plan:
    """The declaration of `args` (inline, or a file relative to `base_dir`) compiled; raises
    `InvalidFleet` with every problem of the declaration."""
    try:
        if (args.fleet is None) == (args.fleet_file is None):
            raise ValueError(
                "give the fleet either inline (gpufleet:fleet) or as a file (gpufleet:fleetFile), not both or neither"
            )
        if args.fleet_file is not None:
            path = Path(args.fleet_file)
            if args.base_dir is not None and not path.is_absolute():
                path = args.base_dir / path
            return plan_mod.compile_file(path)
        return plan_mod.compile_data(dict(args.fleet or {}), "gpufleet:fleet", args.base_dir)
    except (spec.FleetError, catalog_mod.CatalogError, ValueError) as exc:
        raise InvalidFleet(exc) from None


class _ClusterHandle:
    """A cluster's Kubernetes provider and what node pools need to join it."""

    def __init__(self, cluster: manifests.Cluster) -> None:
        self.cluster = cluster
        self.provider: pulumi.ProviderResource | None = None
        self.name: pulumi.Input[str] = cluster.name
        self.subnet_ids: pulumi.Input[list[str]] | None = None
        self.node_role_arn: pulumi.Input[str] | None = None
        self.depends_on: list[pulumi.Resource] = []


class Fleet(pulumi.ComponentResource):
    """Everything the fleet needs, from one declaration."""

    router_endpoint: pulumi.Output[str]
    pools: pulumi.Output[list[dict[str, Any]]]
    cost: pulumi.Output[dict[str, Any]]
    clusters: pulumi.Output[list[str]]

    def __init__(self, name: str, args: FleetArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        # Compile first: an invalid declaration registers nothing, not even this component.
        plan = args.plan or _compile(args)
        problems = manifests.check_controller_options(plan, args.options)
        if problems:
            raise pulumi.RunError("; ".join(problems))
        super().__init__("gpufleet:fleet:Fleet", name, None, opts)
        self.plan = plan
        options = args.options
        if args.hf_token is not None and options.hf_token_secret is None:
            options = manifests.ManifestOptions(**{**options.__dict__, "hf_token_secret": f"{plan.fleet}-hf-token"})
        self._aws: pulumi.ProviderResource | None = None
        self._gcp: pulumi.ProviderResource | None = None
        handles = [self._cluster(name, c, args) for c in manifests.clusters(plan)]

        pool_rows = []
        router: CacheAwareRouter | None = None
        home = manifests.router_cluster(plan)
        for h in handles:
            c = h.cluster
            key = f"{name}-{c.cloud}"
            k8s_opts = pulumi.ResourceOptions(parent=self, providers={"kubernetes": h.provider} if h.provider else None)
            node_pools = []
            for pool in c.pools:
                np = GpuNodepool(
                    f"{name}-{pool.name}",
                    GpuNodepoolArgs(
                        plan=plan,
                        pool=pool,
                        cluster_name=h.name,
                        node_role_arn=h.node_role_arn,
                        subnet_ids=self._pool_subnets(name, pool, h),
                        project=plan.clouds.gcp.project if c.cloud == "gcp" and plan.clouds.gcp else None,
                        service_account=plan.clouds.gcp.service_account
                        if c.cloud == "gcp" and plan.clouds.gcp
                        else None,
                    ),
                    pulumi.ResourceOptions(parent=self, providers=self._cloud_providers(), depends_on=h.depends_on),
                )
                node_pools.append(np)
                pool_rows.append(
                    {
                        "name": pool.name,
                        "cloud": pool.cloud,
                        "cluster": c.name,
                        "node_group": names.node_group_name(plan.fleet, pool.name)
                        if pool.cloud != "kubernetes"
                        else None,
                        "instance_type": pool.instance_type,
                        "priority": pool.priority,
                        "baseline_nodes": pool.baseline_nodes,
                        "warm_nodes": pool.warm_nodes,
                        "max_nodes": pool.max_nodes,
                    }
                )
            ns = apply_object(f"{key}-namespace", manifests.namespace(plan), k8s_opts)
            if c.cloud == "aws" and options.install_device_plugin:
                apply_object(f"{key}-device-plugin", manifests.nvidia_device_plugin(plan, c, options), k8s_opts)
            after_ns = pulumi.ResourceOptions.merge(k8s_opts, pulumi.ResourceOptions(depends_on=[ns, *node_pools]))
            if options.hf_token_secret and args.hf_token is not None:
                apply_object(
                    f"{key}-hf-token",
                    {
                        "apiVersion": "v1",
                        "kind": "Secret",
                        "metadata": {"name": options.hf_token_secret, "namespace": plan.namespace},
                        "type": "Opaque",
                        "stringData": {"token": pulumi.Output.secret(args.hf_token)},
                    },
                    pulumi.ResourceOptions.merge(k8s_opts, pulumi.ResourceOptions(depends_on=[ns])),
                )
            warm = WarmCapacity(f"{key}-warm", WarmCapacityArgs(plan, list(c.pools), options), after_ns)
            if c.cloud != "gcp":
                FailoverPriorities(f"{key}-failover", FailoverPrioritiesArgs(plan, c, options), k8s_opts)
            for dep in plan.deployments:
                if any(p in c.pool_names for p in dep.failover):
                    ModelDeployment(
                        f"{key}-{dep.name}",
                        ModelDeploymentArgs(plan, dep, c, options),
                        pulumi.ResourceOptions.merge(after_ns, pulumi.ResourceOptions(depends_on=[warm])),
                    )
            if home is not None and c.cloud == home.cloud:
                router = CacheAwareRouter(
                    f"{key}-router", CacheAwareRouterArgs(plan, args.admin_token, options), after_ns
                )
            if manifests.controller_objects(plan, c, options):
                FailoverController(f"{key}-controller", FailoverControllerArgs(plan, c, options), after_ns)

        self.router_endpoint = router.endpoint if router is not None else pulumi.Output.from_input("")
        self.pools = pulumi.Output.from_input(pool_rows)
        self.cost = pulumi.Output.from_input(plan.cost.model_dump(mode="json"))
        self.clusters = pulumi.Output.from_input([f"{h.cluster.cloud}/{h.cluster.name}" for h in handles])
        self.register_outputs(
            {"router_endpoint": self.router_endpoint, "pools": self.pools, "cost": self.cost, "clusters": self.clusters}
        )

    # -- providers and clusters ------------------------------------------------------------

    def _cloud_providers(self) -> dict[str, pulumi.ProviderResource]:
        out = {}
        if self._aws is not None:
            out["aws"] = self._aws
        if self._gcp is not None:
            out["gcp"] = self._gcp
        return out

    def _cluster(self, name: str, cluster: manifests.Cluster, args: FleetArgs) -> _ClusterHandle:
        import pulumi_kubernetes as k8s

        h = _ClusterHandle(cluster)
        plan = self.plan
        given = args.kubeconfigs.get(cluster.cloud)
        kubeconfig: pulumi.Input[str] | None = given
        context: str | None = None
        if cluster.cloud == "aws":
            kubeconfig = self._aws_cluster(name, h) if given is None else given
        elif cluster.cloud == "gcp":
            kubeconfig = self._gcp_cluster(name, h) if given is None else given
        else:
            cfg = plan.clouds.kubernetes
            context = cfg.context if cfg else None
            if given is None and cfg is not None and cfg.kubeconfig:
                kubeconfig = cfg.kubeconfig  # the provider takes a path or the contents
        h.provider = k8s.Provider(
            f"{name}-{cluster.cloud}-k8s",
            kubeconfig=kubeconfig,
            context=context,
            opts=pulumi.ResourceOptions(parent=self, depends_on=h.depends_on),
        )
        return h

    def _aws_cluster(self, name: str, h: _ClusterHandle) -> pulumi.Output[str]:
        import pulumi_aws as aws

        cfg = self.plan.clouds.aws
        assert cfg is not None
        self._aws = aws.Provider(f"{name}-aws", region=cfg.region, opts=pulumi.ResourceOptions(parent=self))
        child = pulumi.ResourceOptions(parent=self, provider=self._aws)
        invoke = pulumi.InvokeOutputOptions(parent=self, provider=self._aws)
        if cfg.create_cluster:
            if not cfg.subnet_ids:
                raise InvalidFleet(
                    ValueError("clouds.aws.subnet_ids: create_cluster needs the subnets of the new cluster")
                )
            role = aws.iam.Role(
                f"{name}-eks-cluster-role",
                assume_role_policy=json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Principal": {"Service": "eks.amazonaws.com"},
                                "Action": "sts:AssumeRole",
                            }
                        ],
                    }
                ),
                opts=child,
            )
            attach = aws.iam.RolePolicyAttachment(
                f"{name}-eks-cluster-policy",
                role=role.name,
                policy_arn="arn:aws:iam::aws:policy/AmazonEKSClusterPolicy",
                opts=child,
            )
            eks = aws.eks.Cluster(
                f"{name}-eks",
                name=cfg.cluster,
                role_arn=role.arn,
                version=cfg.kubernetes_version,
                vpc_config=aws.eks.ClusterVpcConfigArgs(subnet_ids=list(cfg.subnet_ids)),
                opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[attach])),
            )
            h.name = eks.name
            h.depends_on = [eks]
            h.subnet_ids = list(cfg.subnet_ids)
            endpoint = eks.endpoint
            ca = eks.certificate_authority.apply(lambda c: c["data"] if isinstance(c, dict) else c.data)
        else:
            found = aws.eks.get_cluster_output(name=cfg.cluster, opts=invoke)
            h.subnet_ids = (
                list(cfg.subnet_ids) if cfg.subnet_ids else found.vpc_config.apply(lambda v: list(v.subnet_ids))
            )
            endpoint = found.endpoint
            ca = found.certificate_authorities.apply(lambda cs: cs[0].data)
        if cfg.node_role_arn:
            h.node_role_arn = cfg.node_role_arn
        else:
            role = aws.iam.Role(
                f"{name}-eks-node-role",
                assume_role_policy=json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Principal": {"Service": "ec2.amazonaws.com"},
                                "Action": "sts:AssumeRole",
                            }
                        ],
                    }
                ),
                opts=child,
            )
            attachments = [
                aws.iam.RolePolicyAttachment(f"{name}-eks-node-policy-{i}", role=role.name, policy_arn=arn, opts=child)
                for i, arn in enumerate(_EKS_NODE_POLICIES)
            ]
            h.node_role_arn = role.arn
            h.depends_on = [*h.depends_on, *attachments]
        return eks_kubeconfig(cfg.cluster, cfg.region, endpoint, ca)

    def _pool_subnets(self, name: str, pool: plan_mod.PoolPlan, h: _ClusterHandle) -> pulumi.Input[list[str]] | None:
        """The cluster's subnets, narrowed to the pool's zones when it declares them."""
        if pool.cloud != "aws":
            return None
        if not pool.zones:
            return h.subnet_ids
        import pulumi_aws as aws

        found = aws.ec2.get_subnets_output(
            filters=[
                aws.ec2.GetSubnetsFilterArgs(name="subnet-id", values=h.subnet_ids),  # type: ignore[arg-type]
                aws.ec2.GetSubnetsFilterArgs(name="availability-zone", values=list(pool.zones)),
            ],
            opts=pulumi.InvokeOutputOptions(parent=self, provider=self._aws),
        )
        return found.ids

    def _gcp_cluster(self, name: str, h: _ClusterHandle) -> pulumi.Output[str]:
        import pulumi_gcp as gcp

        cfg = self.plan.clouds.gcp
        assert cfg is not None
        self._gcp = gcp.Provider(
            f"{name}-gcp", project=cfg.project, region=cfg.region, opts=pulumi.ResourceOptions(parent=self)
        )
        child = pulumi.ResourceOptions(parent=self, provider=self._gcp)
        if cfg.create_cluster:
            gke = gcp.container.Cluster(
                f"{name}-gke",
                name=cfg.cluster,
                location=cfg.region,
                project=cfg.project,
                network=cfg.network,
                # The fleet's GPU pools are separate node pools; the default pool is dropped.
                remove_default_node_pool=True,
                initial_node_count=1,
                deletion_protection=False,
                opts=child,
            )
            h.name = gke.name
            h.depends_on = [gke]
            endpoint = gke.endpoint
            ca = gke.master_auth.apply(
                lambda m: m["cluster_ca_certificate"] if isinstance(m, dict) else m.cluster_ca_certificate
            )
        else:
            found = gcp.container.get_cluster_output(
                name=cfg.cluster,
                location=cfg.region,
                project=cfg.project,
                opts=pulumi.InvokeOutputOptions(parent=self, provider=self._gcp),
            )
            endpoint = found.endpoint
            ca = found.master_auths.apply(lambda ms: ms[0].cluster_ca_certificate)
        return gke_kubeconfig(cfg.cluster, endpoint, ca)
