"""`gpufleet plan -o infracost-json`: Infracost's JSON output format, checked against its schema.

The schema below is written from Infracost's published `schema/infracost.schema.json`
(infracost/infracost, output version 0.2): the same required fields, types and closed objects.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from gpufleet.infra import plan as plan_mod
from gpufleet.infra import report
from gpufleet.infra.cli import app

ROOT = Path(__file__).resolve().parents[2]
FLEET = ROOT / "stacks" / "multicloud" / "fleet.yaml"
runner = CliRunner()

_COST = {"type": ["string", "null"]}
_STR_MAP = {"type": "object", "patternProperties": {".*": {"type": "string"}}}
_INT_MAP = {"type": "object", "patternProperties": {".*": {"type": "integer"}}}


def _closed(required: list[str], props: dict) -> dict:
    return {"type": "object", "required": required, "properties": props, "additionalProperties": False}


_COMPONENT = _closed(
    ["name", "unit", "hourlyQuantity", "monthlyQuantity", "price", "hourlyCost", "monthlyCost", "priceNotFound"],
    {
        "name": {"type": "string"},
        "unit": {"type": "string"},
        "hourlyQuantity": _COST,
        "monthlyQuantity": _COST,
        "price": _COST,
        "hourlyCost": _COST,
        "monthlyCost": _COST,
        "usageBased": {"type": "boolean"},
        "priceNotFound": {"type": "boolean"},
    },
)
_RESOURCE_PROPS = {
    "name": {"type": "string"},
    "resourceType": {"type": "string"},
    "tags": _STR_MAP,
    "defaultTags": _STR_MAP,
    "providerSupportsDefaultTags": {"type": "boolean"},
    "providerLink": {"type": "string"},
    "metadata": {"type": "object"},
    "hourlyCost": _COST,
    "monthlyCost": _COST,
    "monthlyUsageCost": _COST,
    "costComponents": {"type": "array", "items": _COMPONENT},
    "actualCosts": {"type": "array"},
    "subresources": {"type": "array", "items": {"type": "object"}},
    "missingVarsCausingUnknownTagKeys": {"type": "array", "items": {"type": "string"}},
    "missingVarsCausingUnknownDefaultTagKeys": {"type": "array", "items": {"type": "string"}},
}
_RESOURCE = _closed(["name", "metadata"], _RESOURCE_PROPS)
_BREAKDOWN = _closed(
    ["resources", "totalHourlyCost", "totalMonthlyCost", "totalMonthlyUsageCost"],
    {
        "resources": {"type": "array", "items": _RESOURCE},
        "freeResources": {"type": "array", "items": _RESOURCE},
        "totalHourlyCost": _COST,
        "totalMonthlyCost": _COST,
        "totalMonthlyUsageCost": _COST,
    },
)
_SUMMARY = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **{
            k: {"type": "integer"}
            for k in (
                "totalResources",
                "totalDetectedResources",
                "totalSupportedResources",
                "totalUnsupportedResources",
                "totalUsageBasedResources",
                "totalNoPriceResources",
            )
        },
        "supportedResourceCounts": _INT_MAP,
        "unsupportedResourceCounts": _INT_MAP,
        "noPriceResourceCounts": _INT_MAP,
    },
}
_PROJECT_METADATA = {
    "type": "object",
    "required": ["path", "type"],
    "properties": {"path": {"type": "string"}, "type": {"type": "string"}, "vcsSubPath": {"type": "string"}},
}
_METADATA_REQUIRED = [
    "infracostCommand",
    "vcsBranch",
    "vcsCommitSha",
    "vcsCommitAuthorName",
    "vcsCommitAuthorEmail",
    "vcsCommitTimestamp",
    "vcsCommitMessage",
]
_METADATA = {
    "type": "object",
    "required": _METADATA_REQUIRED,
    "properties": {k: {"type": "string"} for k in _METADATA_REQUIRED},
}


def _schema(*, with_past: bool) -> dict:
    # Infracost's Go output writes a missing past/diff breakdown as null (a nil *Breakdown); the
    # published schema types them as a Breakdown, which is what a --compare run must give.
    maybe = _BREAKDOWN if with_past else {"anyOf": [_BREAKDOWN, {"type": "null"}]}
    project = _closed(
        ["name", "displayName", "metadata", "pastBreakdown", "breakdown", "diff", "summary"],
        {
            "name": {"type": "string"},
            "displayName": {"type": "string"},
            "metadata": _PROJECT_METADATA,
            "pastBreakdown": maybe,
            "breakdown": _BREAKDOWN,
            "diff": maybe,
            "summary": _SUMMARY,
        },
    )
    totals = [
        "totalHourlyCost",
        "totalMonthlyCost",
        "totalMonthlyUsageCost",
        "pastTotalHourlyCost",
        "pastTotalMonthlyCost",
        "pastTotalMonthlyUsageCost",
        "diffTotalHourlyCost",
        "diffTotalMonthlyCost",
        "diffTotalMonthlyUsageCost",
    ]
    return _closed(
        [
            "version",
            "metadata",
            "currency",
            "projects",
            "totalHourlyCost",
            "totalMonthlyCost",
            "pastTotalHourlyCost",
            "pastTotalMonthlyCost",
            "diffTotalHourlyCost",
            "diffTotalMonthlyCost",
            "timeGenerated",
            "summary",
        ],
        {
            "version": {"type": "string"},
            "metadata": _METADATA,
            "runId": {"type": "string"},
            "shareUrl": {"type": "string"},
            "cloudUrl": {"type": "string"},
            "currency": {"type": "string"},
            "projects": {"type": "array", "items": project},
            **{k: _COST for k in totals},
            "timeGenerated": {"type": "string", "format": "date-time"},
            "summary": _SUMMARY,
        },
    )


def _validate(doc: dict, *, with_past: bool) -> None:
    jsonschema.Draft4Validator(_schema(with_past=with_past), format_checker=jsonschema.FormatChecker()).validate(doc)


def _plan_doc(*args: str) -> dict:
    res = runner.invoke(app, ["plan", str(FLEET), "-o", "infracost-json", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_breakdown_matches_infracosts_schema_and_the_plans_committed_cost():
    doc = _plan_doc()
    _validate(doc, with_past=False)
    assert doc["version"] == "0.2" and doc["currency"] == "USD"
    (project,) = doc["projects"]
    assert project["pastBreakdown"] is None and doc["diffTotalMonthlyCost"] is None
    plan = plan_mod.compile_file(FLEET)
    assert float(doc["totalMonthlyCost"]) == pytest.approx(report.monthly_committed(plan), abs=0.01)
    names = {r["name"] for r in project["breakdown"]["resources"]}
    assert names == {f"gpufleet_nodepool.{p.name}" for p in plan.pools}


def test_every_cost_component_is_quantity_times_price_and_resources_sum_to_the_total():
    doc = _plan_doc()
    resources = doc["projects"][0]["breakdown"]["resources"]
    total = Decimal(0)
    for r in resources:
        parts = Decimal(0)
        for c in r["costComponents"]:
            assert c["unit"] == "hours"
            assert Decimal(c["monthlyQuantity"]) == Decimal(c["hourlyQuantity"]) * 730
            assert Decimal(c["monthlyCost"]) == Decimal(c["monthlyQuantity"]) * Decimal(c["price"])
            parts += Decimal(c["monthlyCost"])
        assert Decimal(r["monthlyCost"]) == parts
        total += parts
    assert Decimal(doc["totalMonthlyCost"]) == total


def test_compare_fills_past_breakdown_and_diff_totals(tmp_path):
    old_fleet = tmp_path / "fleet.yaml"
    # the earlier plan: one warm node fewer in the failover pool
    old_fleet.write_text(
        FLEET.read_text().replace(
            "max_nodes: 4\n    warm_nodes: 1\ndeployments", "max_nodes: 4\n    warm_nodes: 0\ndeployments"
        )
    )
    assert old_fleet.read_text() != FLEET.read_text()
    old_json = tmp_path / "old.json"
    res = runner.invoke(app, ["plan", str(old_fleet), "-o", "json", "--out", str(old_json)])
    assert res.exit_code == 0, res.output
    doc = _plan_doc("--compare", str(old_json))
    _validate(doc, with_past=True)
    project = doc["projects"][0]
    assert project["pastBreakdown"]["totalMonthlyCost"] == doc["pastTotalMonthlyCost"]
    delta = Decimal(doc["totalMonthlyCost"]) - Decimal(doc["pastTotalMonthlyCost"])
    assert Decimal(doc["diffTotalMonthlyCost"]) == delta
    gcp_price = Decimal("88.49")
    assert delta == gcp_price * 730  # one a3-highgpu-8g node held warm
    (changed,) = project["diff"]["resources"]
    assert changed["name"] == "gpufleet_nodepool.gcp-h100"
    warm = next(c for c in changed["costComponents"] if c["name"].startswith("Warm"))
    assert warm["monthlyQuantity"] == "730" and Decimal(warm["monthlyCost"]) == delta


def test_compare_against_a_non_plan_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "old.json"
    bad.write_text('{"version": "0.2"}')
    res = runner.invoke(app, ["plan", str(FLEET), "-o", "infracost-json", "--compare", str(bad)])
    assert res.exit_code == 1
    assert "not a gpufleet plan" in res.output
