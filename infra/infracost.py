"""The plan's cost in Infracost's JSON output format (`gpufleet plan -o infracost-json`).

Infracost has no Pulumi support; writing its format lets `infracost comment github --path`,
`infracost output --format ...` and Infracost Cloud post and render a gpufleet plan like any
Terraform project. The shape follows Infracost's published schema
(`schema/infracost.schema.json` in infracost/infracost, output version 0.2): every cost is a
decimal string, every pool is a resource `gpufleet_nodepool.<pool>` with two cost components
(baseline nodes and warm nodes, unit `hours`, 730 hours a month). The totals are what the fleet
costs while idle, baseline + warm: the same number the budget gate (`--max-monthly-usd`)
checks. Peak capacity (max_nodes) is not a committed cost and is left out, as Infracost leaves
out usage it does not know.

With an earlier plan (`--compare old.json`, a `gpufleet plan -o json`), `pastBreakdown`,
`diff` and the `past*`/`diff*` totals are filled; without one they are null, as in
`infracost breakdown`.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from gpufleet.infra.plan.model import HOURS_PER_MONTH, PLAN_SCHEMA, Plan

__all__ = ["OUTPUT_VERSION", "RESOURCE_TYPE", "breakdown", "document"]

OUTPUT_VERSION = "0.2"
RESOURCE_TYPE = "gpufleet_nodepool"
_HOURS = Decimal(HOURS_PER_MONTH)


def _dec(x: Any) -> Decimal:
    return Decimal(str(x))


def _s(x: Decimal, places: str = "0.0000000001") -> str:
    """A decimal string as Infracost writes them: exact, no exponent, no trailing zeros."""
    q = x.quantize(Decimal(places), rounding=ROUND_HALF_UP).normalize()
    text = format(q, "f")
    return "0" if text in ("-0", "") else text


def _component(name: str, nodes: int, price: Decimal) -> dict[str, Any]:
    hourly = price * nodes
    return {
        "name": name,
        "unit": "hours",
        "hourlyQuantity": _s(Decimal(nodes)),
        "monthlyQuantity": _s(Decimal(nodes) * _HOURS),
        "price": _s(price),
        "hourlyCost": _s(hourly),
        "monthlyCost": _s(hourly * _HOURS),
        "priceNotFound": False,
    }


def _resource(pool: Mapping[str, Any]) -> dict[str, Any]:
    price = _dec(pool["usd_per_node_hour"])
    capacity = str(pool.get("capacity_type", "on_demand")).replace("_", "-")
    machine = f"{pool['instance_type']}, {capacity}"
    baseline = int(pool.get("baseline_nodes", pool["min_nodes"]))
    warm = int(pool["warm_nodes"])
    components = [
        _component(f"Baseline nodes ({machine})", baseline, price),
        _component(f"Warm nodes, held by placeholders ({machine})", warm, price),
    ]
    hourly = sum((_dec(c["hourlyCost"]) for c in components), Decimal(0))
    metadata = {
        "cloud": pool["cloud"],
        "region": pool.get("region"),
        "instanceType": pool["instance_type"],
        "gpu": pool.get("gpu"),
        "gpusPerNode": pool.get("gpus_per_node"),
        "capacityType": pool.get("capacity_type"),
        "priority": pool.get("priority"),
        "minNodes": pool.get("min_nodes"),
        "maxNodes": pool.get("max_nodes"),
        "priceSource": pool.get("price_source"),
    }
    return {
        "name": f"{RESOURCE_TYPE}.{pool['name']}",
        "resourceType": RESOURCE_TYPE,
        "tags": {},
        "metadata": metadata,
        "hourlyCost": _s(hourly),
        "monthlyCost": _s(hourly * _HOURS),
        "monthlyUsageCost": None,
        "costComponents": components,
        "subresources": [],
    }


def _totals(resources: list[dict[str, Any]]) -> tuple[Decimal, Decimal]:
    hourly = sum((_dec(r["hourlyCost"]) for r in resources), Decimal(0))
    monthly = sum((_dec(r["monthlyCost"]) for r in resources), Decimal(0))
    return hourly, monthly


def _breakdown(resources: list[dict[str, Any]]) -> dict[str, Any]:
    hourly, monthly = _totals(resources)
    return {
        "resources": resources,
        "totalHourlyCost": _s(hourly),
        "totalMonthlyCost": _s(monthly),
        "totalMonthlyUsageCost": None,
    }


def breakdown(plan_json: Mapping[str, Any]) -> dict[str, Any]:
    """An Infracost `Breakdown` of a plan's JSON form (`Plan.to_json_dict()` or a saved plan)."""
    if plan_json.get("schema") != PLAN_SCHEMA:
        raise ValueError(f"not a gpufleet plan: expected schema {PLAN_SCHEMA!r}, found {plan_json.get('schema')!r}")
    return _breakdown(sorted((_resource(p) for p in plan_json["pools"]), key=lambda r: r["name"]))


