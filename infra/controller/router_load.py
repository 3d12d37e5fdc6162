"""The routers' load, read from every router pod and added up (one controller, N routers).

Each router pod counts only the requests it sent itself (router/metrics.py), and a scrape through
the router's Service reaches one pod. So the controller finds the pods and reads each one:

    routers()   pod name -> /metrics URL: the ready endpoints of the router Service's
                EndpointSlices (`KubernetesAdapter.service_endpoints`, `discovery.k8s.io/v1`), or
                one fixed URL (`--router-metrics`: a router outside the cluster, or a test)
    scrape      all pods at once, each bounded by `timeout_s`. A pod that fails is logged, counted
                (`gpufleet_controller_router_scrapes_total{router,result}`) and left out: the
                read is then *partial*, and the decision does not scale down on it (a partial sum
                can prove load, never its absence). No pod answered: no read; counts hold.
    combine     per replica: `gpufleet_router_in_flight` and `gpufleet_router_queued_prefill_tokens`
                summed over the pods; the `gpufleet_router_time_to_first_token_seconds` histograms'
                buckets summed over the pods as *increases over the window* (`window_s`; a
                bucket that went down is a restarted router, whose counts since its start are
                the increase; a pod's first read has no baseline and adds nothing yet)
    samples     per deployment with `autoscaling:`, its signal over its replicas
                (`<deployment>-<pool>-<i>`, infra/names.py): the in-flight or queued total, or the
                p90 of the merged histogram, interpolated as Prometheus' `histogram_quantile` does

TTFT is measured by the routers on streamed requests (first SSE chunk). With no first token in the
window a deployment is idle (`value=None`: the decision may scale it down) unless requests are in
flight, which then hold the count rather than pass for idle.
"""

from __future__ import annotations

import logging
import math
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from gpufleet.infra import names
from gpufleet.infra.controller import autoscale
from gpufleet.router.upstream.request import url_host

__all__ = [
    "RouterLoad",
    "RouterLoadReader",
    "RouterScrape",
    "histogram_quantile",
    "parse_router_metrics",
    "samples",
    "service_routers",
    "static_router",
]

log = logging.getLogger("gpufleet.controller.routers")

IN_FLIGHT = "gpufleet_router_in_flight"
QUEUED_PREFILL = "gpufleet_router_queued_prefill_tokens"
TTFT = "gpufleet_router_time_to_first_token_seconds"

Buckets = dict[float, float]
"""A histogram's cumulative bucket counts by upper bound `le` (the +Inf bucket is the total)."""


@dataclass(frozen=True)
class RouterScrape:
    """What one router pod's /metrics says, per replica."""

    in_flight: dict[str, float]
    queued_prefill_tokens: dict[str, float]
    ttft: dict[str, Buckets]


_NAMES = frozenset(
    (IN_FLIGHT, QUEUED_PREFILL, TTFT, *(TTFT + suffix for suffix in ("_bucket", "_sum", "_count", "_created")))
)


def _wanted_lines(text: str) -> str:
    """Only the families read here: the text format is one sample (or HELP/TYPE) per line, and a
    router exports dozens of other series per replica that would cost most of the parse."""
    keep = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(" ", 3)
            name = parts[2] if len(parts) > 2 else ""
        else:
            name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in _NAMES:
            keep.append(line)
    return "\n".join(keep) + "\n"


