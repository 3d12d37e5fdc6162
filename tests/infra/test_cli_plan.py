"""`gpufleet validate` and `gpufleet plan` through typer's CliRunner: outputs and exit codes."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from gpufleet.infra.cli import app
from tests.infra.conftest import BASE

runner = CliRunner()


def test_validate_accepts_a_good_file(write_fleet):
    result = runner.invoke(app, ["validate", str(write_fleet())])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output and "2 pools, 1 deployment," in result.output


def test_validate_lists_every_problem_and_exits_1_without_traceback(write_fleet):
    path = write_fleet(
        BASE.replace("    max_nodes: 4\n", "    max_nodes: 0\n").replace("    cloud: gcp\n", "    cloud: azure\n")
    )
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert "2 problems in the fleet declaration" in result.output
    assert f"{path}:12: nodepools[0].max_nodes" in result.output
    assert f"{path}:15: nodepools[1].cloud" in result.output
    assert "Traceback" not in result.output


def test_validate_missing_file_is_one_clear_line(tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "cannot read" in result.output and "Traceback" not in result.output


def test_plan_json_has_the_stable_fields(write_fleet):
    result = runner.invoke(app, ["plan", str(write_fleet()), "-o", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "gpufleet.plan/v1"
    pool = data["pools"][0]
    assert {
        k: pool[k] for k in ("name", "cloud", "priority", "min_nodes", "warm_nodes", "max_nodes", "usd_per_node_hour")
    } == {
        "name": "aws-h100",
        "cloud": "aws",
        "priority": 100,
        "min_nodes": 1,
        "warm_nodes": 1,
        "max_nodes": 4,
        "usd_per_node_hour": 55.04,
    }
    dep = data["deployments"][0]
    assert dep["placement"] == [{"pool": "aws-h100", "replicas": 4, "kv_cache_tokens_per_replica": 467295}]
    assert dep["kv_cache_tokens_per_replica"] == 467295
    assert set(data["cost"]) >= {
        "baseline_usd_per_hour",
        "warm_usd_per_hour",
        "peak_usd_per_hour",
        "baseline_usd_per_month",
        "warm_usd_per_month",
        "peak_usd_per_month",
    }


def test_plan_table_shows_pools_deployments_and_cost(write_fleet):
    result = runner.invoke(app, ["plan", str(write_fleet())])
    assert result.exit_code == 0, result.output
    for text in ("aws-h100", "gcp-l4", "llama-8b", "baseline + warm", "$80,358.40"):
        assert text in result.output


def test_plan_markdown_with_compare_states_the_monthly_change(write_fleet, tmp_path):
    old = tmp_path / "old.json"
    assert runner.invoke(app, ["plan", str(write_fleet()), "-o", "json", "--out", str(old)]).exit_code == 0
    new = write_fleet(BASE.replace("    warm_nodes: 1\n", "    warm_nodes: 0\n"), name="new.yaml")
    result = runner.invoke(app, ["plan", str(new), "-o", "markdown", "--compare", str(old)])
    assert result.exit_code == 0, result.output
    assert (
        "Monthly cost (baseline + warm) will decrease by **$40,179.20 (-50.0%)**: $80,358.40 -> **$40,179.20**."
        in result.output
    )
    assert "| aws-h100 | aws us-east-1 | p5.48xlarge | 100 | 1/0/4 |" in result.output


def test_plan_compare_with_a_bad_file_is_a_clear_error(write_fleet, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = runner.invoke(app, ["plan", str(write_fleet()), "--compare", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:1: not JSON" in result.output


def test_budget_gate_exits_3_over_and_0_under(write_fleet):
    path = str(write_fleet())
    over = runner.invoke(app, ["plan", path, "--max-monthly-usd", "80000"])
    assert over.exit_code == 3
    assert "over budget" in over.output
    under = runner.invoke(app, ["plan", path, "--max-monthly-usd", "80400", "-o", "json"])
    assert under.exit_code == 0


def test_user_catalog_adds_a_machine_type(write_fleet, tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_text(
        "cloud: aws\nmachines:\n  p6-b200.48xlarge: {gpu: B200, gpus: 8, vcpus: 192, ram_gib: 2048, usd_per_hour: 113.9, regions: [us-east-1]}\n"
    )
    path = write_fleet(BASE.replace("p5.48xlarge", "p6-b200.48xlarge"))
    assert runner.invoke(app, ["validate", str(path)]).exit_code == 1
    result = runner.invoke(app, ["plan", str(path), "--catalog", str(extra), "-o", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pools"][0]["usd_per_node_hour"] == 113.9


def test_render_router_config_lists_every_replica_with_its_pool_and_kv(write_fleet, tmp_path):
    import yaml

    from gpufleet.router.config import RouterConfig

    out = tmp_path / "router.yaml"
    result = runner.invoke(
        app,
        [
            "render",
            "router-config",
            str(write_fleet()),
            "--out",
            str(out),
            "--url-template",
            "http://127.0.0.1:{port}/{id}",
        ],
    )
    assert result.exit_code == 0, result.output
    cfg = RouterConfig.model_validate(yaml.safe_load(out.read_text()))
    assert [r.id for r in cfg.replicas] == [f"llama-8b-aws-h100-{i}" for i in range(4)]
    assert cfg.replicas[0].url == "http://127.0.0.1:8000/llama-8b-aws-h100-0"
    assert cfg.replicas[0].kv_capacity_tokens == 467295 and cfg.replicas[0].priority == 100
    assert cfg.settings.prediction_cache.enabled is False


AWS_ONLY = """\
fleet: live-check
clouds:
  aws: {region: us-west-2, cluster: prod-eks}