def _diff(past: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Infracost's diff: per resource that changed, each component's new minus old (added: all new)."""
    old_by = {r["name"]: r for r in past["resources"]}
    new_by = {r["name"]: r for r in new["resources"]}
    out: list[dict[str, Any]] = []
    for name in sorted(set(old_by) | set(new_by)):
        o, n = old_by.get(name), new_by.get(name)
        if o is not None and n is not None and o["costComponents"] == n["costComponents"]:
            continue
        base = n or o
        assert base is not None
        o_comps = {c["name"]: c for c in (o or {}).get("costComponents", [])}
        n_comps = {c["name"]: c for c in (n or {}).get("costComponents", [])}
        comps = []
        for cname in [*n_comps, *(c for c in o_comps if c not in n_comps)]:
            oc, nc = o_comps.get(cname), n_comps.get(cname)

            def val(c: dict[str, Any] | None, key: str) -> Decimal:
                return _dec(c[key]) if c is not None and c[key] is not None else Decimal(0)

            comps.append(
                {
                    "name": cname,
                    "unit": "hours",
                    "hourlyQuantity": _s(val(nc, "hourlyQuantity") - val(oc, "hourlyQuantity")),
                    "monthlyQuantity": _s(val(nc, "monthlyQuantity") - val(oc, "monthlyQuantity")),
                    "price": (nc or oc or {}).get("price"),
                    "hourlyCost": _s(val(nc, "hourlyCost") - val(oc, "hourlyCost")),
                    "monthlyCost": _s(val(nc, "monthlyCost") - val(oc, "monthlyCost")),
                    "priceNotFound": False,
                }
            )
        hourly = _dec((n or {}).get("hourlyCost") or 0) - _dec((o or {}).get("hourlyCost") or 0)
        out.append(
            {
                **base,
                "hourlyCost": _s(hourly),
                "monthlyCost": _s(hourly * _HOURS),
                "costComponents": comps,
            }
        )
    return _breakdown(out)


def _summary(resources: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(resources)
    return {
        "totalResources": n,
        "totalDetectedResources": n,
        "totalSupportedResources": n,
        "totalUnsupportedResources": 0,
        "totalUsageBasedResources": 0,
        "totalNoPriceResources": 0,
        "supportedResourceCounts": {RESOURCE_TYPE: n} if n else {},
        "unsupportedResourceCounts": {},
        "noPriceResourceCounts": {},
    }


def _metadata(command: str, generated: str) -> dict[str, Any]:
    """Infracost's run metadata; the VCS fields from GitHub Actions' environment when it is there."""
    env = os.environ
    return {
        "infracostCommand": command,
        "vcsBranch": env.get("GITHUB_HEAD_REF") or env.get("GITHUB_REF_NAME") or "",
        "vcsCommitSha": env.get("GITHUB_SHA", ""),
        "vcsCommitAuthorName": "",
        "vcsCommitAuthorEmail": "",
        "vcsCommitTimestamp": generated,  # not known here: the time the plan was made
        "vcsCommitMessage": "",
    }


def document(
    plan: Plan,
    path: str,
    old: Mapping[str, Any] | None = None,
    *,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """The whole Infracost JSON document for `plan` (declared at `path`), against `old` if given."""
    generated = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    new = breakdown(plan.to_json_dict())
    past = breakdown(old) if old is not None else None
    diff = _diff(past, new) if past is not None else None
    project = {
        "name": plan.fleet,
        "displayName": plan.fleet,
        "metadata": {"path": path, "type": "gpufleet_plan"},
        "pastBreakdown": past,
        "breakdown": new,
        "diff": diff,
        "summary": _summary(new["resources"]),
    }
    return {
        "version": OUTPUT_VERSION,
        "metadata": _metadata("diff" if old is not None else "breakdown", generated),
        "currency": "USD",
        "projects": [project],
        "totalHourlyCost": new["totalHourlyCost"],
        "totalMonthlyCost": new["totalMonthlyCost"],
        "totalMonthlyUsageCost": None,
        "pastTotalHourlyCost": past["totalHourlyCost"] if past else None,
        "pastTotalMonthlyCost": past["totalMonthlyCost"] if past else None,
        "pastTotalMonthlyUsageCost": None,
        "diffTotalHourlyCost": diff["totalHourlyCost"] if diff else None,
        "diffTotalMonthlyCost": diff["totalMonthlyCost"] if diff else None,
        "diffTotalMonthlyUsageCost": None,
        "timeGenerated": generated,
        "summary": _summary(new["resources"]),
    }
