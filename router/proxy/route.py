"""Route and retry: `policy.choose` -> an attempt -> on a replica failure, another replica.

A suspect replica (its active check is pending) is kept out of the choice while a trusted one can
serve. A failed attempt is retried on the model's remaining replicas at most `max_retries` times,
and only while the retry budget allows (retries in flight stay under `retry.budget_percent` of
the requests in flight, at least `retry.min_retry_concurrency`). Each decision is counted
(decisions, predicted hits, spills) and told to the policy and the session binding.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import Counter

from gpufleet.router import errors
from gpufleet.router.config import RouterSettings
from gpufleet.router.health import Failure
from gpufleet.router.metrics import RouterMetrics
from gpufleet.router.policies import Policy
from gpufleet.router.proxy.attempt import Attempts
from gpufleet.router.proxy.request import ProxyRequest, Retryable
from gpufleet.router.sessions import SessionBinder
from gpufleet.router.types import Decision, Outcome, ReplicaState

__all__ = ["Dispatcher"]


class Dispatcher:
    """Chooses a replica for each request and retries on another one within the retry budget."""

    def __init__(
        self,
        settings: RouterSettings,
        policy: Policy,
        metrics: RouterMetrics,
        sessions: SessionBinder | None,
        attempts: Attempts,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.metrics = metrics
        self.sessions = sessions
        self.attempts = attempts
        self._m_decisions: dict[str, Counter] = {}
        self._in_flight = 0
        self._retries_in_flight = 0

    def _retry_allowed(self) -> bool:
        """The retry budget: retries in flight stay under a share of the requests in flight."""
        b = self.settings.retry
        return self._retries_in_flight < max(b.min_retry_concurrency, b.budget_percent / 100 * self._in_flight)

    async def route(self, req: ProxyRequest) -> web.StreamResponse:
        """Answer `req` from a replica the policy chooses, retrying a replica failure elsewhere."""
        features = req.features
        candidates: list[ReplicaState] = req.group.replicas
        failures: list[str] = []
        timeouts = 0
        self._in_flight += 1
        try:
            while True:
                pool = candidates
                if any(x.suspect for x in pool):
                    # A suspect replica is being checked: keep off it while anything else can serve.
                    trusted = [x for x in pool if not x.suspect]
                    if any(x.available for x in trusted):
                        pool = trusted
                decision = self.policy.choose(features, pool)
                r = decision.replica
                if r is None:
                    if failures:
                        raise errors.UpstreamFailed(
                            f"no replica answered: {'; '.join(failures)}", headers={"Retry-After": "1"}
                        )
                    if decision.outcome is Outcome.SATURATED:
                        raise errors.AllSaturated(
                            f"every replica of {features.model!r} is at its concurrency limit; retry shortly",
                            headers={"Retry-After": "1"},
                        )
                    raise errors.NoHealthyReplica(
                        f"no healthy replica serves {features.model!r} right now", headers={"Retry-After": "5"}
                    )
                retry = bool(failures)
                if retry:
                    self._retries_in_flight += 1
                self._on_decision(req, r, decision)
                try:
                    return await self.attempts.run(req, r, decision)
                except Retryable as exc:
                    failures.append(f"{r.id}: {exc}")
                    timeouts += exc.kind is Failure.FIRST_BYTE
                    if len(failures) > self.settings.max_retries:
                        if timeouts == len(failures):
                            raise errors.UpstreamTimeout(
                                f"no replica answered in time: {'; '.join(failures)}"
                            ) from None
                        raise errors.UpstreamFailed(f"no replica answered: {'; '.join(failures)}") from None
                    if not self._retry_allowed():
                        self.metrics.retry_budget_exhausted.inc()
                        raise errors.UpstreamFailed(
                            f"no replica answered and the retry budget is spent: {'; '.join(failures)}",
                            headers={"Retry-After": "1"},
                        ) from None
                    self.metrics.retries.labels(r.id).inc()
                    candidates = [x for x in candidates if x is not r]
                finally:
                    if retry:
                        self._retries_in_flight -= 1
        finally:
            self._in_flight -= 1

    def _on_decision(self, req: ProxyRequest, r: ReplicaState, d: Decision) -> None:
        features = req.features
        m = self.metrics
        rm = m.replica[r.id]
        decisions = self._m_decisions.get(d.reason)
        if decisions is None:
            decisions = self._m_decisions[d.reason] = m.decisions.labels(self.policy.name, d.reason)
        decisions.inc()
        rm.prompt_tokens.inc(features.prompt_tokens)
        if d.matched_blocks:
            rm.predicted_hit_tokens.inc(min(features.prompt_tokens, d.matched_blocks * self.settings.block_size_tokens))
        # Relative to the model's top pool, not to the candidates left after failed attempts: a
        # retry that lands on a lower pool because the top pool's replicas died is a spill too.
        if r.priority < req.group.top_priority:
            d.spilled = True
        if d.spilled:
            m.spills.labels(features.model, r.pool).inc()
        self.policy.on_routed(features, d)
        if features.session_id is not None and self.sessions is not None:
            self.sessions.bound(features.session_id, r.id)
