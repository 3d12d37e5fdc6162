"""`random`: uniformly random among the eligible replicas (seedable for simulations)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

from gpufleet.router.config import RouterSettings
from gpufleet.router.policies import registry
from gpufleet.router.policies.policy import Policy
from gpufleet.router.types import Decision, ReplicaState, RequestFeatures

__all__ = ["RandomPolicy"]


class RandomPolicy(Policy):
    """Uniformly random among the eligible replicas (seedable for simulations)."""

    name = "random"

    def __init__(
        self,
        settings: RouterSettings | None = None,
        *,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(settings, seed=seed, clock=clock)
        self._rng = random.Random(self.seed)

    def _pick(
        self, features: RequestFeatures, tier: Sequence[ReplicaState], replicas: Sequence[ReplicaState]
    ) -> Decision:
        return Decision(tier[self._rng.randrange(len(tier))], reason="random")


registry.register(RandomPolicy.name, RandomPolicy)
