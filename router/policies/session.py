"""`session`: sticky per session id while the replica is healthy and not saturated; else move and stay.

New sessions go to the least-loaded replica of the best pool (ties by rendezvous on the session
id, so router instances agree). Requests without a session id are routed by load. Sessions are
kept in a bounded LRU with a TTL. Its parameters are the `session:` block of the router settings.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from gpufleet.router.config import SessionSettings
from gpufleet.router.policies import registry
from gpufleet.router.policies.least_load import least_loaded
from gpufleet.router.policies.policy import Policy
from gpufleet.router.types import Decision, ReplicaState, RequestFeatures, stable_hash

__all__ = ["SessionPolicy"]


class SessionPolicy(Policy):
    """Sticky replica per session id (module docs)."""

    name = "session"
    Params = SessionSettings

    def _setup(self) -> None:
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def _pick(
        self, features: RequestFeatures, tier: Sequence[ReplicaState], replicas: Sequence[ReplicaState]
    ) -> Decision:
        sid = features.session_id
        if sid is None:
            return Decision(least_loaded(tier, features.affinity_key), reason="load")
        entry = self._sessions.get(sid)
        moved = False
        if entry is not None:
            rid, expires = entry
            if expires > self.clock():
                for r in replicas:
                    if r.id == rid:
                        if r.available:
                            top = max(x.priority for x in replicas)
                            return Decision(r, reason="session", spilled=r.priority < top)
                        moved = True
                        break
        chosen = least_loaded(tier, stable_hash(sid))
        return Decision(chosen, reason="session_moved" if moved else "session_new")

    def on_routed(self, features: RequestFeatures, decision: Decision) -> None:
        sid = features.session_id
        if sid is None or decision.replica is None:
            return
        sessions = self._sessions
        sessions[sid] = (decision.replica.id, self.clock() + self.settings.session.ttl_s)
        sessions.move_to_end(sid)
        while len(sessions) > self.settings.session.max_sessions:
            sessions.popitem(last=False)

    def session_replica(self, session_id: str) -> str | None:
        """The replica a session is bound to, if any (for tests and admin views)."""
        entry = self._sessions.get(session_id)
        return entry[0] if entry else None


registry.register(SessionPolicy.name, SessionPolicy)
