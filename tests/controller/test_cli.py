"""`gpufleet controller run` through typer's CliRunner against the fake Kubernetes API server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpufleet.infra.cli import app
from tests.fakes.k8s_server import FakeKubernetes

POOL_A = {"gpufleet.io/pool": "a"}
POOL_B = {"gpufleet.io/pool": "b"}
PLAN = {
    "schema": "gpufleet.plan/v1",
    "fleet": "t",
    "namespace": "gpufleet",
    "clouds": {},
    "pools": [
        {
            "name": "a",
            "cloud": "kubernetes",
            "priority": 100,
            "min_nodes": 1,
            "baseline_nodes": 1,
            "warm_nodes": 0,
            "max_nodes": 1,
            "gpus_per_node": 8,
            "zones": [],
        },
        {
            "name": "b",
            "cloud": "kubernetes",
            "priority": 50,
            "min_nodes": 0,
            "baseline_nodes": 0,
            "warm_nodes": 1,
            "max_nodes": 3,
            "gpus_per_node": 8,
            "zones": [],
        },
    ],
    "deployments": [
        {
            "name": "m",
            "failover": ["a", "b"],
            "placement": [{"pool": "a", "replicas": 8}],
            "max_concurrent_requests": 64,
            "replicas": [],
        }
    ],
}


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[tuple[FakeKubernetes, Path, Path]]:
    server = FakeKubernetes()
    server.start()
    server.add_node("a1", labels=POOL_A, gpus=8)
    server.add_node("b1", labels=POOL_B, gpus=8)
    server.add_deployment(
        "warm-b",
        namespace="gpufleet",
        replicas=1,
        gpus_per_pod=8,
        labels={"app.kubernetes.io/component": "placeholder", **POOL_B},
        node_selector=POOL_B,
    )
    for i in range(7):
        server.add_pod(f"vllm-{i}", namespace="serving", gpus=1, node_selector=POOL_A)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "users": [{"name": "fake", "user": {"token": "t"}}],
            }
        )
    )
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(PLAN))
    try:
        yield server, kubeconfig, plan
    finally:
        server.stop()


def test_dry_run_once_prints_the_action_and_changes_nothing(kube: tuple[FakeKubernetes, Path, Path]) -> None:
    server, kubeconfig, plan = kube
    result = CliRunner().invoke(
        app, ["controller", "run", "--config", str(plan), "--kubeconfig", str(kubeconfig), "--once", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "(would)" in result.output and "set_placeholders" in result.output and "1 -> 2" in result.output
    assert server.deployments[("gpufleet", "warm-b")]["spec"]["replicas"] == 1


def test_once_applies_the_action(kube: tuple[FakeKubernetes, Path, Path]) -> None:
    server, kubeconfig, plan = kube
    result = CliRunner().invoke(app, ["controller", "run", "-c", str(plan), "--kubeconfig", str(kubeconfig), "--once"])
    assert result.exit_code == 0, result.output
    assert server.deployments[("gpufleet", "warm-b")]["spec"]["replicas"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--high-water", "0.4"], "low_water"),
        (["--kube-context", "aws"], "expected KEY=VALUE"),
        (["--router-metrics", "http://127.0.0.1:9/metrics", "--router-service", "r"], "give one"),
        (["--ttft-window-s", "0"], "--ttft-window-s"),
    ],
)
def test_bad_flags_are_one_line_errors(kube: tuple[FakeKubernetes, Path, Path], args: list[str], message: str) -> None:
    _, kubeconfig, plan = kube
    result = CliRunner().invoke(
        app, ["controller", "run", "-c", str(plan), "--kubeconfig", str(kubeconfig), "--once", *args]
    )
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_not_a_plan_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text('{"schema": "other"}')
    result = CliRunner().invoke(app, ["controller", "run", "-c", str(bad), "--once"])
    assert result.exit_code == 1 and "gpufleet.plan/v1" in result.output


def test_router_service_with_no_ready_pod_still_runs_the_round_and_says_so(
    kube: tuple[FakeKubernetes, Path, Path],
) -> None:
    server, kubeconfig, plan = kube
    result = CliRunner().invoke(
        app,
        [
            "controller",
            "run",
            "-c",
            str(plan),
            "--kubeconfig",
            str(kubeconfig),
            "--once",
            "--router-service",
            "f-router",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert "no ready router pod" in result.output  # GPU pressure alone decided this round
    assert server.deployments[("gpufleet", "warm-b")]["spec"]["replicas"] == 2
