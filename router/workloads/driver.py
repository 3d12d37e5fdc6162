"""The HTTP driver: replays `WorkRequest`s against an OpenAI-compatible endpoint, streaming.

`drive` sends requests either as a closed loop (a fixed number in flight), open loop (Poisson
arrivals at `rate_per_s`, the way users arrive, with the concurrency as a cap only) or at given
times (`send_at`, a workload's own arrival times), and records per request (`Result`) the replica
that served it (`x-gpufleet-replica`), the prediction-cache outcome (`x-gpufleet-cache`), the
prompt and cached tokens the replica reported (`usage.prompt_tokens_details.cached_tokens`), time
to first token and latency. `gpufleet.router.workloads.stats` turns results into numbers. Used by
`gpufleet demo`, `gpufleet bench live` and the benchmarks.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpufleet.router.workloads.sampling import arrival_times
from gpufleet.router.workloads.types import WorkRequest

__all__ = ["Result", "drive"]


@dataclass
class Result:
    """What happened to one request."""

    index: int
    kind: str
    model: str
    status: int = 0
    replica: str | None = None
    cache: str | None = None
    """The router's prediction-cache outcome: hit, miss, bypass (None when not reported)."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0
    error: str | None = None
    sent_s: float = 0.0
    """When it was sent, in seconds since `drive` started (the order replicas can have seen prompts)."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and self.error is None


async def _one(session: Any, base_url: str, req: WorkRequest, headers: Mapping[str, str], timeout_s: float) -> Result:
    import aiohttp

    res = Result(index=req.index, kind=req.kind, model=req.model)
    body = dict(req.body, stream=True, stream_options={"include_usage": True})
    hdrs = dict(headers)
    if req.session_id:
        hdrs["x-session-id"] = req.session_id
    t0 = time.perf_counter()
    try:
        async with session.post(
            base_url + req.path, json=body, headers=hdrs, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            res.status = resp.status
            res.replica = resp.headers.get("x-gpufleet-replica")
            res.cache = resp.headers.get("x-gpufleet-cache")
            if resp.status >= 400:
                raw = await resp.read()
                res.error = raw[:200].decode(errors="replace")
            else:
                async for raw_line in resp.content:
                    line = raw_line.strip()
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    try:
                        chunk = json.loads(line[6:])
                    except json.JSONDecodeError:
                        continue
                    if res.ttft_s is None and _has_content(chunk):
                        res.ttft_s = time.perf_counter() - t0
                    usage = chunk.get("usage")
                    if isinstance(usage, dict):
                        res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        details = usage.get("prompt_tokens_details") or {}
                        res.cached_tokens = int(details.get("cached_tokens") or 0)
    except (TimeoutError, aiohttp.ClientError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.latency_s = time.perf_counter() - t0
    return res


def _has_content(chunk: Mapping[str, Any]) -> bool:
    for ch in chunk.get("choices") or ():
        delta = ch.get("delta") or {}
        if delta.get("content") or ch.get("text"):
            return True
    return False


async def drive(
    base_url: str,
    requests: Sequence[WorkRequest],
    *,
    concurrency: int = 16,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
    on_result: Callable[[Result], None] | None = None,
    rate_per_s: float | None = None,
    arrival_seed: int = 0,
    send_at: Mapping[int, float] | None = None,
) -> list[Result]:
    """Send `requests` (streaming) with at most `concurrency` in flight; chains run in order.

    Without `rate_per_s` it is a closed loop: the next request goes as soon as one finishes. With
    it, an open loop: request i is due at the i-th arrival of a Poisson process of that rate
    (seeded by `arrival_seed`), as users arrive whether or not the fleet keeps up; a chain's next
    turn goes at its due time or when the previous turn finished, whichever is later (a user
    reads the answer before replying). `concurrency` then only caps what is in flight. `send_at`
    (request index -> seconds from the start) gives the due times instead, e.g. a workload's
    arrival times.
    """
    import aiohttp

    if rate_per_s is not None and send_at is not None:
        raise ValueError("give rate_per_s or send_at, not both")
    due: dict[int, float] = dict(send_at or {})
    if rate_per_s is not None:
        ordered_idx = sorted(r.index for r in requests)
        due = dict(zip(ordered_idx, arrival_times(len(ordered_idx), rate_per_s, arrival_seed)))
    base_url = base_url.rstrip("/")
    sem = asyncio.Semaphore(max(1, concurrency))
    hdrs = dict(headers or {})
    units: dict[str, list[WorkRequest]] = {}
    singles: list[WorkRequest] = []
    for r in requests:
        if r.chain:
            units.setdefault(r.chain, []).append(r)
        else:
            singles.append(r)
    results: list[Result] = []
    # aiohttp rather than httpx: the driver must not be the bottleneck of what it measures
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def run(chain: Sequence[WorkRequest]) -> None:
            for r in chain:
                if due:
                    wait = t0 + due[r.index] - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                async with sem:
                    sent = loop.time() - t0
                    res = await _one(client, base_url, r, hdrs, timeout_s)
                    res.sent_s = sent
                results.append(res)
                if on_result is not None:
                    on_result(res)

        # start units in the order of their first request, so the replay follows the generated order
        ordered = sorted([[r] for r in singles] + list(units.values()), key=lambda u: u[0].index)
        await asyncio.gather(*(run(u) for u in ordered))
    results.sort(key=lambda r: r.index)
    return results
