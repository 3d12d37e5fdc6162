"""Bad declarations get every problem at once, each with file, line, field and what is allowed."""

from __future__ import annotations

import pytest

from gpufleet.infra import spec
from tests.infra.conftest import BASE


def problems(text: str) -> list[str]:
    with pytest.raises(spec.FleetError) as exc:
        spec.load_text(text, "fleet.yaml")
    return [str(i) for i in exc.value.issues]


def test_the_issue_example_loads_with_its_field_names():
    fleet, smap = spec.load_text(BASE)
    assert [p.name for p in fleet.nodepools] == ["aws-h100", "gcp-l4"]
    assert fleet.nodepools[0].warm_nodes == 1
    assert fleet.router.policy == "cache_aware"
    assert smap.line(("nodepools", 1, "instance_type")) == 17


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "    max_nodes: 4\n",
            "    max_nodes: 0\n",
            "fleet.yaml:12: nodepools[0].max_nodes: input should be greater than or equal to 1 (found 0)",
        ),
        (
            "    min_nodes: 1\n    max_nodes: 4\n",
            "    min_nodes: 3\n    max_nodes: 2\n",
            "fleet.yaml:12: nodepools[0].max_nodes: 2 is below min_nodes 3",
        ),
        (
            "    warm_nodes: 1\n",
            "    warm_nodes: 4\n",
            "fleet.yaml:13: nodepools[0].warm_nodes: 4 does not fit: at most max_nodes - min_nodes = 3",
        ),
        (
            "    cloud: gcp\n",
            "    cloud: azure\n",
            "fleet.yaml:15: nodepools[1].cloud: 'azure' is not allowed; expected 'aws', 'gcp', 'kubernetes' or 'local'",
        ),
        (
            "  - name: gcp-l4\n",
            "  - name: aws-h100\n",
            "fleet.yaml:14: nodepools[1].name: 'aws-h100' is already the name of nodepools[0]",
        ),
        (
            "  - name: gcp-l4\n",
            "  - name: GCP_L4\n",
            "fleet.yaml:14: nodepools[1].name: 'GCP_L4' is not a valid name: use lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters",
        ),
        (
            "    zones: [us-east-1a, us-east-1b]\n",
            "    zones: [us-west-2a]\n",
            "fleet.yaml:8: nodepools[0].zones[0]: zone 'us-west-2a' is not in region 'us-east-1'",
        ),
        (
            "    min_replicas: 4\n",
            "    min_replicas: 40\n",
            "fleet.yaml:26: deployments[0].max_replicas: 16 is below min_replicas 40",
        ),
        (
            "    gpus_per_replica: 1\n",
            "    gpus_per_replica: 1\n    engine: trt\n",
            "fleet.yaml:25: deployments[0].engine: 'trt' is not allowed; expected 'vllm' or 'sglang'",
        ),
        (
            "    max_model_len: 16384\n",
            "    max_model_len: 16384\n    nodepools: [aws-h100, nope]\n",
            "fleet.yaml:28: deployments[0].nodepools[1]: 'nope' is not a declared nodepool; declared: aws-h100, gcp-l4",
        ),
        (
            "    priority: 50\n",
            "    priority: 50\n    colour: blue\n",
            "fleet.yaml:19: nodepools[1].colour: unknown field; allowed: capacity_type, cloud, engine_command, gpu, gpus_per_node, instance_type, labels, max_nodes, min_nodes, name, priority, region, taints, usd_per_node_hour, warm_nodes, zones",
        ),
        (
            "  - name: llama-8b\n",
            "  - name: llama-8b\n    name: again\n",
            "fleet.yaml:23: deployments[0].name: duplicate key (first at line 22)",
        ),
    ],
)
def test_bad_declaration_names_line_field_and_allowed(old: str, new: str, expected: str):
    assert old in BASE
    assert expected in problems(BASE.replace(old, new, 1))


def test_all_problems_of_a_file_are_reported_at_once():
    text = (
        BASE.replace("    min_nodes: 1\n    max_nodes: 4\n", "    min_nodes: 3\n    max_nodes: 2\n")
        .replace("    cloud: gcp\n", "    cloud: azure\n")
        .replace("    max_replicas: 16\n", "    max_replicas: 1\n")
    )
    found = problems(text)
    assert len(found) == 3, found
    assert [f.split(":")[1] for f in found] == ["12", "15", "26"]  # in file order


def test_cloud_used_by_a_pool_must_be_configured():
    text = BASE.replace("  gcp: {project: acme-ml, region: us-central1, cluster: prod-gke}\n", "")
    assert "fleet.yaml:14: nodepools[1].cloud: 'gcp' is not configured under `clouds:`" in problems(text)


def test_invalid_yaml_reports_the_line():
    found = problems("fleet: x\nnodepools: [\n  - a: b\n")
    assert len(found) == 1 and found[0].startswith("fleet.yaml:3: not valid YAML")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_documents_are_rejected_clearly(text: str):
    (found,) = problems(text)
    assert "expected a mapping with `fleet`, `nodepools`, `deployments`" in found


def test_dict_from_pulumi_config_validates_without_lines():
    import yaml

    data = yaml.safe_load(BASE)
    data["nodepools"][0]["max_nodes"] = 0
    with pytest.raises(spec.FleetError) as exc:
        spec.load_dict(data, "Pulumi config gpufleet:fleet")
    assert str(exc.value.issues[0]).startswith("Pulumi config gpufleet:fleet: nodepools[0].max_nodes:")


def test_engine_command_only_on_local_pools():
    text = BASE.replace("    priority: 50\n", "    priority: 50\n    engine_command: [vllm, serve]\n")
    assert (
        "fleet.yaml:19: nodepools[1].engine_command: only `local` pools run an engine command; this pool is gcp"
        in problems(text)
    )


