"""`gpufleet preview` on every example stack: offline, secrets masked, same plan as the declaration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gpufleet.infra import plan as plan_mod
from gpufleet.infra.cli import app
from gpufleet.infra.pulumi import preview

from .conftest import STACKS, compile_inline

runner = CliRunner()

# One controller per fleet (in the router's cluster), with its cluster-wide read-only role.
_CONTROLLER = {"gpufleet:controller:FailoverController": 1, "kubernetes:rbac.authorization.k8s.io/v1:ClusterRole": 1}
EXPECTED = {
    # Deployments: router, controller, warm-h100-ondemand (1 warm) and warm-h100-spot (0: the failover pool).
    "aws-eks": {
        "aws:eks/nodeGroup:NodeGroup": 2,
        "kubernetes:apps/v1:StatefulSet": 2,
        "pulumi:providers:aws": 1,
        "kubernetes:apps/v1:Deployment": 4,
        **_CONTROLLER,
    },
    "gcp-gke": {
        "gcp:container/nodePool:NodePool": 2,
        "gcp:container/cluster:Cluster": 1,
        "kubernetes:apps/v1:StatefulSet": 2,
        "kubernetes:apps/v1:Deployment": 4,
        **_CONTROLLER,
    },
    # Deployments: router, controller, warm-aws-h100, warm-gcp-h100.
    "multicloud": {
        "aws:eks/nodeGroup:NodeGroup": 1,
        "gcp:container/nodePool:NodePool": 1,
        "pulumi:providers:kubernetes": 2,
        "kubernetes:apps/v1:Deployment": 4,
        **_CONTROLLER,
    },
}


def _plan_of(stack: str) -> plan_mod.Plan:
    if stack == "multicloud":
        return plan_mod.compile_file(str(STACKS / stack / "fleet.yaml"))
    return compile_inline(stack)


@pytest.mark.parametrize("stack", sorted(EXPECTED))
def test_example_stack_previews_its_resources_and_the_plan_cost(stack):
    result = preview.preview_stack(STACKS / stack)
    counts: dict[str, int] = {}
    for r in result.resources:
        counts[r.type] = counts.get(r.type, 0) + 1
    for token, n in EXPECTED[stack].items():
        assert counts.get(token) == n, (token, counts)
    for token in (
        "gpufleet:fleet:Fleet",
        "gpufleet:warm:WarmCapacity",
        "gpufleet:model:ModelDeployment",
        "gpufleet:router:CacheAwareRouter",
    ):
        assert counts.get(token, 0) >= 1
    assert result.outputs["cost"] == _plan_of(stack).cost.model_dump(mode="json")
    assert result.outputs["router_endpoint"].startswith("http://")
    assert any("adminToken" in n for n in result.notes)
    # Every resource but the top component hangs under a parent that was registered.
    names = {r.name for r in result.resources}
    assert all(r.parent in names for r in result.resources if r.type != "gpufleet:fleet:Fleet")


def test_preview_cli_json_lists_type_name_parent_inputs():
    res = runner.invoke(app, ["preview", str(STACKS / "aws-eks"), "-o", "json"])
    assert res.exit_code == 0, res.output
    items = json.loads(res.stdout)
    assert all(set(i) == {"type", "name", "parent", "inputs"} for i in items)
    ng = [i for i in items if i["name"] == "gpufleet-h100-ondemand-nodegroup"][0]
    assert ng["parent"] == "gpufleet-h100-ondemand" and ng["inputs"]["amiType"] == "AL2023_x86_64_NVIDIA"


def test_preview_cli_tree_shows_the_controller_under_the_fleet():
    res = runner.invoke(app, ["preview", str(STACKS / "multicloud")])
    assert res.exit_code == 0, res.output
    assert "gpufleet:controller:FailoverController gpufleet-aws-controller" in res.output
    for kind in (
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
    ):
        assert f"{kind} gpufleet-aws-controller-{kind.lower()}" in res.output


def test_preview_cli_tree_shows_resources_and_cost():
    res = runner.invoke(app, ["preview", str(STACKS / "gcp-gke")])
    assert res.exit_code == 0, res.output
    assert "gcp:container/nodePool:NodePool" in res.output and "gpufleet-l4-spot-nodepool" in res.output
    assert "Plan cost" in res.output and "baseline" in res.output


def _copy_stack(tmp_path: Path, stack: str) -> Path:
    target = tmp_path / stack
    shutil.copytree(STACKS / stack, target)
    return target


def test_secret_values_never_appear_in_the_preview(tmp_path):
    d = _copy_stack(tmp_path, "aws-eks")
    settings = yaml.safe_load((d / "Pulumi.aws-eks.yaml").read_text())
    # A plaintext value here (never do this for real) must still come out masked, since
    # Pulumi.yaml declares adminToken secret.
    settings["config"]["gpufleet:adminToken"] = "very-secret-token-123"
    (d / "Pulumi.aws-eks.yaml").write_text(yaml.safe_dump(settings))
    res = runner.invoke(app, ["preview", str(d), "-o", "json"])
    assert res.exit_code == 0, res.output
    assert "very-secret-token-123" not in res.output
    secret = [i for i in json.loads(res.stdout) if i["type"] == "kubernetes:core/v1:Secret"][0]
    assert secret["inputs"]["stringData"] == "[secret]"


def test_encrypted_stack_values_are_previewed_as_secrets(tmp_path):
    d = _copy_stack(tmp_path, "gcp-gke")
    text = (d / "Pulumi.gcp-gke.yaml").read_text()
    (d / "Pulumi.gcp-gke.yaml").write_text(text + "  gpufleet:hfToken:\n    secure: v1:AAAA:BBBB\n")
    result = preview.preview_stack(d)
    sec = [
        r
        for r in result.resources
        if r.type == "kubernetes:core/v1:Secret" and r.inputs["metadata"]["name"] == "gke-llm-hf-token"
    ]
    assert sec and sec[0].inputs["stringData"] == "[secret]"
    assert any("hfToken is encrypted" in n for n in result.notes)


def test_invalid_inline_declaration_is_one_clear_error(tmp_path):
    d = _copy_stack(tmp_path, "aws-eks")
    settings = yaml.safe_load((d / "Pulumi.aws-eks.yaml").read_text())
    settings["config"]["gpufleet:fleet"]["nodepools"][1]["max_nodes"] = 0
    (d / "Pulumi.aws-eks.yaml").write_text(yaml.safe_dump(settings))
    res = runner.invoke(app, ["preview", str(d)])
    assert res.exit_code == 1
    assert "nodepools[1].max_nodes" in res.output and "Traceback" not in res.output


def test_bad_config_value_is_one_clear_error(tmp_path):
    d = _copy_stack(tmp_path, "multicloud")
    (d / "Pulumi.multicloud.yaml").write_text(
        "config:\n  gpufleet:fleetFile: fleet.yaml\n  gpufleet:routerServiceType: Ingress\n"
    )
    res = runner.invoke(app, ["preview", str(d)])
    assert res.exit_code == 1
    assert "gpufleet:routerServiceType" in res.output and "Traceback" not in res.output


def test_not_a_stack_directory_is_one_clear_error(tmp_path):
    res = runner.invoke(app, ["preview", str(tmp_path)])
    assert res.exit_code == 1
    assert "no Pulumi.yaml" in res.output


def test_previews_do_not_leak_state_between_runs():
    first = preview.preview_stack(STACKS / "gcp-gke")
    other = preview.preview_stack(STACKS / "aws-eks")
    again = preview.preview_stack(STACKS / "gcp-gke")
    assert [r.to_json() for r in first.resources] == [r.to_json() for r in again.resources]
    assert not {r.name for r in other.resources if r.type.startswith("gcp:")}
    assert first.stack == again.stack == "gcp-gke"
