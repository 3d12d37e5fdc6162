"""Engine-reported load: each replica's `/metrics` read every `engine_metrics_interval_s`.

The router's own accounting (`ReplicaState.in_flight`, `queued_prefill_tokens`) is exact for the
requests it sent and has no lag, but it cannot see what other router replicas (or clients that
bypass the router) send. The engines can: every `engine_metrics_interval_s` (default 0.25 s)
the scraper reads the gauges below from each healthy replica's Prometheus `/metrics`, parsed with
prometheus_client's text parser, and records them with the router's own counts at that moment
(`ReplicaState.report_engine_load`); the `ttft` scorer takes the difference as other routers'
load (`ReplicaState.foreign_load`).

    waiting requests   vllm:num_requests_waiting    sglang:num_queue_reqs
    running requests   vllm:num_requests_running    sglang:num_running_reqs
    KV-cache usage     vllm:kv_cache_usage_perc     sglang:token_usage       (vLLM v0: vllm:gpu_cache_usage_perc)

The names are the engines' own (vLLM `vllm/v1/metrics/loggers.py`, SGLang
`sglang/srt/metrics/collector.py`); `gpufleet replica-sim` exports the vLLM ones. Several series
of one name (a data-parallel server's engines) are summed (usage: averaged). Only the lines of
these gauges are parsed, so a replica's large histogram output costs no parsing.

Every read is bounded (`engine_metrics_timeout_s`); each replica is read by its own task, so a
slow replica delays only its own samples, and a replica whose previous read is still running is
skipped that round. A failed read or a page without these gauges keeps the last sample (it ages
out in the scorer) and is counted in `gpufleet_router_engine_metrics_scrapes_total`: it is a
routing hint, not a health signal, so it never ejects anyone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from gpufleet.router.types import ReplicaState

if TYPE_CHECKING:
    import aiohttp

__all__ = ["KV_USAGE", "RUNNING", "WAITING", "EngineLoad", "EngineLoadScraper", "parse_engine_load", "run_rounds"]

log = logging.getLogger("gpufleet.router.engine_load")

WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
_NAMES = (*WAITING, *RUNNING, *KV_USAGE)


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One replica's load as its engine reported it."""

    waiting: int
    running: int
    kv_usage: float | None


def _wanted(line: str) -> bool:
    if line.startswith("#"):
        parts = line.split(None, 3)
        return len(parts) >= 3 and parts[1] in ("TYPE", "HELP") and parts[2] in _NAMES
    for name in _NAMES:
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            return True
    return False


def parse_engine_load(text: str) -> EngineLoad | None:
    """The load gauges (module docs) from a Prometheus text exposition; None when it has neither
    a waiting nor a running gauge, or the lines of these gauges do not parse."""
    lines = [ln for ln in text.splitlines() if _wanted(ln)]
    values: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families("\n".join(lines) + "\n"):
            for sample in family.samples:
                v = sample.value
                if v == v and sample.name in _NAMES:  # not NaN
                    values.setdefault(sample.name, []).append(v)
    except (ValueError, IndexError, TypeError):
        return None

    def first(names: tuple[str, ...]) -> list[float] | None:
        return next((values[n] for n in names if n in values), None)

    waiting, running, usage = first(WAITING), first(RUNNING), first(KV_USAGE)
    if waiting is None and running is None:
        return None
    return EngineLoad(
        waiting=max(0, round(sum(waiting or ()))),
        running=max(0, round(sum(running or ()))),
        kv_usage=None if not usage else min(1.0, max(0.0, sum(usage) / len(usage))),
    )


class EngineLoadScraper:
    """Reads every healthy replica's engine load every interval (the only I/O of this module)."""

    def __init__(
        self,
        replicas: Callable[[], Iterable[ReplicaState]],
        session: aiohttp.ClientSession,
        *,
        interval_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_result: Callable[[ReplicaState, str], None] | None = None,
    ) -> None:
        """`replicas` is called every round (membership may change); `on_result(replica, result)`
        sees each read's result: ok, failed or no_load_metrics."""
        self.replicas = replicas
        self.session = session
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.on_result = on_result

    async def scrape(self, replica: ReplicaState) -> EngineLoad | None:
        """Read one replica's `/metrics` into its state; None when the read or the page fails."""
        import aiohttp

        result = "failed"
        load = None
        try:
            async with self.session.get(
                replica.url.rstrip("/") + "/metrics", timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            ) as resp:
                if resp.status == 200:
                    text = await resp.text()
                    load = parse_engine_load(text)
                    result = "ok" if load is not None else "no_load_metrics"
        except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
            pass
        if load is not None:
            replica.report_engine_load(load.waiting, load.running, load.kv_usage, self.clock())
        if self.on_result is not None:
            self.on_result(replica, result)
        return load

    async def run(self) -> None:
        """Scrape forever, one task per replica per round; cancelled by the app's cleanup."""

        async def round_(running: dict[str, asyncio.Task[Any]]) -> None:
            for r in self.replicas():
                task = running.get(r.id)
                if r.healthy and (task is None or task.done()):
                    running[r.id] = asyncio.create_task(self.scrape(r))

        await run_rounds(round_, self.interval_s, "engine-load scrape")


async def run_rounds(
    round_: Callable[[dict[str, asyncio.Task[Any]]], Awaitable[None]], interval_s: float, what: str
) -> None:
    """Await `round_(running)` every `interval_s` forever: it starts one task per key in `running`
    (a key whose task still runs is skipped); a failed round is logged and the next one runs. On
    cancellation (the app's cleanup) every task is cancelled and awaited."""
    running: dict[str, asyncio.Task[Any]] = {}
    try:
        while True:
            try:
                await round_(running)
            except Exception:  # a bug here must not stop the rounds for good
                log.exception("%s round failed", what)
            await asyncio.sleep(interval_s)
    finally:
        for task in running.values():
            task.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)
