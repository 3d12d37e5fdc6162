"""The plan against hand-computed examples: placement, KV capacity, cost, failover, compare."""

from __future__ import annotations

import pytest

from gpufleet.infra import plan, report, spec
from tests.infra.conftest import BASE

GIB = 2**30


def compile_text(text: str) -> plan.Plan:
    fleet, smap = spec.load_text(text, "fleet.yaml")
    return plan.compile_fleet(fleet, smap)


def compile_errors(text: str) -> list[str]:
    with pytest.raises(spec.FleetError) as exc:
        compile_text(text)
    return [str(i) for i in exc.value.issues]


def test_kv_capacity_is_gpu_memory_times_utilisation_minus_weights_over_kv_bytes():
    p = compile_text(BASE)
    d = p.deployment("llama-8b")
    # Llama 3.1 8B: 2 (K,V) x 32 layers x 8 KV heads x 128 dims x 2 bytes = 131072 bytes/token.
    assert d.kv_bytes_per_token == 131072
    assert d.weight_bytes == 16_060_000_000
    assert d.kv_cache_tokens_per_replica == int((80 * GIB * 0.9 - 16_060_000_000) // 131072) == 467295
    l4 = next(x for x in d.pools if x.pool == "gcp-l4")
    assert l4.kv_cache_tokens_per_replica == int((24 * GIB * 0.9 - 16_060_000_000) // 131072)


def test_baseline_replicas_go_to_the_highest_priority_pool_first():
    p = compile_text(BASE)
    d = p.deployment("llama-8b")
    assert d.failover == ["aws-h100", "gcp-l4"]
    assert [(x.pool, x.replicas) for x in d.placement] == [("aws-h100", 4)]
    assert [r.id for r in d.replicas] == [f"llama-8b-aws-h100-{i}" for i in range(4)]
    # gcp-l4: 2 nodes x 4 L4 = 8 replicas if the H100 pool is lost.
    assert d.replicas_if_top_pool_lost == 8


def test_cost_counts_baseline_warm_and_peak_nodes():
    p = compile_text(BASE)
    aws, gcp = p.pool("aws-h100"), p.pool("gcp-l4")
    assert (aws.baseline_nodes, aws.warm_nodes, aws.max_nodes) == (1, 1, 4)
    assert (gcp.baseline_nodes, gcp.warm_nodes, gcp.max_nodes) == (0, 0, 2)
    assert aws.usd_per_node_hour == 55.04 and gcp.usd_per_node_hour == 4.0016
    assert p.cost.baseline_usd_per_hour == 55.04
    assert p.cost.warm_usd_per_hour == 55.04
    assert p.cost.peak_usd_per_hour == pytest.approx(4 * 55.04 + 2 * 4.0016)
    assert p.cost.baseline_usd_per_month == pytest.approx(55.04 * 730)


def test_replicas_beyond_the_top_pool_spill_to_the_next_and_raise_its_baseline():
    p = compile_text(
        BASE.replace("    min_replicas: 4\n    max_replicas: 16\n", "    min_replicas: 36\n    max_replicas: 40\n")
    )
    d = p.deployment("llama-8b")
    assert [(x.pool, x.replicas) for x in d.placement] == [("aws-h100", 32), ("gcp-l4", 4)]
    aws, gcp = p.pool("aws-h100"), p.pool("gcp-l4")
    assert (aws.baseline_nodes, aws.warm_nodes) == (4, 0)  # no room left for the warm node
    assert gcp.baseline_nodes == 1
    codes = {(w.code, w.subject) for w in p.warnings}
    assert {("min_nodes_raised", "aws-h100"), ("warm_reduced", "aws-h100"), ("baseline_spills", "llama-8b")} <= codes


def test_spot_pool_uses_the_spot_price():
    p = compile_text(BASE.replace("    priority: 50\n", "    priority: 50\n    capacity_type: spot\n"))
    assert p.pool("gcp-l4").usd_per_node_hour == 1.6006
    assert "spot" in p.pool("gcp-l4").price_source


def test_deployments_share_pools_in_declaration_order():
    text = (
        BASE
        + """\
  - name: qwen-32b
    model: Qwen/Qwen3-32B
    gpus_per_replica: 2
    min_replicas: 3
    max_replicas: 4
    max_model_len: 32768
    nodepools: [aws-h100]
"""
    )
    p = compile_text(text)
    # llama takes 4 GPUs of the first H100 node; qwen's three 2-GPU replicas: 2 fit the rest, 1 opens node 2.
    assert p.pool("aws-h100").baseline_nodes == 2
    assert p.pool("aws-h100").gpus_used_baseline == 4 + 6
    assert [(x.pool, x.replicas) for x in p.deployment("qwen-32b").placement] == [("aws-h100", 3)]
    assert any(w.code == "no_failover" and w.subject == "qwen-32b" for w in p.warnings)


def test_weights_that_do_not_fit_a_replica_are_an_error():
    text = BASE.replace("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B-Instruct").replace(
        "    max_model_len: 16384\n", "    max_model_len: 16384\n    nodepools: [gcp-l4]\n"
    )
    (msg,) = compile_errors(text)
    assert msg.startswith(
        "fleet.yaml:28: deployments[0].nodepools[0]: meta-llama/Llama-3.1-70B-Instruct weights (141.1 GB) do not fit 1 x L4"
    )


def test_min_replicas_that_do_not_fit_the_pools_are_an_error():
    (msg,) = compile_errors(
        BASE.replace("    min_replicas: 4\n    max_replicas: 16\n", "    min_replicas: 50\n    max_replicas: 50\n")
    )
    assert msg == (
        "fleet.yaml:25: deployments[0].min_replicas: 50 replicas do not fit: pools aws-h100, gcp-l4 hold 40 at "
        "their max_nodes (after the deployments declared before it); raise max_nodes or add a pool"
    )


def test_unknown_machine_type_and_wrong_region_are_errors():
    text = BASE.replace("instance_type: p5.48xlarge", "instance_type: p5.96xlarge").replace(
        "    zones: [us-central1-a, us-central1-b]\n", "    region: africa-south1\n"
    )
    msgs = compile_errors(text)
    assert msgs[0].startswith(
        "fleet.yaml:9: nodepools[0].instance_type: 'p5.96xlarge' is not in the aws catalog; known aws types like it: p5.48xlarge, p5.4xlarge"
    )
    assert msgs[1].startswith(
        "fleet.yaml:16: nodepools[1].region: g2-standard-48 is not offered in africa-south1; offered in: us-central1"
    )


def test_gpus_per_replica_must_fit_a_node_of_every_named_pool():
    text = BASE.replace("    gpus_per_replica: 1\n", "    gpus_per_replica: 8\n").replace(
        "    max_model_len: 16384\n", "    max_model_len: 16384\n    nodepools: [aws-h100, gcp-l4]\n"
    )
    assert compile_errors(text) == [
        "fleet.yaml:24: deployments[0].gpus_per_replica: 8 GPUs do not fit a node of pool 'gcp-l4', which has 4"
    ]


def test_plan_round_trips_through_json():
    p = compile_text(BASE)
    data = p.to_json_dict()
    assert data["schema"] == "gpufleet.plan/v1"
    assert plan.Plan.from_json_dict(data) == p


def test_compare_reports_pool_and_total_changes():
    old = compile_text(BASE).to_json_dict()
    new = compile_text(BASE.replace("    warm_nodes: 1\n", "    warm_nodes: 2\n"))
    change = report.diff(old, new)
    assert change.delta_usd_per_month == pytest.approx(55.04 * 730)
    by = {d.name: d for d in change.pools}
    assert by["aws-h100"].status == "changed" and by["aws-h100"].new_nodes == (1, 2, 4)
    assert by["gcp-l4"].status == "unchanged"


def test_compare_rejects_a_file_that_is_not_a_plan():
    with pytest.raises(report.PlanFormatError, match="not a gpufleet plan"):
        report.diff({"schema": "something-else"}, compile_text(BASE))
