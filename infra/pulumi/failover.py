"""`FailoverPriorities`: the cluster-autoscaler priority expander ConfigMap from the declared
pool priorities (model pods carry the matching weighted node affinity, see `infra.manifests`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi
import yaml

from gpufleet.infra import manifests
from gpufleet.infra.plan import Plan
from gpufleet.infra.pulumi._kube import apply_object

__all__ = ["FailoverPriorities", "FailoverPrioritiesArgs"]


@dataclass
class FailoverPrioritiesArgs:
    plan: Plan
    cluster: manifests.Cluster
    options: manifests.ManifestOptions = field(default_factory=manifests.ManifestOptions)


class FailoverPriorities(pulumi.ComponentResource):
    """`cluster-autoscaler-priority-expander` in the autoscaler's namespace.

    With `--expander=priority`, the autoscaler scales up the node group matching the highest
    priority that can fit the pending pods, and falls to the next when that group cannot grow
    (stock-out, quota, max size): the pool failover of the declaration.
    """

    priorities: pulumi.Output[dict[str, list[str]]]

    def __init__(self, name: str, args: FailoverPrioritiesArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpufleet:failover:FailoverPriorities", name, None, opts)
        obj = manifests.expander_configmap(args.plan, args.cluster, args.options)
        apply_object(f"{name}-expander", obj, pulumi.ResourceOptions(parent=self))
        # Output maps need string keys.
        self.priorities = pulumi.Output.from_input(
            {str(k): v for k, v in yaml.safe_load(obj["data"]["priorities"]).items()}
        )
        self.register_outputs({"priorities": self.priorities})
