"""The warm-capacity / failover controller as the Fleet installs it: plan ConfigMap, Deployment,
identity and the exact RBAC scope, under Pulumi's mocks."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pulumi
import pytest

from gpufleet.infra import manifests, names
from gpufleet.infra import plan as plan_mod
from gpufleet.infra.pulumi import (
    FailoverController,
    FailoverControllerArgs,
    Fleet,
    FleetArgs,
    preview,
    stack_config,
)

from .conftest import STACKS, inline_fleet

DEPLOY = "kubernetes:apps/v1:Deployment"
CM = "kubernetes:core/v1:ConfigMap"
SA = "kubernetes:core/v1:ServiceAccount"
CR = "kubernetes:rbac.authorization.k8s.io/v1:ClusterRole"
CRB = "kubernetes:rbac.authorization.k8s.io/v1:ClusterRoleBinding"
ROLE = "kubernetes:rbac.authorization.k8s.io/v1:Role"
RB = "kubernetes:rbac.authorization.k8s.io/v1:RoleBinding"
COMPONENT = "gpufleet:controller:FailoverController"
RBAC = (CR, CRB, ROLE, RB)


def _argv(reg: Any, name: str) -> list[str]:
    c = reg.one(DEPLOY, name).inputs["spec"]["template"]["spec"]["containers"][0]
    return c["command"] + c["args"]


def _flag(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_fleet_runs_the_controller_in_the_router_cluster_with_plan_probes_and_scrape_annotations(run, multicloud_plan):
    reg = run(lambda: Fleet("f", FleetArgs(admin_token="t", plan=multicloud_plan)))
    comp = reg.one(COMPONENT)
    assert comp.name == "f-aws-controller" and comp.parent == "f"
    dep = reg.one(DEPLOY, "llm-prod-controller")
    assert dep.parent == comp.name and "::f-aws-k8s::" in dep.provider
    assert dep.inputs["metadata"]["namespace"] == "gpufleet" and dep.inputs["spec"]["replicas"] == 1
    assert dep.inputs["spec"]["strategy"] == {"type": "Recreate"}
    argv = _argv(reg, "llm-prod-controller")
    assert argv[:5] == ["gpufleet", "controller", "run", "--config", "/etc/gpufleet/plan.json"]
    assert _flag(argv, "--metrics-port") == ["9102"] and _flag(argv, "--metrics-host") == ["0.0.0.0"]
    assert _flag(argv, "--router-service") == ["llm-prod-router"]  # every router pod, by its EndpointSlices
    # No cloud credentials configured: placeholders only, node scaling off.
    assert "--no-node-scaling" in argv
    pod = dep.inputs["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9102"
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    c = pod["spec"]["containers"][0]
    assert c["image"] == manifests.ManifestOptions().controller_image
    assert c["ports"] == [{"name": "metrics", "containerPort": 9102, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert {"name": "plan", "mountPath": "/etc/gpufleet", "readOnly": True} in c["volumeMounts"]
    assert {"name": "plan", "configMap": {"name": "llm-prod-controller"}} in pod["spec"]["volumes"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["securityContext"]["runAsNonRoot"] is True
    assert (
        pod["spec"]["serviceAccountName"] == "llm-prod-controller"
        and pod["spec"]["automountServiceAccountToken"] is True
    )
    # The GKE cluster gets no controller objects: no kubeconfig to reach it was configured.
    assert all(
        "::f-aws-k8s::" in r.provider for r in reg.resources if r.type in (DEPLOY, SA, *RBAC) and "controller" in r.name
    )


def test_controller_rbac_is_exactly_list_nodes_and_pods_and_scale_of_placeholders(run, multicloud_plan):
    reg = run(lambda: Fleet("f", FleetArgs(admin_token="t", plan=multicloud_plan)))
    cr = reg.one(CR, "llm-prod-controller").inputs
    assert "namespace" not in cr["metadata"]
    assert cr["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    ]
    role = reg.one(ROLE, "llm-prod-controller").inputs
    assert role["metadata"]["namespace"] == "gpufleet"
    sets = [f"{d.name}-{p}" for d in multicloud_plan.deployments for p in d.failover]
    assert role["rules"] == [
        {"apiGroups": ["apps"], "resources": ["deployments/scale"],
         "resourceNames": ["warm-aws-h100", "warm-gcp-h100"], "verbs": ["get", "patch"]},
        {"apiGroups": ["apps"], "resources": ["statefulsets"], "resourceNames": sets, "verbs": ["get"]},
        {"apiGroups": ["apps"], "resources": ["statefulsets/scale"], "resourceNames": sets, "verbs": ["patch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]},
    ]  # fmt: skip
    assert sets == ["llama-8b-aws-h100", "llama-8b-gcp-h100"]
    subject = [{"kind": "ServiceAccount", "name": "llm-prod-controller", "namespace": "gpufleet"}]
    crb = reg.one(CRB, "llm-prod-controller").inputs
    assert crb["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "llm-prod-controller",
    }
    assert crb["subjects"] == subject
    rb = reg.one(RB, "llm-prod-controller").inputs
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "llm-prod-controller"}
    assert rb["metadata"]["namespace"] == "gpufleet" and rb["subjects"] == subject
    # No wildcard anywhere, and no role of the fleet grants writes cluster-wide.
    for r in reg.resources:
        if r.type in (CR, ROLE):
            for rule in r.inputs["rules"]:
                assert "*" not in json.dumps(rule), rule
    assert not {v for rule in cr["rules"] for v in rule["verbs"]} - {"get", "list", "watch"}
    sa = reg.one(SA, "llm-prod-controller").inputs
    assert sa["automountServiceAccountToken"] is False and "annotations" not in sa["metadata"]


def _stack_plan(stack: str) -> plan_mod.Plan:
    """The stack's fleet compiled the way its program compiles it (same origin in `source`)."""
    if stack == "multicloud":
        return plan_mod.compile_file(str(STACKS / "multicloud" / "fleet.yaml"))
    return plan_mod.compile_data(inline_fleet(stack), "gpufleet:fleet")


