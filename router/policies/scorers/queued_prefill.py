"""`queued_prefill`: the prefill tokens already queued on the replica (no parameters).

`ReplicaState.queued_prefill_tokens`: the uncached prompt tokens of requests sent there that have
not produced their first token yet, i.e. prefill this request would wait behind.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpufleet.router.policies import registry
from gpufleet.router.policies.base import Candidates, Scorer

__all__ = ["QueuedPrefill"]


class QueuedPrefill(Scorer):
    """Queued prefill tokens per replica."""

    def score(self, candidates: Candidates) -> Sequence[float]:
        return [r.queued_prefill_tokens for r in candidates.replicas]


registry.register("queued_prefill", QueuedPrefill)
