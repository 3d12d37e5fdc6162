"""Pulumi components that turn the compiled plan into cloud and Kubernetes resources.

Type tokens are `gpufleet:<module>:<Type>`. Every component reads the Plan; the Kubernetes
objects come from `gpufleet.infra.manifests`, the same builders `gpufleet render manifests`
uses. Importing this package needs the `pulumi` extra.
"""

from __future__ import annotations

from gpufleet.infra.pulumi import stack_config
from gpufleet.infra.pulumi.controller import FailoverController, FailoverControllerArgs
from gpufleet.infra.pulumi.failover import FailoverPriorities, FailoverPrioritiesArgs
from gpufleet.infra.pulumi.fleet import Fleet, FleetArgs, InvalidFleet
from gpufleet.infra.pulumi.model import ModelDeployment, ModelDeploymentArgs
from gpufleet.infra.pulumi.nodepool import GpuNodepool, GpuNodepoolArgs
from gpufleet.infra.pulumi.router import CacheAwareRouter, CacheAwareRouterArgs
from gpufleet.infra.pulumi.warm import WarmCapacity, WarmCapacityArgs

__all__ = [
    "CacheAwareRouter",
    "CacheAwareRouterArgs",
    "FailoverController",
    "FailoverControllerArgs",
    "FailoverPriorities",
    "FailoverPrioritiesArgs",
    "Fleet",
    "FleetArgs",
    "GpuNodepool",
    "GpuNodepoolArgs",
    "InvalidFleet",
    "ModelDeployment",
    "ModelDeploymentArgs",
    "WarmCapacity",
    "WarmCapacityArgs",
    "stack_config",
]