@pytest.mark.parametrize("stack", ["multicloud", "aws-eks", "gcp-gke"])
def test_stack_preview_controller_configmap_holds_the_plan_json(stack):
    """The plan JSON the controller reads is the stack's compiled fleet, field for field."""
    result = preview.preview_stack(STACKS / stack)
    plan = _stack_plan(stack)
    cms = [r for r in result.resources if r.type == CM and r.inputs["metadata"]["name"] == f"{plan.fleet}-controller"]
    assert len(cms) == 1
    data = json.loads(cms[0].inputs["data"]["plan.json"])
    assert data == json.loads(json.dumps(plan.to_json_dict()))
    assert data["schema"] == "gpufleet.plan/v1" and data["fleet"] == plan.fleet


def test_irsa_role_annotates_the_service_account_and_turns_node_scaling_on(run, eks_plan):
    role = "arn:aws:iam::123456789012:role/gpufleet-controller"
    opts = manifests.ManifestOptions(controller_aws_role_arn=role, controller_provider_names={"h100-spot": "ng-spot"})
    cluster = manifests.clusters(eks_plan)[0]
    reg = run(lambda: FailoverController("c", FailoverControllerArgs(eks_plan, cluster, opts)))
    sa = reg.one(SA, "eks-llm-controller").inputs
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": role}
    argv = _argv(reg, "eks-llm-controller")
    assert "--no-node-scaling" not in argv
    assert _flag(argv, "--provider-name") == ["h100-spot=ng-spot"]
    assert sorted(r.type for r in reg.children("c")) == sorted([CM, SA, CR, CRB, ROLE, RB, DEPLOY])


