"""Checks of a compiled plan against the live clouds (`gpufleet plan FILE --live`).

    check_plan(plan, adapters, catalog=None) -> list[LiveFinding]

For each AWS/GCP pool: is the machine type offered in the pool's region and in each of its
zones; is the GPU quota of the region at least what the pool needs at `max_nodes` (and is that
much of it free); for spot pools, is the live spot price far from the catalog's. A check that
cannot run (no credentials, quota API unavailable, prices not offered by the cloud) becomes a
finding too, never a crash, so the user sees what was and was not verified.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from gpufleet.provider_adapters import base, errors

if TYPE_CHECKING:
    from gpufleet.infra.plan import Plan

__all__ = ["SPOT_PRICE_TOLERANCE", "LiveFinding", "adapters_for_plan", "check_plan"]

# Spot prices move; a live price outside [catalog / 1.5, catalog * 1.5] is worth a warning.
SPOT_PRICE_TOLERANCE = 0.5

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class LiveFinding:
    """One result of a live check, about one pool."""

    severity: Severity
    pool: str
    check: Literal["offered", "zone", "quota", "spot_price", "unchecked"]
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.pool}: {self.message}"


def _as_dict(plan: Plan | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(plan, Mapping):
        return plan
    return plan.to_json_dict()


class _Cache:
    """Per-(cloud, region) answers, so pools sharing a region ask once; errors are kept as answers."""

    def __init__(self, adapters: Mapping[str, base.ProviderAdapter]) -> None:
        self.adapters = adapters
        self._answers: dict[tuple[str, str, str], Any] = {}

    def _ask(self, verb: str, cloud: str, region: str) -> Any:
        key = (verb, cloud, region)
        if key not in self._answers:
            try:
                self._answers[key] = getattr(self.adapters[cloud], verb)(region)
            except errors.AdapterError as exc:
                self._answers[key] = exc
        return self._answers[key]

    def offerings(self, cloud: str, region: str) -> list[base.GpuOffering] | errors.AdapterError:
        return self._ask("offerings", cloud, region)  # type: ignore[no-any-return]

    def quotas(self, cloud: str, region: str) -> list[base.QuotaInfo] | errors.AdapterError:
        return self._ask("quotas", cloud, region)  # type: ignore[no-any-return]


def _quota_for(
    pool: Mapping[str, Any], offering: base.GpuOffering, quotas: list[base.QuotaInfo]
) -> tuple[base.QuotaInfo | None, float]:
    """The quota that caps this pool and the units it needs at max_nodes."""
    spot = pool.get("capacity_type") == "spot"
    max_nodes = int(pool["max_nodes"])
    if offering.cloud == "aws":
        from gpufleet.provider_adapters import aws

        code = aws.gpu_quota_code(offering.machine_type, spot=spot)
        match = next((q for q in quotas if q.name == code), None)
        return match, float(max_nodes * offering.vcpus)
    match = next((q for q in quotas if q.spot == spot and offering.gpu_model in q.applies_to), None)
    return match, float(max_nodes * offering.gpu_count)


def _check_pool(pool: Mapping[str, Any], cache: _Cache, catalog: Any, tolerance: float) -> list[LiveFinding]:
    name, cloud, region, machine = pool["name"], pool["cloud"], pool.get("region") or "", pool["instance_type"]
    out: list[LiveFinding] = []
    offerings = cache.offerings(cloud, region)
    if isinstance(offerings, errors.AdapterError):
        return [LiveFinding("warning", name, "unchecked", f"could not list {cloud} offerings in {region}: {offerings}")]
    offering = next((o for o in offerings if o.machine_type == machine), None)
    if offering is None:
        same_gpu = sorted({o.machine_type for o in offerings if o.gpu_model == pool.get("gpu")})
        hint = f"; {pool.get('gpu')} machines offered there: {', '.join(same_gpu)}" if same_gpu else ""
        return [LiveFinding("error", name, "offered", f"{machine} is not offered in {cloud} {region}{hint}")]
    missing = [z for z in pool.get("zones") or [] if z not in offering.zones]
    if missing:
        out.append(
            LiveFinding(
                "error",
                name,
                "zone",
                f"{machine} is not offered in zone(s) {', '.join(missing)} "
                f"(offered in {', '.join(offering.zones) or 'no zone'})",
            )
        )

    quotas = cache.quotas(cloud, region)
    if isinstance(quotas, errors.AdapterError):
        out.append(LiveFinding("warning", name, "unchecked", f"could not read {cloud} quotas in {region}: {quotas}"))
    else:
        quota, needed = _quota_for(pool, offering, quotas)
        if quota is None:
            out.append(LiveFinding("warning", name, "unchecked", f"no {cloud} quota found for {machine} in {region}"))
        elif quota.limit < needed:
            out.append(
                LiveFinding(
                    "error",
                    name,
                    "quota",
                    f"quota {quota.name} in {region} is {quota.limit:g} {quota.unit}s; max_nodes "
                    f"{pool['max_nodes']} x {machine} needs {needed:g}",
                )
            )
        elif quota.headroom is not None and quota.headroom < needed:
            out.append(
                LiveFinding(
                    "warning",
                    name,
                    "quota",
                    f"quota {quota.name} in {region}: {quota.headroom:g} of {quota.limit:g} "
                    f"{quota.unit}s free; max_nodes needs {needed:g}",
                )
            )

    if pool.get("capacity_type") == "spot":
        out.extend(_check_spot(pool, cache, catalog, tolerance))
    return out


def _check_spot(pool: Mapping[str, Any], cache: _Cache, catalog: Any, tolerance: float) -> list[LiveFinding]:
    name, cloud, region, machine = pool["name"], pool["cloud"], pool.get("region") or "", pool["instance_type"]
    entry = catalog.machine(cloud, machine) if catalog is not None else None
    reference = getattr(entry, "spot_usd_per_hour", None)
    if reference is None:
        return [LiveFinding("info", name, "unchecked", f"no catalog spot price for {machine} to compare with")]
    try:
        quotes = cache.adapters[cloud].prices(region, [machine])
    except errors.Unsupported as exc:
        return [LiveFinding("info", name, "unchecked", f"live spot price not checked: {exc.message}")]
    except errors.AdapterError as exc:
        return [LiveFinding("warning", name, "unchecked", f"could not read spot prices: {exc}")]
    zones = set(pool.get("zones") or [])
    live = [q.spot_usd_per_h for q in quotes if q.spot_usd_per_h is not None and (not zones or q.zone in zones)]
    if not live:
        return [LiveFinding("warning", name, "spot_price", f"no live spot price for {machine} in {region}")]
    median = statistics.median(live)
    low, high = reference / (1 + tolerance), reference * (1 + tolerance)
    if not low <= median <= high:
        return [
            LiveFinding(
                "warning",
                name,
                "spot_price",
                f"live spot price of {machine} in {region} is ${median:.4g}/h, catalog says "
                f"${reference:.4g}/h: costs in this plan are off (refresh with `gpufleet catalog "
                f"refresh --cloud {cloud}`)",
            )
        ]
    return []


def check_plan(
    plan: Plan | Mapping[str, Any],
    adapters: Mapping[str, base.ProviderAdapter],
    catalog: Any = None,
    *,
    spot_tolerance: float = SPOT_PRICE_TOLERANCE,
) -> list[LiveFinding]:
    """Check every pool of `plan` whose cloud has an adapter in `adapters` ({"aws": ..., "gcp": ...}).

    `plan` is a `gpufleet.infra.plan.Plan` or its JSON dict; `catalog` (a
    `gpufleet.infra.catalog.Catalog`, default: the bundled one) is what spot prices are compared to.
    Findings come in plan order; errors mean the plan cannot be applied as written.
    """
    if catalog is None:
        from gpufleet.infra import catalog as catalog_mod

        catalog = catalog_mod.load()
    cache = _Cache(adapters)
    findings: list[LiveFinding] = []
    for pool in _as_dict(plan)["pools"]:
        if pool["cloud"] in adapters:
            findings.extend(_check_pool(pool, cache, catalog, spot_tolerance))
    return findings


def adapters_for_plan(plan: Plan | Mapping[str, Any]) -> dict[str, base.ProviderAdapter]:
    """Adapters for the clouds the plan's pools use (`aws`, and `gcp` with the plan's project),
    with the environment's credentials. Raises `errors.AdapterError` (e.g. `SdkMissing`)."""
    from gpufleet.provider_adapters import discovery

    data = _as_dict(plan)
    used = {p["cloud"] for p in data["pools"]}
    clouds = data.get("clouds") or {}
    out: dict[str, base.ProviderAdapter] = {}
    if "aws" in used:
        out["aws"] = discovery.connect("aws")
    if "gcp" in used:
        out["gcp"] = discovery.connect("gcp", project=(clouds.get("gcp") or {}).get("project"))
    return out
