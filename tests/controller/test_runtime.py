"""The reconcile loop end to end: real kubernetes client + fake API server, moto EKS, fake GCE."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from gpufleet.infra.controller import decision as d
from gpufleet.infra.controller import runtime
from gpufleet.provider_adapters import aws, base, gcp
from gpufleet.provider_adapters import kubernetes as kube_adapter
from tests.fakes.gcp_server import FakeGcpServer
from tests.fakes.k8s_server import FakeKubernetes

NS = "gpufleet"
AWS_POOL = {"gpufleet.io/pool": "aws-h100"}
GCP_POOL = {"gpufleet.io/pool": "gcp-h100"}
FACTS = d.FleetFacts(
    pools={
        "aws-h100": d.PoolFacts(
            "aws-h100", "aws", 100, 1, baseline_nodes=2, warm_nodes=0, max_nodes=4, gpus_per_node=8
        ),
        "gcp-h100": d.PoolFacts("gcp-h100", "gcp", 50, 0, baseline_nodes=0, warm_nodes=1, max_nodes=4, gpus_per_node=8),
    },
    deployments=(d.DeploymentFacts("llama", ("aws-h100", "gcp-h100")),),
)
SETTINGS = d.ControllerSettings(stale_after_s=60)


@pytest.fixture
def world() -> Iterator[dict[str, Any]]:
    """Two pools in one fake cluster; aws-h100 backed by a moto EKS node group, gcp-h100 by a fake MIG."""
    kube, gce = FakeKubernetes(), FakeGcpServer.with_defaults()
    kube.start()
    gce.start()
    try:
        with mock_aws():
            eks = boto3.client("eks", region_name="us-east-1")
            eks.create_cluster(
                name="prod-eks",
                roleArn="arn:aws:iam::123456789012:role/x",
                resourcesVpcConfig={"subnetIds": ["subnet-1"]},
            )
            eks.create_nodegroup(
                clusterName="prod-eks",
                nodegroupName="aws-h100",
                nodeRole="arn:aws:iam::123456789012:role/x",
                subnets=["subnet-1"],
                scalingConfig={"minSize": 1, "maxSize": 4, "desiredSize": 2},
            )
            gce.add_mig("us-central1-a", "gke-prod-gcp-h100-grp", machine_type="a3-highgpu-8g", size=1)
            for name in ("a1", "a2"):
                kube.add_node(name, labels=AWS_POOL, gpus=8)
            kube.add_node("g1", labels=GCP_POOL, gpus=8)
            kube.add_deployment(
                "warm-gcp-h100",
                namespace=NS,
                replicas=1,
                gpus_per_pod=8,
                labels={"app.kubernetes.io/component": "placeholder", **GCP_POOL},
                node_selector=GCP_POOL,
            )
            adapter = kube_adapter.KubernetesAdapter(kube.api_client(), namespace=NS)
            nodes = {
                "aws-h100": runtime.NodeBinding(
                    aws.AwsAdapter(), base.PoolRef(cloud="aws", name="aws-h100", region="us-east-1", cluster="prod-eks")
                ),
                "gcp-h100": runtime.NodeBinding(
                    gcp.GcpAdapter(gce.project, client_factory=gce.client),
                    base.PoolRef(
                        cloud="gcp",
                        name="gcp-h100",
                        region="us-central1",
                        zone="us-central1-a",
                        provider_name="gke-prod-gcp-h100-grp",
                    ),
                ),
            }
            observer = runtime.Observer(FACTS, {"aws-h100": adapter, "gcp-h100": adapter}, nodes)
            yield {"kube": kube, "gce": gce, "observer": observer, "adapter": adapter, "eks": eks}
    finally:
        kube.stop()
        gce.stop()


def load_aws(kube: FakeKubernetes, gpus: int) -> None:
    for i in range(gpus // 2):
        kube.add_pod(f"vllm-{i}", namespace="serving", gpus=2, node_selector=AWS_POOL)


def test_hot_pool_warms_next_pool_placeholders_and_mig(world: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    load_aws(world["kube"], 14)  # 14 of 16 GPUs: 87.5 %
    controller = runtime.Controller(FACTS, SETTINGS, world["observer"])
    with caplog.at_level(logging.INFO, logger="gpufleet.controller"):
        controller.reconcile()
    assert {(a.kind, a.pool, a.target, o) for a, o in controller.applied} == {
        ("set_placeholders", "gcp-h100", 2, "applied"),
        ("scale_nodes", "gcp-h100", 2, "applied"),
    }
    assert world["adapter"].placeholder_count("gcp-h100") == 2
    gce: FakeGcpServer = world["gce"]
    assert gce.migs[("us-central1-a", "gke-prod-gcp-h100-grp")].target_size == 2
    assert "set_placeholders pool=gcp-h100 1 -> 2" in caplog.text
    metrics = controller.metrics.render().decode()
    assert 'gpufleet_controller_actions_total{kind="set_placeholders",outcome="applied",pool="gcp-h100"} 1.0' in metrics
    assert 'gpufleet_controller_pool_pressure{pool="aws-h100"} 0.875' in metrics


def test_dry_run_changes_nothing(world: dict[str, Any]) -> None:
    load_aws(world["kube"], 14)
    controller = runtime.Controller(FACTS, SETTINGS, world["observer"], dry_run=True)
    controller.reconcile()
    assert {o for _, o in controller.applied} == {"dry_run"} and len(controller.applied) == 2
    assert world["adapter"].placeholder_count("gcp-h100") == 1
    assert world["gce"].migs[("us-central1-a", "gke-prod-gcp-h100-grp")].target_size == 1


def test_unobservable_pool_gets_no_action(world: dict[str, Any]) -> None:
    load_aws(world["kube"], 16)
    world["kube"].forbidden.add("/api/v1/nodes")
    controller = runtime.Controller(FACTS, SETTINGS, world["observer"])
    decision = controller.reconcile()
    assert decision.actions == ()
    assert any("Forbidden" in why for _, why in world["observer"].errors)
    assert world["adapter"].placeholder_count("gcp-h100") == 1


def test_failed_action_is_counted_and_others_still_run(world: dict[str, Any]) -> None:
    load_aws(world["kube"], 14)
    world["gce"].fail_next_resize(
        "us-central1-a",
        "gke-prod-gcp-h100-grp",
        http_status=503,
        reason="ZONE_RESOURCE_POOL_EXHAUSTED",
        as_operation=True,
    )
    controller = runtime.Controller(FACTS, SETTINGS, world["observer"])
    controller.reconcile()
    outcomes = {(a.kind, o) for a, o in controller.applied}
    assert outcomes == {("set_placeholders", "applied"), ("scale_nodes", "failed")}
    assert 'outcome="failed"' in controller.metrics.render().decode()


def test_loop_decays_after_load_falls(world: dict[str, Any]) -> None:
    kube: FakeKubernetes = world["kube"]
    load_aws(kube, 14)
    clock = [1000.0]
    settings = d.ControllerSettings(stale_after_s=1e9, cool_down_s=60)
    controller = runtime.Controller(FACTS, settings, world["observer"], clock=lambda: clock[0])
    controller.reconcile()
    for i in range(7):
        kube.delete_pod("serving", f"vllm-{i}")
    clock[0] += 10
    controller.reconcile()  # cool-down starts
    clock[0] += 61
    controller.reconcile()
    assert world["adapter"].placeholder_count("gcp-h100") == 1


def test_run_once_stops_after_one_round(world: dict[str, Any]) -> None:
    rounds: list[d.ControllerDecision] = []
    controller = runtime.Controller(FACTS, SETTINGS, world["observer"], dry_run=True)
    controller.run(threading.Event(), once=True, on_round=rounds.append)
    assert len(rounds) == 1


def test_a_failing_round_is_counted_and_the_loop_goes_on(world: dict[str, Any]) -> None:
    controller = runtime.Controller(FACTS, SETTINGS, world["observer"], dry_run=True)
    calls = []

    def broken() -> dict[str, d.PoolSample]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("malformed answer")
        stop.set()
        return {}

    stop = threading.Event()
    controller.observer.observe = broken  # type: ignore[method-assign]
    controller.settings = d.ControllerSettings(interval_s=0.01)
    controller.run(stop)
    assert len(calls) == 2
    assert "gpufleet_controller_reconcile_errors_total 1.0" in controller.metrics.render().decode()
