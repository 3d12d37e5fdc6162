"""`Policy`: what the server and the simulator call, one signature for every routing policy.

    choose(features: RequestFeatures, replicas: Sequence[ReplicaState]) -> Decision

plus the lifecycle hooks of `base.Hooks`. `replicas` are all replicas of the request's model, in
any order. A policy does no I/O, so the live server and the discrete-event simulator run the very
same objects (the simulator passes its own clock).

`choose` applies the policy's filters (`pool_priority` for every policy: the highest-priority pool
with an available replica) and lets `_pick` choose among what is left. When nothing is left the
decision says why: `Outcome.SATURATED` (429) if some replica is healthy, else
`Outcome.UNAVAILABLE` (503).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from gpufleet.router.config import RouterSettings
from gpufleet.router.policies.base import Filter, Hooks
from gpufleet.router.policies.filters.pool_priority import PoolPriority
from gpufleet.router.types import Decision, Outcome, ReplicaState, RequestFeatures

__all__ = ["Policy"]


class Policy(Hooks, ABC):
    """Base of every routing policy. Subclasses set `name` and implement `_pick`."""

    kind: ClassVar[str] = "policy"
    name: str = ""

    def __init__(
        self,
        settings: RouterSettings | None = None,
        *,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        filters: Sequence[Filter] | None = None,
    ) -> None:
        self.settings = settings if settings is not None else RouterSettings()
        self.clock = clock
        self.seed = seed
        self.filters: tuple[Filter, ...] = tuple(filters) if filters is not None else (PoolPriority(),)
        self._setup()

    def _setup(self) -> None:
        """Make a subclass's own state (settings, seed and clock are set), without repeating `__init__`."""

    def choose(self, features: RequestFeatures, replicas: Sequence[ReplicaState]) -> Decision:
        """Pick a replica for the request among `replicas` (all replicas of its model)."""
        tier = replicas
        spilled = False
        for f in self.filters:
            tier, below = f.filter(features, tier)
            if not tier:
                outcome = Outcome.SATURATED if any(r.healthy for r in replicas) else Outcome.UNAVAILABLE
                return Decision(None, outcome, outcome.value)
            spilled = spilled or below
        decision = self._pick(features, tier, replicas)
        decision.spilled = decision.spilled or spilled
        if not decision.prefill_tokens and decision.replica is not None:
            bt = self.settings.block_size_tokens
            decision.prefill_tokens = max(0, features.prompt_tokens - decision.matched_blocks * bt)
        return decision

    @abstractmethod
    def _pick(
        self, features: RequestFeatures, tier: Sequence[ReplicaState], replicas: Sequence[ReplicaState]
    ) -> Decision:
        """Choose within `tier` (non-empty, what the filters kept: available, one pool priority)."""

    def bind(self, *, clock: Callable[[], float], **context: Any) -> None:
        self.clock = clock
