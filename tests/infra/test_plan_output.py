"""Plans that read well: the budget gate in every format, a negative budget refused, cost by pool
as a mermaid chart, plurals that read right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("width", [80, 120])
def test_cost_tables_never_cut_a_dollar_amount_or_a_model_name(width, tmp_path):
    import io

    from rich.console import Console

    long_model = tmp_path / "fleet.yaml"
    long_model.write_text(
        FLEET.read_text().replace("meta-llama/Llama-3.1-8B-Instruct", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B")
    )
    for fleet in (FLEET, long_model):
        p = plan_mod.compile_file(fleet)
        old = p.to_json_dict()
        old["pools"][0]["warm_nodes"] = 0  # a change column too
        buf = io.StringIO()
        Console(file=buf, width=width, color_system=None).print(report.tables(p, report.diff(old, p)))
        text = buf.getvalue()
        assert max(len(line) for line in text.splitlines()) <= width
        assert "…" not in text
        amounts = [report._usd(x.baseline_usd_per_hour * 730) for x in p.pools]
        amounts += [report._usd(x.peak_usd_per_hour * 730) for x in p.pools]
        amounts += [report._usd(report.monthly_committed(p)), report._usd(p.cost.peak_usd_per_month)]
        for amount in amounts:
            assert amount in text, amount
        for d in p.deployments:
            assert d.model in text, d.model
        for pool in p.pools:
            assert pool.name in text


def test_compare_lists_the_changed_pool_and_deployment_fields(tmp_path):
    old_json = tmp_path / "old.json"
    assert runner.invoke(app, ["plan", str(FLEET), "-o", "json", "--out", str(old_json)]).exit_code == 0
    new = tmp_path / "fleet.yaml"
    text = FLEET.read_text()
    new.write_text(
        text.replace("instance_type: a3-highgpu-8g", "instance_type: a3-megagpu-8g").replace(
            "max_replicas: 16", "max_replicas: 12"
        )
    )
    md = runner.invoke(app, ["plan", str(new), "-o", "markdown", "--compare", str(old_json)])
    assert md.exit_code == 0, md.output
    assert "- `gcp-h100`: instance_type a3-highgpu-8g -> a3-megagpu-8g" in md.stdout
    assert "usd_per_node_hour 88.49 -> 92.0" in md.stdout
    assert "- `llama-8b`: max_replicas 16 -> 12" in md.stdout
    data = json.loads(runner.invoke(app, ["plan", str(new), "-o", "json", "--compare", str(old_json)]).stdout)
    pools = {p["name"]: p for p in data["compare"]["pools"]}
    assert pools["aws-h100"]["changed"] == [] and pools["aws-h100"]["status"] == "unchanged"
    assert "instance_type a3-highgpu-8g -> a3-megagpu-8g" in pools["gcp-h100"]["changed"]
    assert data["compare"]["deployments"][0]["name"] == "llama-8b"
    table = runner.invoke(app, ["plan", str(new), "--compare", str(old_json)], env={"COLUMNS": "200"})
    assert "pool gcp-h100: instance_type a3-highgpu-8g -> a3-megagpu-8g" in table.output


def test_plan_live_without_credentials_fails_unless_unchecked_is_accepted(tmp_path, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "fleet: live\nclouds: {aws: {region: us-west-2, cluster: c}}\nnodepools:\n"
        "  - {name: h100, cloud: aws, zones: [us-west-2a], instance_type: p5.48xlarge, priority: 1, max_nodes: 2}\n"
        "deployments:\n  - {name: d, model: Qwen/Qwen3-8B, min_replicas: 1, max_replicas: 2}\n"
    )
    strict = runner.invoke(app, ["plan", str(fleet), "--live"])
    assert strict.exit_code == 1, strict.output
    assert "could not check pool(s) h100" in strict.output and "--allow-unchecked" in strict.output
    lenient = runner.invoke(app, ["plan", str(fleet), "--live", "--allow-unchecked"])
    assert lenient.exit_code == 0, lenient.output
    assert "unchecked" in lenient.output
