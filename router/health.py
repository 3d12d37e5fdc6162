"""Replica health: failure classification, outlier ejection, active checks, backoff, re-admission.

Failures are classified once, here (`Failure`, `classify_status`):

- a *replica* failure: could not connect, connection reset or closed before an answer, a
  timeout or a passed first-byte deadline, a response that is not HTTP, or 502/503/504 (the
  replica is down, overloaded or a gateway in front of it failed). The attempt is retried on
  another replica (before the first byte reached the client) and counts toward ejection.
- a *request* failure: the engine answered an error for this input (4xx, 500 and any other 5xx).
  It is the client's answer: passed through, never retried, never held against the replica,
  which has just shown it is alive. One bad request cannot eject healthy replicas.
- 429 (the replica is busy) is retried elsewhere but is no fault of the replica.

Ejection works like Envoy's outlier detection:

- *consecutive replica failures*: `health.eject_after_failures` in a row (any answer resets it);
- *success-rate outliers*: every `outlier_interval_s`, replicas of a model with at least
  `success_rate_min_requests` attempts (and at least `success_rate_min_replicas` such replicas)
  whose rate of replica failures puts them `success_rate_stdev_factor` standard deviations below
  the mean are ejected;
- *failure percentage*: a replica whose share of 5xx answers of any cause reaches
  `failure_percentage_threshold` (an engine that fails every input) is ejected;
- all three are capped: at most `max_ejection_percent` of a model's replicas (at least one, when
  it has two or more) are held ejected by outlier detection at once, so a fault that looks like
  every replica's (or a flood of poison) cannot empty the pool;
- a failed *active check* (`GET /health`) ejects regardless of the cap: it is a direct
  observation, not an inference. A replica failure makes a replica *suspect* (routed to only when
  nothing else is available) and triggers an immediate check, so a hung or dead replica is out
  within one check timeout.

An ejected replica is re-admitted only by an active check that passes after its backoff; each
ejection that follows a re-admission without an intervening success doubles the backoff, up to
`health.backoff_max_s`. Every ejection is logged with its reason. The bookkeeping here is pure
(time is passed in), so it is unit-tested without a network; `HealthChecker` does the I/O.

With `health.scrape_kv_usage`, each check that passes also reads the replica's KV-cache usage
from its Prometheus `/metrics` (`parse_kv_usage`) into `ReplicaState.kv_usage`: a sample per
interval, stale in between, which is exactly what the simulator gives policies too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from gpufleet.router.config import HealthSettings
from gpufleet.router.types import ReplicaState

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "KV_USAGE_METRICS",
    "Failure",
    "HealthChecker",
    "HealthTracker",
    "classify_status",
    "parse_kv_usage",
]

log = logging.getLogger("gpufleet.router.health")


class Failure(str, Enum):
    """Why an attempt on a replica failed: the one classification every caller uses."""

    CONNECT = "connect"
    """Could not connect (refused, unreachable, connect timeout)."""
    RESET = "reset"
    """The connection was reset or closed before a complete answer."""
    TIMEOUT = "timeout"
    """The request timeout passed."""
    FIRST_BYTE = "first_byte_deadline"
    """Nothing came back within the attempt's first-byte deadline."""
    PROTOCOL = "protocol"
    """The answer was not HTTP/1.x."""
    GATEWAY = "gateway"
    """502, 503 or 504: the replica (or a gateway in front of it) is down or overloaded."""
    BUSY = "busy"
    """429: the replica is at capacity right now. Retried elsewhere; no fault of the replica."""
    REQUEST = "request"
    """The engine answered an error for this input: the client's answer, not the replica's fault."""

    @property
    def replica_fault(self) -> bool:
        """True when it counts toward the replica's ejection."""
        return self not in (Failure.BUSY, Failure.REQUEST)

    @property
    def retryable(self) -> bool:
        """True when another replica may answer it (before any byte reached the client)."""
        return self is not Failure.REQUEST


def classify_status(status: int) -> Failure | None:
    """The failure an HTTP status from a replica means, or None for a success (< 400)."""
    if status < 400:
        return None
    if status in (502, 503, 504):
        return Failure.GATEWAY
    if status == 429:
        return Failure.BUSY
    return Failure.REQUEST


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


class HealthChecker:
    """Runs `GET {url}/health` on every replica every `interval_s` (the only I/O of this module).

    A suspect replica is checked at once (`probe_soon`), outside the regular round.
    """

    def __init__(
        self, tracker: HealthTracker, replicas: Sequence[ReplicaState], session: aiohttp.ClientSession
    ) -> None:
        self.tracker = tracker
        self.replicas = replicas
        self.session = session
        self._probes: dict[str, asyncio.Task[bool]] = {}

    async def check(self, replica: ReplicaState) -> bool:
        """One check of one replica; updates the tracker. True when the replica answered 2xx."""
        import aiohttp

        s = self.tracker.settings
        detail = ""
        try:
            async with self.session.get(
                replica.url.rstrip("/") + "/health", timeout=aiohttp.ClientTimeout(total=s.timeout_s)
            ) as resp:
                ok: bool = 200 <= resp.status < 300
                detail = f"HTTP {resp.status}"
        except TimeoutError:
            ok, detail = False, f"no answer in {s.timeout_s:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            ok, detail = False, type(exc).__name__
        if ok:
            self.tracker.check_passed(replica)
            if s.scrape_kv_usage:
                await self.scrape_kv_usage(replica)
        else:
            self.tracker.check_failed(replica, detail)
        return ok

    def probe_soon(self, replica: ReplicaState) -> None:
        """Check `replica` now, once at a time (the tracker calls it for a suspect replica)."""
        if replica.id in self._probes:
            return
        try:
            task = asyncio.get_running_loop().create_task(self.check(replica))
        except RuntimeError:  # no loop (a unit test driving the tracker by hand)
            return
        self._probes[replica.id] = task
        rid = replica.id

        def done(_: asyncio.Task[bool]) -> None:
            self._probes.pop(rid, None)

        task.add_done_callback(done)

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
        """Check forever, every `interval_s`, and close the outlier window every `outlier_interval_s`;
        cancelled by the app's cleanup."""
        s = self.tracker.settings
        loop = asyncio.get_running_loop()
        next_window = loop.time() + s.outlier_interval_s
        try:
            while True:
                try:
                    await self.check_all()
                    if loop.time() >= next_window:
                        self.tracker.evaluate()
                        next_window = loop.time() + s.outlier_interval_s
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug here must not stop health checking for good
                    log.exception("health check round failed")
                await asyncio.sleep(min(s.interval_s, max(0.0, next_window - loop.time()) or s.interval_s))
        finally:
            for task in list(self._probes.values()):
                task.cancel()