def test_without_aws_credentials_the_controller_manages_placeholders_only(run, eks_plan):
    # A GKE Workload Identity setting cannot give a pod on EKS credentials: refused, not ignored.
    assert manifests.check_controller_options(
        eks_plan, manifests.ManifestOptions(controller_gcp_service_account="sa@p.iam.gserviceaccount.com")
    )
    argv = manifests.controller_args(eks_plan, manifests.ManifestOptions(controller_provider_names={"h100-spot": "ng"}))
    assert "--no-node-scaling" in argv and "--provider-name" not in argv


def test_workload_identity_on_gke_scales_only_the_named_instance_groups(run, gke_plan):
    gsa = "gpufleet-controller@acme-ml.iam.gserviceaccount.com"
    named = manifests.ManifestOptions(
        controller_gcp_service_account=gsa,
        controller_provider_names={"l4-ondemand": "gke-gpufleet-gke-l4-ondemand-1a2b3c4d-grp"},
    )
    cluster = manifests.clusters(gke_plan)[0]
    reg = run(lambda: FailoverController("c", FailoverControllerArgs(gke_plan, cluster, named)))
    assert reg.one(SA).inputs["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": gsa}
    argv = _argv(reg, "gke-llm-controller")
    assert _flag(argv, "--provider-name") == ["l4-ondemand=gke-gpufleet-gke-l4-ondemand-1a2b3c4d-grp"]
    assert "--no-node-scaling" not in argv
    # Credentials but no instance group named: nothing to resize, so placeholders only.
    unnamed = dataclasses.replace(named, controller_provider_names={})
    assert "--no-node-scaling" in manifests.controller_args(gke_plan, unnamed)


def test_kubeconfig_secret_reaches_the_other_cluster_with_its_own_service_account_and_rbac(run, multicloud_plan):
    opts = manifests.ManifestOptions(
        controller_kubeconfig_secret="controller-kubeconfig", controller_kube_contexts={"aws": "eks", "gcp": "gke"}
    )
    reg = run(lambda: Fleet("f", FleetArgs(admin_token="t", plan=multicloud_plan, options=opts)))
    comps = {r.name for r in reg.of_type(COMPONENT)}
    assert comps == {"f-aws-controller", "f-gcp-controller"}
    gcp_kinds = sorted(r.type for r in reg.children("f-gcp-controller"))
    assert gcp_kinds == sorted([SA, CR, CRB, ROLE, RB])
    assert all("::f-gcp-k8s::" in r.provider for r in reg.children("f-gcp-controller"))
    argv = _argv(reg, "llm-prod-controller")
    assert _flag(argv, "--kubeconfig") == ["/etc/gpufleet/kube/config"]
    assert _flag(argv, "--kube-context") == ["aws=eks", "gcp=gke"]
    pod = reg.one(DEPLOY, "llm-prod-controller").inputs["spec"]["template"]["spec"]
    assert {"name": "kubeconfig", "secret": {"secretName": "controller-kubeconfig"}} in pod["volumes"]


def test_the_controller_reads_the_router_pods_whatever_their_number(eks_plan):
    one = manifests.controller_args(eks_plan, manifests.ManifestOptions(router_replicas=1))
    many = manifests.controller_args(eks_plan, manifests.ManifestOptions(router_replicas=3))
    assert _flag(one, "--router-service") == _flag(many, "--router-service") == [names.router_name(eks_plan.fleet)]
    assert "--router-metrics" not in one + many  # one Service URL would reach one pod per scrape


def test_stack_config_turns_the_controller_off(run, eks_plan):
    def program():
        args = stack_config.read()
        pulumi.export("controller", args.options.controller)
        Fleet("f", FleetArgs(admin_token=args.admin_token, plan=eks_plan, options=args.options))

    config = {"gpufleet:adminToken": "t", "gpufleet:controller": "false", "gpufleet:fleetFile": "unused.yaml"}
    reg = run(program, config=config, secret_keys=["gpufleet:adminToken"])
    assert reg.result.outputs["controller"] is False
    assert not reg.of_type(COMPONENT)
    # What RBAC remains is the router's own (EndpointSlice discovery), none of it the controller's.
    assert not [r for r in reg.resources if "rbac" in r.type and "controller" in r.inputs["metadata"]["name"]]
    assert not [r for r in reg.of_type(DEPLOY) if r.inputs["metadata"]["name"] == "eks-llm-controller"]


