"""`session_affinity`: a session keeps its replica unless that costs more than a penalty bound.

    best  = min_cost's choice (lowest cost, rendezvous ties)
    bound = the session's replica: `RequestFeatures.session_replica` (a verified session token or
            the shared Redis binding, resolved by the server), else this picker's own memory
    limit = max(max_penalty_s, max_penalty_fraction x cost[best])
    pick  = bound  if bound is a candidate and cost[bound] - cost[best] <= limit
            best   otherwise (the session moves there, and stays: `on_routed` rebinds it)

Costs are those of the profile, seconds of estimated time to first token in `cache_aware` (the
`ttft` scorer), so `max_penalty_s` (default `session.max_penalty_s`) is how much later a first
token a session accepts to stay where its history is cached. When first tokens take seconds (an
overloaded fleet) the estimates are not exact to a tenth of a second, least of all with several
routers, each guessing what the others sent since their last report: there the bound grows with
the best cost (`max_penalty_fraction`, default `session.max_penalty_fraction`), so that a session
does not leave its cache on a difference inside the estimate's error. A bound replica that is not a
candidate (unhealthy, saturated, or below the best pool with an available replica: the filters
removed it) is unavailable, and the session moves. Requests without a session id get `best`.

The memory is an LRU of `session.max_sessions` entries, each valid for `session.ttl_s` on the
policy's clock (the simulator's in simulation), so the simulator runs exactly the live picker.
The decision's reason says what happened: `session` (stayed), `session_moved` (left its replica).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from gpufleet.router.policies import registry
from gpufleet.router.policies.base import Candidates, Picker, PluginContext
from gpufleet.router.policies.pickers.min_cost import MinCost
from gpufleet.router.types import Decision, RequestFeatures

__all__ = ["SessionAffinity"]


class SessionAffinity(Picker):
    """Sticky sessions within a penalty bound, else the lowest cost (module docs)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        max_penalty_s: float | None = Field(
            default=None, ge=0, description="extra cost a session accepts to stay (default: session.max_penalty_s)"
        )
        max_penalty_fraction: float | None = Field(
            default=None,
            ge=0,
            description="extra cost a session accepts to stay, as a fraction of the best cost "
            "(default: session.max_penalty_fraction); the larger bound applies",
        )

    def __init__(self, params: Params, ctx: PluginContext) -> None:
        s = ctx.settings.session
        self.max_penalty = s.max_penalty_s if params.max_penalty_s is None else params.max_penalty_s
        self.max_penalty_fraction = (
            s.max_penalty_fraction if params.max_penalty_fraction is None else params.max_penalty_fraction
        )
        self.ttl_s = s.ttl_s
        self.max_sessions = s.max_sessions
        self.clock: Callable[[], float] = ctx.clock
        self._best = MinCost()
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def bound_replica(self, features: RequestFeatures) -> str | None:
        """The replica the request's session is bound to (the server's, else remembered), if any."""
        if features.session_replica is not None:
            return features.session_replica
        sid = features.session_id
        if sid is None:
            return None
        entry = self._sessions.get(sid)
        if entry is None or entry[1] <= self.clock():
            return None
        return entry[0]

    def pick(self, candidates: Candidates, costs: Sequence[float]) -> int:
        best = self._best.pick(candidates, costs)
        f = candidates.features
        if f.session_id is None:
            return best
        bound = self.bound_replica(f)
        if bound is None:
            return best
        for i, r in enumerate(candidates.replicas):
            if r.id == bound:
                limit = max(self.max_penalty, self.max_penalty_fraction * costs[best])
                if costs[i] - costs[best] <= limit:
                    candidates.reason = "session"
                    return i
                break
        candidates.reason = "session_moved"
        return best

    def on_routed(self, features: RequestFeatures, decision: Decision) -> None:
        sid = features.session_id
        if sid is None or decision.replica is None:
            return
        sessions = self._sessions
        sessions[sid] = (decision.replica.id, self.clock() + self.ttl_s)
        sessions.move_to_end(sid)
        while len(sessions) > self.max_sessions:
            sessions.popitem(last=False)

    def bind(self, *, clock: Callable[[], float], **context: object) -> None:
        self.clock = clock


registry.register("session_affinity", SessionAffinity)
