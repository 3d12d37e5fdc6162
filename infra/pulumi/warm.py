"""`WarmCapacity`: the placeholder and serving PriorityClasses and, per pool with warm nodes or
later in a failover chain, a Deployment of pause pods that each hold one whole node's GPUs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pulumi

from gpufleet.infra import manifests
from gpufleet.infra.plan import Plan, PoolPlan
from gpufleet.infra.pulumi._kube import apply_object

__all__ = ["WarmCapacity", "WarmCapacityArgs"]


@dataclass
class WarmCapacityArgs:
    plan: Plan
    pools: Sequence[PoolPlan]
    options: manifests.ManifestOptions = field(default_factory=manifests.ManifestOptions)


class WarmCapacity(pulumi.ComponentResource):
    """Warm nodes held by lowest-priority placeholders, evicted at once by model replicas.

    The placeholder PriorityClass has value -10 and never preempts (the cluster-autoscaler
    overprovisioning convention); model replicas run under the higher serving class, so the
    scheduler evicts a placeholder when a replica needs its GPUs and the autoscaler adds a
    new node for the evicted placeholder. Pools that follow another in a deployment's
    failover chain get their placeholder Deployment even with no warm nodes declared (0
    replicas): it is what the controller scales to warm them ahead of spill-over.
    """

    placeholder_priority_class: pulumi.Output[str]
    serving_priority_class: pulumi.Output[str]
    placeholders: pulumi.Output[dict[str, int]]

    def __init__(self, name: str, args: WarmCapacityArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpufleet:warm:WarmCapacity", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        low = manifests.placeholder_priority_class(args.plan)
        high = manifests.serving_priority_class(args.plan)
        low_res = apply_object(f"{name}-placeholder-priority", low, child)
        apply_object(f"{name}-serving-priority", high, child)
        counts: dict[str, int] = {}
        for pool in manifests.placeholder_pools(args.plan, args.pools):
            obj = manifests.placeholder_deployment(args.plan, pool, args.options)
            apply_object(
                f"{name}-{pool.name}",
                obj,
                pulumi.ResourceOptions(
                    parent=self,
                    depends_on=[low_res],
                    # The placeholders are ready only once the warm nodes have joined.
                    custom_timeouts=pulumi.CustomTimeouts(create="30m", update="30m"),
                ),
            )
            counts[pool.name] = pool.warm_nodes
        # A buffered pool's warm nodes: its CapacityBuffer and PodTemplate (manifests.autoscalers).
        for pool in args.pools:
            if manifests.buffered(args.plan, pool) and pool.warm_nodes > 0:
                template = apply_object(
                    f"{name}-{pool.name}-buffer-template",
                    manifests.buffer_pod_template(args.plan, pool, args.options),
                    child,
                )
                apply_object(
                    f"{name}-{pool.name}-buffer",
                    manifests.capacity_buffer(args.plan, pool),
                    pulumi.ResourceOptions(parent=self, depends_on=[template, low_res]),
                )
        self.placeholder_priority_class = pulumi.Output.from_input(low["metadata"]["name"])
        self.serving_priority_class = pulumi.Output.from_input(high["metadata"]["name"])
        self.placeholders = pulumi.Output.from_input(counts)
        self.register_outputs(
            {
                "placeholder_priority_class": self.placeholder_priority_class,
                "serving_priority_class": self.serving_priority_class,
                "placeholders": self.placeholders,
            }
        )
