"""The two forms of a request every workload comes in, and a workload itself.

A `WorkRequest` is what a client sends: a path and a chat (or completions) body, with the session
id and the ordering it must keep. A `SimRequest` is the same request as the router sees it at its
arrival time: the features its policies read (built by the router's own `features_from_body`),
the output length, and the body only when asked for (live benchmarks send it). A `Workload` is a
named, seeded list of `SimRequest` in arrival order; `Workload.work_requests` renders it back as
`WorkRequest`s for the HTTP driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from gpufleet.router.types import RequestFeatures

__all__ = ["MODEL", "SimRequest", "WorkRequest", "Workload"]

MODEL = "sim-model"
"""Model name the simulator's requests and replicas carry (one deployment is simulated)."""


@dataclass(frozen=True)
class WorkRequest:
    """One request to send: the path, the JSON body and how it must be ordered."""

    index: int
    kind: str
    """system | rag | chat for the demo's traffic; the workload's name for a rendered `Workload`."""
    model: str
    body: dict[str, Any]
    path: str = "/v1/chat/completions"
    session_id: str | None = None
    chain: str | None = None
    """Requests with the same chain are sent one after the other, in index order."""


@dataclass(slots=True)
class SimRequest:
    """One request of a workload: when it arrives, what the router sees, how much it generates."""

    id: str
    arrival_s: float
    features: RequestFeatures
    output_tokens: int
    body: dict[str, Any] | None = None
    """The chat body (kept only when asked: live benchmarks send it over HTTP)."""


@dataclass
class Workload:
    """A named, seeded list of requests in arrival order."""

    name: str
    requests: list[SimRequest]
    params: dict[str, Any] = field(default_factory=dict)
    preload: tuple[RequestFeatures, ...] = ()
    """Prompts every replica served, through the router, before the first arrival: their KV blocks
    are cached on every replica when the workload starts, and the policy saw them routed there."""

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def span_s(self) -> float:
        """Time from the first to the last arrival (at least 1 ms, so rates stay finite)."""
        if not self.requests:
            return 0.0
        return max(1e-3, self.requests[-1].arrival_s - self.requests[0].arrival_s)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of every request together (as the router estimates them)."""
        return sum(r.features.prompt_tokens for r in self.requests)

    def scaled(self, factor: float) -> Workload:
        """The same requests with arrival times multiplied by `factor` (< 1: faster arrivals)."""
        if factor <= 0:
            raise ValueError("time scale factor must be positive")
        t0 = self.requests[0].arrival_s if self.requests else 0.0
        reqs = [replace(r, arrival_s=t0 + (r.arrival_s - t0) * factor) for r in self.requests]
        return Workload(self.name, reqs, {**self.params, "time_scale": factor}, self.preload)

    def head(self, n: int) -> Workload:
        """The first `n` requests."""
        return Workload(self.name, self.requests[:n], dict(self.params), self.preload)

    def work_requests(self) -> list[WorkRequest]:
        """The requests as the HTTP driver sends them (needs bodies: build with `keep_bodies=True`).

        Chat bodies go to `/v1/chat/completions`, prompt bodies (trace replay) to `/v1/completions`;
        no request waits for another (every one is sent at its own arrival time).
        """
        out: list[WorkRequest] = []
        for i, r in enumerate(self.requests):
            if r.body is None:
                raise ValueError("live runs need request bodies: build the workload with keep_bodies=True")
            path = "/v1/chat/completions" if "messages" in r.body else "/v1/completions"
            out.append(WorkRequest(i, self.name, r.features.model, r.body, path, r.features.session_id))
        return out
