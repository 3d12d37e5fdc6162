"""Plans that read well: the budget gate in every format, a negative budget refused, cost by pool
as a mermaid chart, plurals that read right."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from gpufleet.infra import plan as plan_mod
from gpufleet.infra import report
from gpufleet.infra.cli import app

FLEET = Path(__file__).resolve().parents[2] / "stacks" / "multicloud" / "fleet.yaml"
runner = CliRunner()


def test_budget_gate_result_is_in_the_json_over_and_within():
    committed = report.monthly_committed(plan_mod.compile_file(FLEET))
    over = runner.invoke(app, ["plan", str(FLEET), "-o", "json", "--max-monthly-usd", str(committed - 1)])
    assert over.exit_code == 3
    budget = json.loads(over.stdout)["budget"]
    assert budget == {"max_monthly_usd": committed - 1, "monthly_committed_usd": committed, "over": True}
    within = runner.invoke(app, ["plan", str(FLEET), "-o", "json", "--max-monthly-usd", str(committed)])
    assert within.exit_code == 0
    assert json.loads(within.stdout)["budget"]["over"] is False


def test_budget_gate_result_is_in_the_markdown():
    res = runner.invoke(app, ["plan", str(FLEET), "-o", "markdown", "--max-monthly-usd", "1000"])
    assert res.exit_code == 3
    assert "Budget gate: **over budget**" in res.stdout and "$1,000.00/month" in res.stdout
    ok = runner.invoke(app, ["plan", str(FLEET), "-o", "markdown", "--max-monthly-usd", "1e9"])
    assert ok.exit_code == 0 and "Budget gate: within budget" in ok.stdout


def test_negative_budget_is_refused_as_a_usage_error():
    res = runner.invoke(app, ["plan", str(FLEET), "--max-monthly-usd", "-5"])
    assert res.exit_code == 2
    assert "negative" in res.output


def test_markdown_shows_cost_by_pool_as_a_mermaid_pie():
    p = plan_mod.compile_file(FLEET)
    md = report.markdown(p)
    block = md.split("```mermaid\n", 1)[1].split("```", 1)[0]
    assert block.startswith("pie")
    for pool in p.pools:
        usd = (pool.baseline_usd_per_hour + pool.warm_usd_per_hour) * 730
        assert f'"{pool.name}" : {usd:.2f}' in block


def test_validate_says_1_deployment_not_1_deployments():
    res = runner.invoke(app, ["validate", str(FLEET)])
    assert res.exit_code == 0
    assert "2 pools, 1 deployment," in res.output


def test_render_router_config_of_a_local_fleet_says_why_it_has_no_urls(tmp_path):
    res = runner.invoke(app, ["init", "--model", "Qwen/Qwen3-0.6B", "--cloud", "local", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    fleet = str(tmp_path / "fleet.yaml")
    refused = runner.invoke(app, ["render", "router-config", fleet])
    assert refused.exit_code == 1
    assert "gpufleet up" in refused.output and "--url-template" in refused.output
    given = runner.invoke(app, ["render", "router-config", fleet, "--url-template", "http://127.0.0.1:{port}"])
    assert given.exit_code == 0, given.output
    assert "url: http://127.0.0.1:8000" in given.stdout
