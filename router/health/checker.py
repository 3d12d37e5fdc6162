"""`HealthChecker`: the active checks (`GET /health`), the only I/O of replica health.

Every replica is checked every `interval_s`; a suspect one at once (`probe_soon`, called by the
tracker). The outlier-detection window is closed every `outlier_interval_s` from here. With
`health.scrape_kv_usage`, a passed check also reads the replica's KV-cache usage from its
Prometheus `/metrics` (`parse_kv_usage`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gpufleet.router.health.tracker import HealthTracker
from gpufleet.router.types import ReplicaState

if TYPE_CHECKING:
    import aiohttp

__all__ = ["KV_USAGE_METRICS", "HealthChecker", "parse_kv_usage"]

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
