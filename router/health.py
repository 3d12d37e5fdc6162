"""Replica health: passive ejection on failures, active checks, backoff and re-admission.

A replica is *ejected* (its `ReplicaState.healthy` set False) after
`health.eject_after_failures` consecutive failures, counted both from proxied requests
(connection errors, 5xx) and from active `GET /health` checks. An ejected replica is not
re-admitted before its backoff has passed and an active check succeeds; each ejection that
follows a re-admission without an intervening successful request doubles the backoff, up to
`health.backoff_max_s`. The bookkeeping here is pure (time is passed in), so it is unit-tested
without a network; `HealthChecker.run` is the one loop that does I/O.

With `health.scrape_kv_usage`, each check that passes also reads the replica's KV-cache usage
from its Prometheus `/metrics` (`parse_kv_usage`) into `ReplicaState.kv_usage`: a sample per
interval, stale in between, which is exactly what the simulator gives policies too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpufleet.router.config import HealthSettings
from gpufleet.router.types import ReplicaState

if TYPE_CHECKING:
    import aiohttp

__all__ = ["KV_USAGE_METRICS", "HealthChecker", "HealthTracker", "parse_kv_usage"]

log = logging.getLogger("gpufleet.router.health")


KV_USAGE_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
"""Gauges of the fraction of KV blocks in use, by preference: vLLM v1's name, then v0's."""


def parse_kv_usage(text: str) -> float | None:
    """KV-cache usage (0..1) from a Prometheus text exposition, or None if it has none.

    Takes the first name of `KV_USAGE_METRICS` present; several series of it (one per engine
    of a data-parallel server) are averaged. Malformed values are skipped.
    """
    for name in KV_USAGE_METRICS:
        values: list[float] = []
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            rest = line[len(name) :]
            if rest[:1] not in ("{", " "):
                continue  # another metric whose name starts with this one
            try:
                value = float(rest.rsplit("}", 1)[-1].split()[0])
            except (IndexError, ValueError):
                continue
            if value == value:  # not NaN
                values.append(min(1.0, max(0.0, value)))
        if values:
            return sum(values) / len(values)
    return None


@dataclass(slots=True)
class _Record:
    failures: int = 0
    ejected_until: float = 0.0
    backoff_s: float = 0.0


class HealthTracker:
    """Failure counting, ejection and re-admission for a set of replicas."""

    def __init__(
        self,
        settings: HealthSettings,
        replicas: Sequence[ReplicaState],
        *,
        clock: Callable[[], float] = time.monotonic,
        on_eject: Callable[[ReplicaState], None] | None = None,
        on_readmit: Callable[[ReplicaState], None] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.on_eject = on_eject
        self.on_readmit = on_readmit
        self._records = {r.id: _Record(backoff_s=settings.backoff_initial_s) for r in replicas}

    def add(self, replica: ReplicaState) -> None:
        """Track a replica that joined (a fresh record; one that stays keeps its own)."""
        self._records.setdefault(replica.id, _Record(backoff_s=self.settings.backoff_initial_s))

    def remove(self, replica_id: str) -> None:
        """Forget a replica that left; later reports about it (requests still in flight) are ignored."""
        self._records.pop(replica_id, None)

    def record(self, replica_id: str) -> tuple[int, float, float]:
        """(consecutive failures, seconds until re-admission is allowed, current backoff) for views."""
        rec = self._records.get(replica_id)
        if rec is None:
            return 0, 0.0, self.settings.backoff_initial_s
        return rec.failures, max(0.0, rec.ejected_until - self.clock()), rec.backoff_s

    def success(self, replica: ReplicaState) -> None:
        """A proxied request succeeded: failures are forgiven and the backoff resets."""
        rec = self._records.get(replica.id)
        if rec is None:
            return
        rec.failures = 0
        if replica.healthy:
            rec.backoff_s = self.settings.backoff_initial_s

    def failure(self, replica: ReplicaState) -> bool:
        """A request or check failed; returns True when this failure ejected the replica."""
        rec = self._records.get(replica.id)
        if rec is None:  # it left the set: nothing to eject
            return False
        rec.failures += 1
        now = self.clock()
        if not replica.healthy:
            # Still failing while ejected: push re-admission further out.
            rec.ejected_until = max(rec.ejected_until, now + rec.backoff_s)
            return False
        if rec.failures < self.settings.eject_after_failures:
            return False
        replica.healthy = False
        rec.ejected_until = now + rec.backoff_s
        rec.backoff_s = min(rec.backoff_s * 2, self.settings.backoff_max_s)
        if self.on_eject is not None:
            self.on_eject(replica)
        return True

    def check_passed(self, replica: ReplicaState) -> bool:
        """An active check succeeded; returns True when this re-admitted the replica."""
        rec = self._records.get(replica.id)
        if rec is None:  # it left the set while the check ran: it stays out
            return False
        if replica.healthy:
            rec.failures = 0
            return False
        if self.clock() < rec.ejected_until:
            return False
        rec.failures = 0
        replica.healthy = True
        if self.on_readmit is not None:
            self.on_readmit(replica)
        return True


class HealthChecker:
    """Runs `GET {url}/health` on every replica every `interval_s` (the only I/O of this module)."""

    def __init__(
        self, tracker: HealthTracker, replicas: Sequence[ReplicaState], session: aiohttp.ClientSession
    ) -> None:
        self.tracker = tracker
        self.replicas = replicas  # the live set: each round checks the members of that moment
        self.session = session

    async def check(self, replica: ReplicaState) -> bool:
        """One check of one replica; updates the tracker. True when the replica answered 2xx."""
        import aiohttp

        s = self.tracker.settings
        try:
            async with self.session.get(
                replica.url.rstrip("/") + "/health", timeout=aiohttp.ClientTimeout(total=s.timeout_s)
            ) as resp:
                ok: bool = 200 <= resp.status < 300
        except (TimeoutError, aiohttp.ClientError, OSError):
            ok = False
        if ok:
            self.tracker.check_passed(replica)
            if s.scrape_kv_usage:
                await self.scrape_kv_usage(replica)
        else:
            self.tracker.failure(replica)
        return ok

    async def scrape_kv_usage(self, replica: ReplicaState) -> float | None:
        """Read the replica's KV usage from `GET {url}/metrics` into its state; None if unavailable.

        A replica without the metric (or a failed scrape) keeps its last sample: this is a
        routing hint, not a health signal, so it never counts as a failure.
        """
        import aiohttp

        try:
            async with self.session.get(
                replica.url.rstrip("/") + "/metrics",
                timeout=aiohttp.ClientTimeout(total=self.tracker.settings.timeout_s),
            ) as resp:
                if resp.status != 200:
                    return None
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
            return None
        usage = parse_kv_usage(text)
        if usage is not None:
            replica.report_kv_usage(usage)
        return usage

    async def check_all(self) -> None:
        """Check every replica concurrently."""
        await asyncio.gather(*(self.check(r) for r in list(self.replicas)))

    async def run(self) -> None:
        """Check forever, every `interval_s`; cancelled by the app's cleanup."""
        interval = self.tracker.settings.interval_s
        while True:
            try:
                await self.check_all()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop health checking for good
                log.exception("health check round failed")
            await asyncio.sleep(interval)