AUTO = BASE + "    max_concurrent_requests: 64\n    autoscaling:\n"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            "      signal: queue_depth\n      target: 8\n",
            "fleet.yaml:30: deployments[0].autoscaling.signal: 'queue_depth' is not allowed; expected 'in_flight', "
            "'queued_prefill_tokens' or 'ttft_p90_s'",
        ),
        (
            "      signal: in_flight\n      target: 0\n",
            "fleet.yaml:31: deployments[0].autoscaling.target: input should be greater than 0 (found 0)",
        ),
        (
            "      signal: in_flight\n      target: 100\n",
            "fleet.yaml:31: deployments[0].autoscaling.target: 100 requests in flight per replica can never be "
            "reached: a replica runs at most max_concurrent_requests = 64",
        ),
        (
            "      signal: in_flight\n      target: 8\n      scale_up_delay_s: -1\n",
            "fleet.yaml:32: deployments[0].autoscaling.scale_up_delay_s: input should be greater than or equal to 0 "
            "(found -1)",
        ),
        (
            "      signal: in_flight\n      target: 8\n      cooldown: 5\n",
            "fleet.yaml:32: deployments[0].autoscaling.cooldown: unknown field; allowed: pending_timeout_s, "
            "scale_down_delay_s, scale_up_delay_s, signal, target, tolerance",
        ),
    ],
)
def test_bad_autoscaling_names_line_field_and_allowed(lines: str, expected: str):
    assert expected in problems(AUTO + lines)


def test_autoscaling_reaches_the_plan():
    from gpufleet.infra import plan

    fleet_text = AUTO + "      signal: ttft_p90_s\n      target: 0.5\n      scale_down_delay_s: 120\n"
    fleet, _ = spec.load_text(fleet_text)
    dep = plan.compile_fleet(fleet).deployment("llama-8b")
    assert dep.autoscaling is not None
    assert (dep.autoscaling.signal, dep.autoscaling.target, dep.autoscaling.scale_down_delay_s) == (
        "ttft_p90_s",
        0.5,
        120,
    )
    assert dep.autoscaling.scale_up_delay_s == 30


def test_a_deployment_that_may_grow_without_autoscaling_scales_on_in_flight_at_80_percent():
    from gpufleet.infra import plan

    fleet, _ = spec.load_text(BASE + "    max_concurrent_requests: 32\n")
    assert fleet.deployments[0].autoscaling is None  # nothing declared ...
    dep = plan.compile_fleet(fleet).deployment("llama-8b")
    assert dep.autoscaling == spec.Autoscaling(signal="in_flight", target=25)  # ... the default applies
    assert dep.autoscaling_default
    assert dep.scaling_summary() == (
        "4-16 on in_flight, target 25 per replica (default: no autoscaling declared; 80% of max_concurrent_requests 32)"
    )


def test_min_equal_to_max_is_fixed_and_a_declared_autoscaling_is_kept():
    from gpufleet.infra import plan

    fixed = plan.compile_fleet(spec.load_text(BASE.replace("max_replicas: 16", "max_replicas: 4"))[0])
    dep = fixed.deployment("llama-8b")
    assert dep.autoscaling is None and not dep.autoscaling_default
    assert dep.scaling_summary() == "fixed at 4 (max_replicas = min_replicas)"
    declared = plan.compile_fleet(spec.load_text(AUTO + "      signal: in_flight\n      target: 8\n")[0])
    dep = declared.deployment("llama-8b")
    assert dep.autoscaling is not None and dep.autoscaling.target == 8 and not dep.autoscaling_default
    assert dep.scaling_summary() == "4-16 on in_flight, target 8 per replica"


@pytest.mark.parametrize(("mcr", "target"), [(1, 1), (2, 1), (5, 4), (256, 204)])
def test_the_default_target_is_80_percent_of_max_concurrent_requests_rounded_down_at_least_one(mcr, target):
    assert spec.default_autoscaling(mcr).target == target


def test_data_parallel_engines_need_kv_event_port_ranges_that_do_not_overlap():
    dp = BASE + "    engine_args: [--data-parallel-size, '2']\n"
    assert spec.load_text(dp)  # precise mode off: the ports are not used
    on = dp + "router:\n  kv_events: {enabled: true}\n"
    (msg,) = problems(on)
    assert msg.startswith("fleet.yaml:") and "deployments[0].engine_args: --data-parallel-size 2" in msg
    assert "rank 1's events endpoint tcp://*:5558 is also rank 0's replay endpoint" in msg
    fleet, _ = spec.load_text(dp + "router:\n  kv_events: {enabled: true, replay_port: 5567}\n")
    from gpufleet.infra import plan, router_config

    cfg = router_config.render(plan.compile_fleet(fleet), lambda r: f"http://{r.id}:8000")
    assert {r.data_parallel_size for r in cfg.replicas} == {2}  # the router subscribes both ranks


def test_the_routers_step_budget_is_the_engines_max_num_batched_tokens_else_vllms_default():
    from gpufleet.infra import plan, router_config

    def budgets(text: str) -> set[int]:
        cfg = router_config.render(plan.compile_fleet(spec.load_text(text)[0]), lambda r: f"http://{r.id}:8000")
        return {r.max_batched_tokens for r in cfg.replicas}

    assert budgets(BASE) == {router_config.DEFAULT_STEP_TOKENS}
    assert budgets(BASE + "    engine_args: [--max-num-batched-tokens, '2048']\n") == {2048}
    assert budgets(BASE + "    engine_args: ['--max-num-batched-tokens=4096', --enforce-eager]\n") == {4096}
