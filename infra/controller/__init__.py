"""The warm-capacity / failover controller.

`decide` (pure: plan facts + utilisation samples + time -> actions) lives in
`gpufleet.infra.controller.decision`; the reconcile loop that observes pools through the provider
adapters, applies actions, logs them and exports Prometheus metrics lives in
`gpufleet.infra.controller.runtime`. See docs/controller.md.
"""
from __future__ import annotations

from gpufleet.infra.controller.decision import (
    Action,
    ControllerSettings,
    ControllerState,
    Decision,
    DeploymentFacts,
    FleetFacts,
    PoolFacts,
    PoolMemory,
    PoolSample,
    decide,
)

__all__ = [
    "Action",
    "ControllerSettings",
    "ControllerState",
    "Decision",
    "DeploymentFacts",
    "FleetFacts",
    "PoolFacts",
    "PoolMemory",
    "PoolSample",
    "decide",
]
