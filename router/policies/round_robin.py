"""`round_robin`: cycle through the eligible replicas, per model."""

from __future__ import annotations

from collections.abc import Sequence

from gpufleet.router.policies import registry
from gpufleet.router.policies.policy import Policy
from gpufleet.router.types import Decision, ReplicaState, RequestFeatures

__all__ = ["RoundRobinPolicy"]


class RoundRobinPolicy(Policy):
    """Cycle through the eligible replicas, per model."""

    name = "round_robin"

    def _setup(self) -> None:
        self._next: dict[str, int] = {}

    def _pick(
        self, features: RequestFeatures, tier: Sequence[ReplicaState], replicas: Sequence[ReplicaState]
    ) -> Decision:
        i = self._next.get(features.model, 0)
        self._next[features.model] = i + 1
        return Decision(tier[i % len(tier)], reason="round_robin")


registry.register(RoundRobinPolicy.name, RoundRobinPolicy)
