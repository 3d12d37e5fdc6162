"""`random`: uniformly random among the eligible replicas (seedable for simulations)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from gpufleet.router.policies import registry
from gpufleet.router.policies.policy import Policy
from gpufleet.router.types import Decision, ReplicaState, RequestFeatures

__all__ = ["RandomPolicy"]


class RandomPolicy(Policy):
    """Uniformly random among the eligible replicas (seedable for simulations)."""

    name = "random"

    def _setup(self) -> None:
        self._rng = random.Random(self.seed)

    def _pick(
        self, features: RequestFeatures, tier: Sequence[ReplicaState], replicas: Sequence[ReplicaState]
    ) -> Decision:
        return Decision(tier[self._rng.randrange(len(tier))], reason="random")


registry.register(RandomPolicy.name, RandomPolicy)