nodepools:
  - name: h100
    cloud: aws
    zones: [us-west-2a]
    instance_type: p5.48xlarge
    priority: 100
    max_nodes: 4
deployments:
  - name: llama-8b
    model: meta-llama/Llama-3.1-8B-Instruct
    min_replicas: 1
    max_replicas: 8
"""


def test_plan_live_checks_quota_against_moto_and_exits_1_on_an_error(write_fleet, monkeypatch):
    from moto import mock_aws

    from tests.fakes.aws_quotas import ec2_gpu_quotas

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-west-2",
    }.items():
        monkeypatch.setenv(key, value)
    path = str(write_fleet(AWS_ONLY))
    # p5.48xlarge has 192 vCPUs: 4 nodes need 768 vCPUs of the P-instance quota (L-417A185B).
    with mock_aws(), ec2_gpu_quotas({"us-west-2": {"L-417A185B": 384, "L-7212CCBC": 0}}):
        short = runner.invoke(app, ["plan", path, "--live", "-o", "json"])
    assert short.exit_code == 1, short.output
    findings = json.loads(short.stdout)["live"]
    assert [(f["severity"], f["pool"], f["check"]) for f in findings] == [("error", "h100", "quota")]
    with mock_aws(), ec2_gpu_quotas({"us-west-2": {"L-417A185B": 2000, "L-7212CCBC": 0}}):
        ok = runner.invoke(app, ["plan", path, "--live"])
    assert ok.exit_code == 0, ok.output
    assert "live checks: every pool passed" in ok.output


def test_plan_capacity_counts_kv_reuse_for_the_ttft_target(write_fleet):
    path = str(write_fleet())
    result = runner.invoke(
        app,
        [
            "plan",
            path,
            "-o",
            "json",
            "--workload",
            "shared_prompts",
            "--ttft-p99-s",
            "0.5",
            "--requests",
            "300",
            "--rps",
            "40",
        ],
    )
    assert result.exit_code == 0, result.output
    cap = json.loads(result.stdout)["capacity"]
    assert cap["deployment"] == "llama-8b" and cap["requests"] == 300
    rr, ca = cap["replicas"]["round_robin"], cap["replicas"]["cache_aware"]
    assert rr is not None and ca is not None and rr >= ca >= 1
    # one H100 of a p5.48xlarge ($55.04/h for 8 GPUs) for 730 h
    assert cap["usd_per_replica_month"] == round(55.04 / 8 * 730, 2)
    assert cap["monthly_saving_usd"] == round((rr - ca) * cap["usd_per_replica_month"], 2)


def test_plan_capacity_needs_a_target_and_a_known_deployment(write_fleet):
    path = str(write_fleet())
    no_target = runner.invoke(app, ["plan", path, "--workload", "rag"])
    assert no_target.exit_code == 1 and "needs --ttft-p99-s" in no_target.output
    bad = runner.invoke(app, ["plan", path, "--workload", "rag", "--ttft-p99-s", "1", "--deployment", "nope"])
    assert bad.exit_code == 1 and "--deployment 'nope' is not in the plan; deployments: llama-8b" in bad.output
    unknown = runner.invoke(app, ["plan", path, "--workload", "chess", "--ttft-p99-s", "1"])
    assert unknown.exit_code == 1 and "unknown workload 'chess'" in unknown.output


def test_plan_capacity_from_a_malformed_trace_names_the_line(write_fleet, tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        '{"timestamp": 0, "input_length": 600, "output_length": 10, "hash_ids": [0, 1]}\n{"timestamp": 5}\n'
    )
    result = runner.invoke(app, ["plan", str(write_fleet()), "--trace", str(trace), "--ttft-p99-s", "1"])
    assert result.exit_code == 1
    assert f"{trace}:2" in result.output and "Traceback" not in result.output


def test_plan_capacity_with_kv_offload_reports_replicas_with_and_without_the_tier(write_fleet):
    text = BASE.replace("    max_model_len: 16384\n", "    max_model_len: 16384\n    kv_offload: {cpu_gib: 32}\n")
    path = str(write_fleet(text))
    args = ["plan", path, "-o", "json", "--workload", "multiturn", "--ttft-p99-s", "1.0", "--requests", "200"]
    result = runner.invoke(app, [*args, "--rps", "20"])
    assert result.exit_code == 0, result.output
    cap = json.loads(result.stdout)["capacity"]
    off = cap["offload"]
    assert off["replicas_with"] == cap["replicas"]["cache_aware"]
    assert off["replicas_without"] is not None and off["replicas_without"] >= off["replicas_with"]
    assert off["monthly_saving_usd"] == round(
        (off["replicas_without"] - off["replicas_with"]) * cap["usd_per_replica_month"], 2
    )
    table = runner.invoke(app, [*args[:2], *args[4:], "--rps", "20"])
    assert table.exit_code == 0 and "without kv_offload" in table.output
