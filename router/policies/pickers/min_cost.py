"""`min_cost`: the replica with the lowest weighted cost; exact ties by rendezvous hashing.

Ties (e.g. a new prefix on idle replicas) go to the highest `rendezvous(affinity_key, replica)`,
the prompt's first block hashed with each replica's id: several router instances make the same
choice, and distinct prefixes spread over the replicas. No parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpufleet.router.policies import registry
from gpufleet.router.policies.base import Candidates, Picker, rendezvous

__all__ = ["MinCost"]


class MinCost(Picker):
    """Lowest cost; among equal costs the highest rendezvous score (the first on equal scores)."""

    def pick(self, candidates: Candidates, costs: Sequence[float]) -> int:
        best = min(costs)
        first = costs.index(best)
        if costs.count(best) == 1:
            return first
        key = candidates.features.affinity_key
        replicas = candidates.replicas
        chosen, chosen_tie = first, rendezvous(key, replicas[first].id_hash)
        for i in range(first + 1, len(costs)):
            if costs[i] == best:
                tie = rendezvous(key, replicas[i].id_hash)
                if tie > chosen_tie:
                    chosen, chosen_tie = i, tie
        return chosen


registry.register("min_cost", MinCost)