def parse_router_metrics(text: str) -> RouterScrape:
    """The autoscaling signals of one router's Prometheus text exposition. Raises ValueError."""
    from prometheus_client.parser import text_string_to_metric_families

    in_flight: dict[str, float] = {}
    queued: dict[str, float] = {}
    ttft: dict[str, Buckets] = {}
    for family in text_string_to_metric_families(_wanted_lines(text)):
        if family.name in (IN_FLIGHT, QUEUED_PREFILL):
            into = in_flight if family.name == IN_FLIGHT else queued
            for s in family.samples:
                into[s.labels.get("replica", "")] = s.value
        elif family.name == TTFT:
            for s in family.samples:
                if s.name == TTFT + "_bucket":
                    ttft.setdefault(s.labels.get("replica", ""), {})[float(s.labels["le"])] = s.value
    return RouterScrape(in_flight, queued, ttft)


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The q-quantile of cumulative buckets, by linear interpolation inside the bucket it falls in
    (Prometheus' `histogram_quantile`): in the +Inf bucket, the highest finite bound. None: empty."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]) or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    below_bound, below_count = 0.0, 0.0
    for i, le in enumerate(bounds):
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return bounds[i - 1] if i > 0 else None
            if count == below_count:
                return le
            return below_bound + (le - below_bound) * (rank - below_count) / (count - below_count)
        below_bound, below_count = le, count
    return None


@dataclass(frozen=True)
class RouterLoad:
    """One round's read of the routers, per replica and summed over the pods that answered."""

    observed_at_s: float
    in_flight: dict[str, float]
    queued_prefill_tokens: dict[str, float]
    ttft: dict[str, Buckets] | None
    """Bucket increases over the window; None until a second read gives one a baseline."""
    answered: tuple[str, ...]
    failed: tuple[str, ...]

    @property
    def partial(self) -> bool:
        """Some router pods did not answer: sums are lower bounds."""
        return bool(self.failed)


def _add(into: dict[str, float], more: Mapping[str, float]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0.0) + v


def _increase(now: Buckets, base: Buckets | None) -> Buckets:
    if base is None or any(now.get(le, 0.0) < c for le, c in base.items()):
        return dict(now)  # new since the baseline, or the router restarted (counters reset)
    return {le: c - base.get(le, 0.0) for le, c in now.items()}


def _fetch(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return bytes(response.read()).decode()


def static_router(url: str) -> Callable[[], dict[str, str]]:
    """One fixed router /metrics URL (named by itself)."""
    return lambda: {url: url}


def service_routers(kube: Any, service: str, *, port_name: str = "http") -> Callable[[], dict[str, str]]:
    """The router pods behind `service`, from its EndpointSlices, each as its /metrics URL."""

    def routers() -> dict[str, str]:
        found = kube.service_endpoints(service, port_name)
        return {pod: f"http://{url_host(addr)}:{port}/metrics" for pod, (addr, port) in sorted(found.items())}

    return routers


class RouterLoadReader:
    """Reads every router pod once per round (module docs); `last` is the latest read."""

    def __init__(
        self,
        routers: Callable[[], Mapping[str, str]],
        *,
        timeout_s: float = 2.0,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        fetch: Callable[[str, float], str] = _fetch,
        metrics: Any = None,
    ) -> None:
        """`metrics`: a `runtime.ControllerMetrics` (router_scrapes, routers) or None."""
        self.routers = routers
        self.timeout_s = timeout_s
        self.window_s = window_s
        self.clock = clock
        self.fetch = fetch
        self.metrics = metrics
        self.last: RouterLoad | None = None
        self.errors: list[tuple[str, str]] = []
        self._history: dict[str, deque[tuple[float, dict[str, Buckets]]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="router-scrape")

    def _scrape(self, url: str) -> RouterScrape | str:
        try:
            return parse_router_metrics(self.fetch(url, self.timeout_s))
        except (OSError, ValueError, KeyError) as exc:
            return str(exc) or type(exc).__name__

    def _baseline(self, pod: str, now: float) -> dict[str, Buckets] | None:
        hist = self._history.get(pod)
        if not hist:
            return None
        older = [h for h in hist if h[0] <= now - self.window_s]
        return (older[-1] if older else hist[0])[1]

    def _remember(self, pod: str, now: float, ttft: dict[str, Buckets]) -> None:
        hist = self._history.setdefault(pod, deque())
        hist.append((now, ttft))
        while len(hist) > 1 and hist[1][0] <= now - self.window_s:
            hist.popleft()  # the newest entry at or before the window's start stays the baseline

    def _count(self, pod: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.router_scrapes.labels(pod, result).inc()

    def read(self) -> RouterLoad | None:
        """Scrape every router pod now; None when none could be read (logged, counted)."""
        self.errors = []
        self.last = None
        try:
            targets = dict(self.routers())
        except Exception as exc:  # an API error, a missing Service: no read this round, counts hold
            self.errors.append(("routers", f"cannot list the router pods: {exc}"))
            log.warning("cannot list the router pods: %s", exc)
            self._count("(discovery)", "failed")
            return None
        if not targets:
            self.errors.append(("routers", "no ready router pod"))
            log.warning("no ready router pod to read load from")
            return None
        now = self.clock()
        results = dict(zip(targets, self._pool.map(self._scrape, targets.values())))
        in_flight: dict[str, float] = {}
        queued: dict[str, float] = {}
        ttft: dict[str, Buckets] = {}
        has_window = False
        answered, failed = [], []
        for pod, got in results.items():
            if isinstance(got, str):
                failed.append(pod)
                self.errors.append((pod, f"router metrics not read: {got}"))
                log.warning("router %s (%s): metrics not read, left out of this round: %s", pod, targets[pod], got)
                self._count(pod, "failed")
                continue
            answered.append(pod)
            self._count(pod, "ok")
            _add(in_flight, got.in_flight)
            _add(queued, got.queued_prefill_tokens)
            base = self._baseline(pod, now)
            if base is not None:
                has_window = True
                for rid, buckets in got.ttft.items():
                    merged = ttft.setdefault(rid, {})
                    for le, c in _increase(buckets, base.get(rid)).items():
                        merged[le] = merged.get(le, 0.0) + c
            self._remember(pod, now, got.ttft)
        self._history = {p: h for p, h in self._history.items() if p in targets}
        if self.metrics is not None:
            self.metrics.routers.labels("answered").set(len(answered))
            self.metrics.routers.labels("failed").set(len(failed))
        if not answered:
            return None
        self.last = RouterLoad(now, in_flight, queued, ttft if has_window else None, tuple(answered), tuple(failed))
        return self.last


def _replicas_of(dep: autoscale.ScalingFacts, ids: Iterable[str]) -> list[str]:
    prefixes = tuple(names.replica_set_name(dep.name, slot.pool) + "-" for slot in dep.chain)
    return [rid for rid in ids if rid.startswith(prefixes) and rid.rsplit("-", 1)[-1].isdigit()]


def samples(facts: autoscale.AutoscaleFacts, load: RouterLoad | None) -> dict[str, autoscale.LoadSample]:
    """Per deployment with `autoscaling:`, its signal's sample from one read (module docs)."""
    out: dict[str, autoscale.LoadSample] = {}
    if load is None:
        return out
    for dep in facts.deployments:
        a = dep.autoscaling
        if a is None:
            continue
        busy = sum(load.in_flight[r] for r in _replicas_of(dep, load.in_flight))
        value: float | None
        if a.signal == "in_flight":
            value = busy
        elif a.signal == "queued_prefill_tokens":
            value = sum(load.queued_prefill_tokens[r] for r in _replicas_of(dep, load.queued_prefill_tokens))
        else:
            if load.ttft is None:
                continue  # no window yet: hold
            merged: Buckets = {}
            for rid in _replicas_of(dep, load.ttft):
                for le, c in load.ttft[rid].items():
                    merged[le] = merged.get(le, 0.0) + c
            value = histogram_quantile(0.9, merged)
            if value is None and busy > 0:
                continue  # requests but no first token in the window: not idle, hold
        out[dep.name] = autoscale.LoadSample(load.observed_at_s, value, partial=load.partial)
    return out
