"""Failover across zones, regions and clouds, above the adapters.

    scale_with_failover([Candidate(adapter, request, machine_type), ...]) -> (ScaleResult, attempts)

Candidates are tried in order. An adapter error blocks what `errors.map_error` says it blocks
(the zone, the region or the whole cloud), so later candidates inside a blocked scope are
skipped without a call. When every candidate fails, `FailoverExhausted` lists every attempt
with its outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpufleet.provider_adapters import base, errors

__all__ = ["Attempt", "Candidate", "FailoverExhausted", "scale_with_failover"]


@dataclass(frozen=True)
class Candidate:
    adapter: base.ProviderAdapter
    request: base.ScaleRequest
    machine_type: str | None = None  # when given, checked against the region's offerings first


@dataclass(frozen=True)
class Attempt:
    cloud: str
    region: str
    zone: str | None
    target: str
    outcome: str  # "ok", "skipped: ...", or the error


class FailoverExhausted(errors.AdapterError):
    """No candidate could be scaled; `attempts` says what happened to each."""

    def __init__(self, attempts: list[Attempt]) -> None:
        self.attempts = attempts
        lines = "; ".join(
            f"{a.cloud}/{a.region}{'/' + a.zone if a.zone else ''} {a.target}: {a.outcome}" for a in attempts
        )
        super().__init__(f"every candidate failed: {lines}", cloud="any", code="FailoverExhausted", blocks="request")


def _scope_keys(cloud: str, region: str, zone: str | None) -> list[tuple[str, ...]]:
    return [(cloud,), (cloud, region), (cloud, region, zone or "")]


def scale_with_failover(candidates: Sequence[Candidate]) -> tuple[base.ScaleResult, list[Attempt]]:
    """Scale the first candidate that accepts; skip those inside a scope an earlier error blocked."""
    blocked: dict[tuple[str, ...], str] = {}
    attempts: list[Attempt] = []
    offered: dict[tuple[str, str], set[str]] = {}
    for cand in candidates:
        ref = cand.request.ref
        cloud, region, zone = ref.cloud, ref.region, ref.zone
        hit = next((blocked[k] for k in _scope_keys(cloud, region, zone) if k in blocked), None)
        if hit is not None:
            attempts.append(Attempt(cloud, region, zone, ref.target, f"skipped: {hit}"))
            continue
        try:
            if cand.machine_type:
                key = (cloud, region)
                if key not in offered:
                    offered[key] = {o.machine_type for o in cand.adapter.offerings(region)}
                if cand.machine_type not in offered[key]:
                    raise errors.NotOffered(
                        f"{cand.machine_type} is not offered in {region}",
                        cloud=cloud,
                        code="NotOffered",
                        blocks="region",
                        region=region,
                    )
            result = cand.adapter.scale_pool(cand.request)
        except errors.AdapterError as exc:
            attempts.append(Attempt(cloud, region, zone, ref.target, str(exc)))
            scope = {"cloud": (cloud,), "region": (cloud, region), "zone": (cloud, region, zone or "")}.get(exc.blocks)
            if scope is not None:
                blocked[scope] = f"{exc.blocks} blocked by {type(exc).__name__} ({exc.code})"
            continue
        attempts.append(Attempt(cloud, region, zone, ref.target, "ok"))
        return result, attempts
    raise FailoverExhausted(attempts)
