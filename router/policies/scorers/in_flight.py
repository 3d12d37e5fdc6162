"""`in_flight`: the replica's running requests, each worth `cost_tokens` prefill tokens.

A request in flight takes its share of every decode step, which delays the first token of a new
request on that replica about as much as prefilling `cost_tokens` more tokens would.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from gpufleet.router.policies import registry
from gpufleet.router.policies.base import Candidates, PluginContext, Scorer

__all__ = ["InFlight"]


class InFlight(Scorer):
    """In-flight requests x `cost_tokens`."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        cost_tokens: int = Field(default=64, ge=0, description="prefill-token equivalent of one in-flight request")

    def __init__(self, params: Params, ctx: PluginContext) -> None:
        self.cost_tokens = params.cost_tokens

    def score(self, candidates: Candidates) -> Sequence[float]:
        cost = self.cost_tokens
        return [r.in_flight * cost for r in candidates.replicas]


registry.register("in_flight", InFlight)