@pytest.mark.parametrize(("value", "pods"), [(None, 2), ("1", 1), ("3", 3)])
def test_stack_config_runs_two_router_pods_with_a_pdb_by_default(run, eks_plan, value, pods):
    def program():
        args = stack_config.read()
        Fleet("f", FleetArgs(admin_token=args.admin_token, plan=eks_plan, options=args.options))

    config = {"gpufleet:adminToken": "t", "gpufleet:fleetFile": "unused.yaml"}
    if value is not None:
        config["gpufleet:routerReplicas"] = value
    reg = run(program, config=config, secret_keys=["gpufleet:adminToken"])
    router = reg.one(DEPLOY, names.router_name(eks_plan.fleet)).inputs
    assert router["spec"]["replicas"] == pods
    pdbs = reg.of_type("kubernetes:policy/v1:PodDisruptionBudget")
    assert [p.inputs["metadata"]["name"] for p in pdbs if "router" in p.inputs["metadata"]["name"]] == (
        [names.router_name(eks_plan.fleet)] if pods > 1 else []
    )
    anti = router["spec"]["template"]["spec"]["affinity"].get("podAntiAffinity")
    assert (anti is not None) == (pods > 1)


def test_stack_config_reads_controller_credentials_and_names(run, eks_plan):
    role = "arn:aws:iam::123456789012:role/ctl"

    def program():
        args = stack_config.read()
        Fleet("f", FleetArgs(admin_token=args.admin_token, plan=eks_plan, options=args.options))

    config = {
        "gpufleet:adminToken": "t", "gpufleet:fleetFile": "unused.yaml",
        "gpufleet:controllerImage": "registry.example/gpufleet-controller:1",
        "gpufleet:controllerAwsRoleArn": role,
        "gpufleet:controllerProviderNames": json.dumps({"h100-ondemand": "ng-od"}),
    }  # fmt: skip
    reg = run(program, config=config, secret_keys=["gpufleet:adminToken"])
    assert reg.one(SA, "eks-llm-controller").inputs["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": role}
    assert (
        reg.one(DEPLOY, "eks-llm-controller").inputs["spec"]["template"]["spec"]["containers"][0]["image"]
        == "registry.example/gpufleet-controller:1"
    )
    assert _flag(_argv(reg, "eks-llm-controller"), "--provider-name") == ["h100-ondemand=ng-od"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"gpufleet:controllerGcpServiceAccount": "x@p.iam.gserviceaccount.com"},
            "Workload Identity works only on GKE",
        ),
        (
            {"gpufleet:controllerProviderNames": json.dumps({"nope": "ng"})},
            "controllerProviderNames: no pool named nope",
        ),
        (
            {"gpufleet:controllerProviderNames": json.dumps(["h100-spot"])},
            "gpufleet:controllerProviderNames: expected an object",
        ),
        ({"gpufleet:controllerKubeContexts": json.dumps({"aws": "eks"})}, "needs controllerKubeconfigSecret"),
    ],
)
def test_controller_settings_that_cannot_work_fail_before_anything_is_registered(
    registrations, eks_plan, config, message
):
    def program():
        args = stack_config.read()
        Fleet("f", FleetArgs(admin_token=args.admin_token, plan=eks_plan, options=args.options))

    full = {"gpufleet:adminToken": "t", "gpufleet:fleetFile": "unused.yaml", **config}
    with pytest.raises(pulumi.RunError, match=message):
        preview.run_program(program, config=full, secret_keys=["gpufleet:adminToken"])
    assert registrations == [[]]  # not even the Fleet component
