"""`pool_priority`: keep the available replicas of the highest-priority pool that has one.

Every policy applies it: traffic stays in the model's top pool while that pool has a healthy
replica below its `max_concurrent_requests`, and *spills* to the next lower priority only when
none is left. Choosing below the top pool is reported as a spill. No parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpufleet.router.policies import registry
from gpufleet.router.policies.base import Filter
from gpufleet.router.types import ReplicaState, RequestFeatures

__all__ = ["PoolPriority"]


class PoolPriority(Filter):
    """Available replicas of the best pool that has one, and whether that pool is below the top."""

    def filter(
        self, features: RequestFeatures, replicas: Sequence[ReplicaState]
    ) -> tuple[Sequence[ReplicaState], bool]:
        if not replicas:
            return [], False
        top = replicas[0].priority
        best: int | None = None
        for r in replicas:
            p = r.priority
            if p > top:
                top = p
            if r.healthy and r.in_flight < r.max_concurrent_requests and (best is None or p > best):
                best = p
        if best is None:
            return [], False
        return [r for r in replicas if r.priority == best and r.available], best < top


registry.register("pool_priority", PoolPriority)
