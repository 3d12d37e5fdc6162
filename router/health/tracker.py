"""`HealthTracker`: failure counting, outlier ejection capped per model, backoff and re-admission.

Pure bookkeeping (the clock is passed in): consecutive replica failures, the success-rate and
failure-percentage outliers of each `outlier_interval_s` window (`evaluate`), the per-model
`max_ejection_percent` cap, and the doubling backoff before an active check may re-admit.
The package docstring (`gpufleet.router.health`) states the rules in full.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gpufleet.router.config import HealthSettings
from gpufleet.router.health.classify import Failure
from gpufleet.router.types import ReplicaState

__all__ = ["HealthTracker", "OnEject"]

log = logging.getLogger("gpufleet.router.health")


@dataclass(slots=True)
class _Record:
    failures: int = 0
    """Consecutive replica failures."""
    ejected_until: float = 0.0
    backoff_s: float = 0.0
    by_outlier: bool = False
    """Ejected by outlier detection (counts toward the cap) rather than by an active check."""
    # the current outlier-detection window
    answered: int = 0
    """Attempts the replica answered (any status but 502/503/504)."""
    faults: int = 0
    """Attempts that ended in a replica failure."""
    errors_5xx: int = 0
    """Answers with a 5xx status of any cause (a request failure included)."""


OnEject = Callable[[ReplicaState, str, str], None]
"""on_eject(replica, kind, reason): kind is consecutive_failures, active_check, success_rate or failure_percentage."""


class HealthTracker:
    """Failure counting, outlier ejection (capped per model) and re-admission for a set of replicas."""

    def __init__(
        self,
        settings: HealthSettings,
        replicas: Iterable[ReplicaState],
        *,
        clock: Callable[[], float] = time.monotonic,
        on_eject: OnEject | None = None,
        on_readmit: Callable[[ReplicaState], None] | None = None,
        on_suspect: Callable[[ReplicaState], None] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.on_eject = on_eject
        self.on_readmit = on_readmit
        self.on_suspect = on_suspect
        self._records: dict[str, _Record] = {}
        self._replicas: dict[str, ReplicaState] = {}
        self._left: dict[str, ReplicaState] = {}
        """Replicas that left the set (by id, the state object that left): late reports about them
        (requests still in flight, a check already running) change nothing."""
        for r in replicas:
            self._rec(r)

    def _rec(self, replica: ReplicaState) -> _Record:
        if self._left.get(replica.id) is replica:
            return _Record(backoff_s=self.settings.backoff_initial_s)  # not kept
        rec = self._records.get(replica.id)
        if rec is None:  # a replica added at run time (live membership)
            rec = self._records[replica.id] = _Record(backoff_s=self.settings.backoff_initial_s)
        if self._replicas.get(replica.id) is not replica:
            # live membership may rebuild a replica's state: the cap must count the current one
            self._replicas[replica.id] = replica
        return rec

    def _gone(self, replica: ReplicaState) -> bool:
        return self._left.get(replica.id) is replica

    def add(self, replica: ReplicaState) -> None:
        """Track a replica that joined (a fresh record; one that stays keeps its own)."""
        if self._left.get(replica.id) is not replica:
            self._left.pop(replica.id, None)
        self._rec(replica)

    def forget(self, replica_id: str) -> None:
        """Drop a replica that left the set; later reports about that state object are ignored."""
        self._records.pop(replica_id, None)
        gone = self._replicas.pop(replica_id, None)
        if gone is not None:
            self._left[replica_id] = gone

    remove = forget

    def record(self, replica_id: str) -> tuple[int, float, float]:
        """(consecutive failures, seconds until re-admission is allowed, current backoff) for views."""
        rec = self._records[replica_id]
        return rec.failures, max(0.0, rec.ejected_until - self.clock()), rec.backoff_s

    # -- outcomes of proxied requests -------------------------------------------------------
    def success(self, replica: ReplicaState) -> None:
        """A proxied request succeeded: failures are forgiven and the backoff resets."""
        rec = self._rec(replica)
        rec.failures = 0
        rec.answered += 1
        replica.suspect = False
        if replica.healthy:
            rec.backoff_s = self.settings.backoff_initial_s

    def answered_error(self, replica: ReplicaState, status: int) -> None:
        """The engine answered an error for this request (a request failure): it is alive."""
        rec = self._rec(replica)
        rec.failures = 0
        rec.answered += 1
        replica.suspect = False
        if status >= 500:
            rec.errors_5xx += 1

    def failure(self, replica: ReplicaState, kind: Failure = Failure.RESET, detail: str = "") -> bool:
        """A replica failure; returns True when it ejected the replica.

        The replica becomes suspect (`on_suspect` runs, so it is checked at once); after
        `eject_after_failures` in a row it is ejected, within the per-model cap.
        """
        rec = self._rec(replica)
        if kind is Failure.BUSY or kind is Failure.REQUEST:
            return False
        rec.failures += 1
        rec.faults += 1
        if not replica.healthy:
            # Still failing while ejected: push re-admission further out.
            rec.ejected_until = max(rec.ejected_until, self.clock() + rec.backoff_s)
            return False
        if not replica.suspect:
            replica.suspect = True
            if self.on_suspect is not None:
                self.on_suspect(replica)
        if rec.failures < self.settings.eject_after_failures:
            return False
        what = f"{kind.value}: {detail}" if detail else kind.value
        reason = f"{rec.failures} consecutive replica failures (last {what})"
        return self._eject(replica, "consecutive_failures", reason, capped=True)

    # -- active checks ----------------------------------------------------------------------
    def check_failed(self, replica: ReplicaState, detail: str = "") -> bool:
        """An active check failed; ejects the replica (no cap: it was observed). True if it did."""
        rec = self._rec(replica)
        rec.failures += 1
        if not replica.healthy:
            rec.ejected_until = max(rec.ejected_until, self.clock() + rec.backoff_s)
            if rec.by_outlier:
                rec.by_outlier = False  # now held out by its checks: no longer counts toward the cap
            return False
        return self._eject(replica, "active_check", f"active check failed ({detail or 'not 2xx'})", capped=False)

    def check_passed(self, replica: ReplicaState) -> bool:
        """An active check succeeded; returns True when this re-admitted the replica."""
        if self._gone(replica):  # it left the set while the check ran: it stays out
            return False
        rec = self._rec(replica)
        if replica.healthy:
            rec.failures = 0
            replica.suspect = False
            return False
        if self.clock() < rec.ejected_until:
            return False
        rec.failures = 0
        rec.by_outlier = False
        replica.healthy = True
        replica.suspect = False
        if self.on_readmit is not None:
            self.on_readmit(replica)
        return True

    # -- ejection and its cap ---------------------------------------------------------------
    def ejection_allowed(self, replica: ReplicaState) -> bool:
        """Whether outlier detection may eject `replica` now: the per-model cap."""
        peers = [r for r in self._replicas.values() if r.model == replica.model]
        if len(peers) < 2:
            return False  # ejecting a model's only replica turns some failures into all failures
        cap = max(1, math.floor(len(peers) * self.settings.max_ejection_percent / 100))
        held = sum(1 for r in peers if not r.healthy and self._records[r.id].by_outlier)
        return held < cap

    def _eject(self, replica: ReplicaState, kind: str, reason: str, *, capped: bool) -> bool:
        rec = self._records[replica.id]
        if capped and not self.ejection_allowed(replica):
            log.info("replica %s not ejected (%s): max_ejection_percent reached", replica.id, reason)
            return False
        now = self.clock()
        replica.healthy = False
        rec.by_outlier = capped
        rec.ejected_until = now + rec.backoff_s
        rec.backoff_s = min(rec.backoff_s * 2, self.settings.backoff_max_s)
        if self.on_eject is not None:
            self.on_eject(replica, kind, reason)
        return True

    def evaluate(self) -> list[str]:
        """Close the outlier-detection window: eject success-rate and failure-percentage outliers.

        Returns the ids ejected. Called every `outlier_interval_s` by the checker.
        """
        s = self.settings
        ejected: list[str] = []
        by_model: dict[str, list[tuple[ReplicaState, _Record]]] = {}
        for rid, rec in self._records.items():
            r = self._replicas[rid]
            by_model.setdefault(r.model, []).append((r, rec))
        for group in by_model.values():
            rates: list[tuple[ReplicaState, float]] = []
            for r, rec in group:
                total = rec.answered + rec.faults
                if not r.healthy or total < s.success_rate_min_requests:
                    continue
                rates.append((r, rec.answered / total))
                share = 100.0 * (rec.faults + rec.errors_5xx) / total
                if share >= s.failure_percentage_threshold and self._eject(
                    r,
                    "failure_percentage",
                    f"{share:.0f}% of {total} attempts failed in {s.outlier_interval_s:g}s",
                    capped=True,
                ):
                    ejected.append(r.id)
            if len(rates) >= s.success_rate_min_replicas:
                mean = sum(v for _, v in rates) / len(rates)
                stdev = math.sqrt(sum((v - mean) ** 2 for _, v in rates) / len(rates))
                limit = mean - s.success_rate_stdev_factor * stdev
                for r, v in sorted(rates, key=lambda x: x[1]):
                    if (
                        r.healthy
                        and v < limit
                        and self._eject(
                            r,
                            "success_rate",
                            f"success rate {v:.2f} below its peers' threshold {limit:.2f}",
                            capped=True,
                        )
                    ):
                        ejected.append(r.id)
            for _, rec in group:
                rec.answered = rec.faults = rec.errors_5xx = 0
        return ejected
