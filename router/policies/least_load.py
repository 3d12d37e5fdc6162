"""`least_load`: fewest in-flight requests; ties by queued prefill, then rendezvous on the prompt."""

from __future__ import annotations

from collections.abc import Sequence

from gpufleet.router.policies import registry
from gpufleet.router.policies.base import rendezvous
from gpufleet.router.policies.policy import Policy
from gpufleet.router.types import Decision, ReplicaState, RequestFeatures

__all__ = ["LeastLoadPolicy", "least_loaded"]


def least_loaded(tier: Sequence[ReplicaState], key: int) -> ReplicaState:
    """Fewest in-flight requests, then least queued prefill, then rendezvous on `key`."""
    best = tier[0]
    best_score = (best.in_flight, best.queued_prefill_tokens, -rendezvous(key, best.id_hash))
    for r in tier[1:]:
        score = (r.in_flight, r.queued_prefill_tokens, -rendezvous(key, r.id_hash))
        if score < best_score:
            best, best_score = r, score
    return best


class LeastLoadPolicy(Policy):
    """Fewest in-flight requests; ties by queued prefill, then rendezvous on the prompt."""

    name = "least_load"

    def _pick(
        self, features: RequestFeatures, tier: Sequence[ReplicaState], replicas: Sequence[ReplicaState]
    ) -> Decision:
        return Decision(least_loaded(tier, features.affinity_key), reason="load")


registry.register(LeastLoadPolicy.name, LeastLoadPolicy)
