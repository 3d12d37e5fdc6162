"""The controller as rendered: its objects validate, `render manifests` writes them, its command
line parses with the real CLI, and the real controller, run with that command line against a
fake API server that enforces the rendered RBAC, observes and warms pools with no request
denied and every granted right used (least privilege, checked rather than asserted)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from gpufleet.infra import manifests, names
from gpufleet.infra import plan as plan_mod
from gpufleet.infra.cli import app
from tests.fakes._http import HttpError, Request
from tests.fakes.k8s_server import FakeKubernetes

ROOT = Path(__file__).resolve().parents[2]
STACKS = ROOT / "stacks"
K8S_VERSION = "1.31"


def _eks_plan() -> plan_mod.Plan:
    data = yaml.safe_load((STACKS / "aws-eks" / "Pulumi.aws-eks.yaml").read_text())["config"]["gpufleet:fleet"]
    return plan_mod.compile_data(data, "aws-eks")


def _multicloud() -> plan_mod.Plan:
    return plan_mod.compile_file(str(STACKS / "multicloud" / "fleet.yaml"))


# ---------------------------------------------------------------------------------------
# RBAC as the API server applies it


def rbac_request(method: str, path: str, query: dict[str, str]) -> tuple[str, str, str, str | None, str | None]:
    """(verb, apiGroup, resource[/subresource], namespace, name) of an API request, as the API
    server's authorizer sees it."""
    parts = path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    namespace = None
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        namespace, rest = rest[1], rest[2:]
    resource, name = rest[0], (rest[1] if len(rest) > 1 else None)
    if len(rest) > 2:
        resource = f"{resource}/{rest[2]}"
    read = "watch" if query.get("watch") in ("true", "1") else ("get" if name else "list")
    verb = {"GET": read, "PATCH": "patch", "PUT": "update", "POST": "create", "DELETE": "delete"}[method]
    return verb, group, resource, namespace, name


def _rule_allows(rule: dict[str, Any], verb: str, group: str, resource: str, name: str | None) -> bool:
    names = rule.get("resourceNames")
    return (
        group in rule["apiGroups"]
        and resource in rule["resources"]
        and verb in rule["verbs"]
        and (not names or name in names)
    )


class RbacKubernetes(FakeKubernetes):
    """The stateful fake API server, answering 403 to what the given roles do not allow."""

    def __init__(self, cluster_role: dict[str, Any], role: dict[str, Any]) -> None:
        super().__init__()
        self.cluster_rules = cluster_role["rules"]
        self.role_rules = role["rules"]
        self.role_namespace = role["metadata"]["namespace"]
        self.denied: list[tuple[Any, ...]] = []
        self.used: set[tuple[str, str, str]] = set()  # (verb, group, resource) allowed and made
        self._routes = [(m, pattern, self._enforced(m, handler)) for m, pattern, handler in self._routes]

    def _enforced(self, method: str, handler: Any) -> Any:
        def guarded(req: Request) -> Any:
            verb, group, resource, ns, name = rbac_request(method, req.match.string, req.query)
            rules = list(self.cluster_rules) + (list(self.role_rules) if ns == self.role_namespace else [])
            if not any(_rule_allows(r, verb, group, resource, name) for r in rules):
                self.denied.append((verb, group, resource, ns, name))
                raise HttpError(
                    403,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "code": 403,
                        "reason": "Forbidden",
                        "message": f"{resource} is forbidden: cannot {verb}",
                    },
                )
            self.used.add((verb, group, resource))
            return handler(req)

        return guarded


def _kubeconfig(directory: Path, server: str) -> Path:
    """A kubeconfig whose one context is the fake API server, with a bearer token user."""
    path = directory / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "controller"}}],
        "users": [{"name": "controller", "user": {"token": "controller-token"}}],
    }))  # fmt: skip
    return path


@pytest.fixture
def eks_cluster(tmp_path: Path) -> Iterator[tuple[plan_mod.Plan, list[dict[str, Any]], RbacKubernetes, Path]]:
    """The aws-eks stack's cluster: its nodes, the rendered placeholders, and serving load on
    the preferred pool; the API server enforces the rendered controller RBAC."""
    plan = _eks_plan()
    objs = manifests.all_objects(plan)["aws-ml-prod"]
    controller = names.controller_name(plan.fleet)
    role = next(o for o in objs if o["kind"] == "Role" and o["metadata"]["name"] == controller)
    cluster_role = next(o for o in objs if o["kind"] == "ClusterRole" and o["metadata"]["name"] == controller)
    kube = RbacKubernetes(cluster_role, role)
    kube.start()
    try:
        for name, pool in (("od-1", "h100-ondemand"), ("od-2", "h100-ondemand"), ("spot-1", "h100-spot")):
            kube.add_node(name, labels={names.LABEL_POOL: pool}, gpus=8)
        for dep in (o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].startswith("warm-")):
            pod = dep["spec"]["template"]["spec"]
            kube.add_deployment(
                dep["metadata"]["name"],
                namespace=dep["metadata"]["namespace"],
                replicas=dep["spec"]["replicas"],
                labels=dep["spec"]["template"]["metadata"]["labels"],
                gpus_per_pod=int(pod["containers"][0]["resources"]["requests"]["nvidia.com/gpu"]),
                node_selector=pod["nodeSelector"],
            )
        # llama-70b at 4 GPUs a replica fills both on-demand nodes: the preferred pool is hot.
        for k in range(4):
            kube.add_pod(
                f"llama-70b-h100-ondemand-{k}",
                namespace=plan.namespace,
                gpus=4,
                labels={names.LABEL_POOL: "h100-ondemand"},
                node_selector={names.LABEL_POOL: "h100-ondemand"},
            )
        yield plan, objs, kube, _kubeconfig(tmp_path, kube.url)
    finally:
        kube.stop()


def _container_argv(objs: list[dict[str, Any]], plan: plan_mod.Plan) -> list[str]:
    dep = next(
        o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == names.controller_name(plan.fleet)
    )
    c = dep["spec"]["template"]["spec"]["containers"][0]
    return c["command"] + c["args"]


def _local_args(argv: list[str], plan_file: Path, kubeconfig: Path) -> list[str]:
    """The container's arguments, with the in-cluster bits swapped for local ones: the plan
    file path, a kubeconfig for the fake server, no metrics listener (`--router-service` stays:
    the router Service's EndpointSlices are listed under the rendered RBAC)."""
    args = list(argv[1:])
    out: list[str] = []
    skip = {"--metrics-port", "--metrics-host", "--router-metrics"}
    i = 0
    while i < len(args):
        if args[i] in skip:
            i += 2
            continue
        out.append(str(plan_file) if i > 0 and args[i - 1] == "--config" else args[i])
        i += 1
    return [*out, "--kubeconfig", str(kubeconfig), "--once"]


def test_controller_under_the_rendered_rbac_warms_the_failover_pool_with_every_right_used(eks_cluster, tmp_path):
    plan, objs, kube, kubeconfig = eks_cluster
    cm = next(
        o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == names.controller_name(plan.fleet)
    )
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(cm["data"]["plan.json"])  # exactly what the pod mounts
    # The placeholder of the failover pool exists, empty, only because it follows in the chain.
    assert kube.deployments[(plan.namespace, "warm-h100-spot")]["spec"]["replicas"] == 0
    # The rendered replica StatefulSets, one of them a replica short of the plan (a scale-down by
    # hand): the autoscaler brings it back to min_replicas. Their pods are the serving load above.
    sets = [o for o in objs if o["kind"] == "StatefulSet"]
    for i, sts in enumerate(sets):
        kube.add_statefulset(
            sts["metadata"]["name"],
            namespace=plan.namespace,
            replicas=sts["spec"]["replicas"] - (1 if i == 0 and sts["spec"]["replicas"] else 0),
            labels=sts["spec"]["selector"]["matchLabels"],
        )
    short = sets[0]["metadata"]["name"]

    res = CliRunner().invoke(app, _local_args(_container_argv(objs, plan), plan_file, kubeconfig))

    assert res.exit_code == 0, res.output
    assert kube.denied == []
    assert kube.deployments[(plan.namespace, "warm-h100-spot")]["spec"]["replicas"] == 1
    assert kube.statefulsets[(plan.namespace, short)]["spec"]["replicas"] == sets[0]["spec"]["replicas"]
    assert "h100-spot" in res.output and "set_placeholders" in res.output
    granted = {(verb, group, resource)
               for role in (o for o in objs if o["kind"] in ("ClusterRole", "Role")
                            and o["metadata"]["name"] == names.controller_name(plan.fleet))
               for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]
               for verb in rule["verbs"]}  # fmt: skip
    # Least privilege: every granted right was needed by this one round.
    assert (
        kube.used
        == granted
        == {
            ("list", "", "nodes"),
            ("list", "", "pods"),
            ("get", "apps", "deployments/scale"),
            ("patch", "apps", "deployments/scale"),
            ("get", "apps", "statefulsets"),
            ("patch", "apps", "statefulsets/scale"),
            ("list", "discovery.k8s.io", "endpointslices"),  # the router pods (none run in this fake)
        }
    )


def test_the_fake_really_enforces_the_rendered_rbac(eks_cluster):
    from kubernetes import client

    plan, _objs, kube, _kubeconfig = eks_cluster
    apps = client.AppsV1Api(kube.api_client())
    with pytest.raises(client.exceptions.ApiException) as info:
        apps.read_namespaced_deployment("warm-h100-spot", plan.namespace)  # the Deployment itself: not granted
    assert info.value.status == 403
    with pytest.raises(client.exceptions.ApiException) as info:
        # The scale of a model's StatefulSet-backed pods or the router: not a placeholder name.
        apps.patch_namespaced_deployment_scale("eks-llm-router", plan.namespace, {"spec": {"replicas": 0}})
    assert info.value.status == 403
    assert ("patch", "apps", "deployments/scale", plan.namespace, "eks-llm-router") in kube.denied


@pytest.mark.parametrize(
    ("plan_of", "options", "expected"),
    [
        (_multicloud, manifests.ManifestOptions(),
         {"node_scaling": False, "kubeconfig": None, "kube_contexts": {}, "provider_names": {},
          "router_metrics": None, "router_service": "llm-prod-router"}),
        (_multicloud, manifests.ManifestOptions(controller_kubeconfig_secret="kc", controller_kube_contexts={"aws": "a", "gcp": "g"}),
         {"kubeconfig": "/etc/gpufleet/kube/config", "kube_contexts": {"aws": "a", "gcp": "g"}}),
        (_eks_plan, manifests.ManifestOptions(controller_aws_role_arn="arn:aws:iam::1:role/c", controller_provider_names={"h100-spot": "ng"}),
         {"node_scaling": True, "provider_names": {"h100-spot": "ng"}}),
    ],
)  # fmt: skip
def test_rendered_controller_command_is_what_the_real_cli_wires(monkeypatch, plan_of, options, expected):
    """The container's exact command line, through the real `gpufleet controller run`: every
    flag exists and lands where the controller reads it (stopped before it connects anywhere)."""
    from gpufleet.infra.cli import _common
    from gpufleet.infra.cli import controller as controller_cli

    plan = plan_of()
    seen: dict[str, Any] = {}

    def load_plan(path: Path) -> dict[str, Any]:
        seen["config"] = path
        return plan.to_json_dict()

    def build_controller(p: dict[str, Any], **kw: Any) -> Any:
        seen.update(kw)
        raise _common.UserError("stopped before connecting")

    monkeypatch.setattr(controller_cli, "load_plan", load_plan)
    monkeypatch.setattr(controller_cli, "build_controller", build_controller)
    argv = _container_argv(manifests.all_objects(plan, options)[next(iter(manifests.all_objects(plan, options)))], plan)
    assert argv[0] == "gpufleet"
    res = CliRunner().invoke(app, argv[1:])
    assert res.exit_code == 1 and "stopped before connecting" in res.output, res.output
    assert seen["config"] == Path("/etc/gpufleet/plan.json") and seen["dry_run"] is False
    for key, value in expected.items():
        assert seen[key] == value, key
    # An unknown flag would have been refused by the same parser.
    assert CliRunner().invoke(app, [*argv[1:], "--no-such-flag"]).exit_code == 2


@pytest.mark.parametrize(
    "options",
    [
        manifests.ManifestOptions(),
        manifests.ManifestOptions(
            controller_kubeconfig_secret="kc", controller_kube_contexts={"aws": "eks", "gcp": "gke"}
        ),
        manifests.ManifestOptions(controller_aws_role_arn="arn:aws:iam::123456789012:role/c", router_replicas=2),
    ],
)
def test_controller_objects_validate_strictly_against_the_kubernetes_schema(options):
    objs = [o for g in manifests.all_objects(_multicloud(), options).values() for o in g]
    kinds = [o["kind"] for o in objs if o["metadata"]["name"] == "llm-prod-controller"]
    assert {
        "ConfigMap",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
    } <= set(kinds)
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_controller_configmap_holds_the_plan_json_of_the_fleet():
    plan = _multicloud()
    cm = manifests.controller_configmap(plan)
    assert json.loads(cm["data"]["plan.json"]) == json.loads(json.dumps(plan.to_json_dict()))
    # What the controller's own loader accepts.
    from gpufleet.infra.controller import decision

    facts = decision.FleetFacts.from_plan(json.loads(cm["data"]["plan.json"]))
    assert set(facts.pools) == {"aws-h100", "gcp-h100"}


def test_turning_the_controller_off_renders_none_of_it():
    objs = [
        o for g in manifests.all_objects(_multicloud(), manifests.ManifestOptions(controller=False)).values() for o in g
    ]
    router = names.router_name(_multicloud().fleet)  # the router's own Role (discovery) stays
    assert not [
        o
        for o in objs
        if "controller" in o["metadata"]["name"]
        or ((o["kind"].endswith("Role") or o["kind"].endswith("Binding")) and o["metadata"]["name"] != router)
    ]


def test_render_manifests_writes_the_controller_and_its_rbac(tmp_path):
    res = CliRunner().invoke(
        app, ["render", "manifests", str(STACKS / "multicloud" / "fleet.yaml"), "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    docs = list(yaml.safe_load_all((tmp_path / "aws-prod-eks.yaml").read_text()))
    mine = {(d["kind"], d["metadata"]["name"]) for d in docs if d["metadata"]["name"] == "llm-prod-controller"}
    assert mine == {
        (k, "llm-prod-controller")
        for k in (
            "ConfigMap",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Deployment",
        )
    }
    # Both placeholder Deployments, each in its own cluster.
    gcp = list(yaml.safe_load_all((tmp_path / "gcp-prod-gke.yaml").read_text()))
    assert [d["metadata"]["name"] for d in gcp if d["kind"] == "Deployment"] == ["warm-gcp-h100"]
    assert not [d for d in gcp if "controller" in d["metadata"]["name"]]


def test_render_manifests_can_leave_the_controller_out_or_change_its_image(tmp_path):
    fleet = str(STACKS / "multicloud" / "fleet.yaml")
    res = CliRunner().invoke(
        app, ["render", "manifests", fleet, "--out", str(tmp_path / "a"), "--controller-image", "reg.example/ctl:2"]
    )
    assert res.exit_code == 0, res.output
    docs = list(yaml.safe_load_all((tmp_path / "a" / "aws-prod-eks.yaml").read_text()))
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "llm-prod-controller")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.example/ctl:2"
    res = CliRunner().invoke(app, ["render", "manifests", fleet, "--out", str(tmp_path / "b"), "--no-controller"])
    assert res.exit_code == 0, res.output
    docs = list(yaml.safe_load_all((tmp_path / "b" / "aws-prod-eks.yaml").read_text()))
    assert not [d for d in docs if "controller" in d["metadata"]["name"]]


def test_in_cluster_controller_leaves_another_clusters_pool_alone_without_being_denied(tmp_path):
    """The multicloud fleet without a kubeconfig Secret: the controller in the EKS cluster asks
    about gcp-h100's placeholder there too. The Role names every pool, so the answer is 404
    (noted, no action) and not 403, which would fail the whole cluster's observation."""
    plan = _multicloud()
    objs = manifests.all_objects(plan)["aws-prod-eks"]
    kube = RbacKubernetes(
        next(o for o in objs if o["kind"] == "ClusterRole"),
        next(o for o in objs if o["kind"] == "Role" and o["metadata"]["name"] == names.controller_name(plan.fleet)),
    )
    kube.start()
    try:
        pool = {names.LABEL_POOL: "aws-h100"}
        for name in ("a1", "a2"):
            kube.add_node(name, labels=pool, gpus=8)
        kube.add_deployment(
            "warm-aws-h100",
            namespace=plan.namespace,
            replicas=1,
            gpus_per_pod=8,
            node_selector=pool,
            labels={"app.kubernetes.io/component": "placeholder", **pool},
        )
        for k in range(14):
            kube.add_pod(f"llama-8b-aws-h100-{k}", namespace=plan.namespace, gpus=1, labels=pool, node_selector=pool)
        kubeconfig = _kubeconfig(tmp_path, kube.url)
        plan_file = tmp_path / "plan.json"
        plan_file.write_text(manifests.controller_configmap(plan)["data"]["plan.json"])
        res = CliRunner().invoke(app, _local_args(_container_argv(objs, plan), plan_file, kubeconfig))
    finally:
        kube.stop()
    assert res.exit_code == 0, res.output
    assert kube.denied == []
    assert "aws-h100" in res.output and "88%" in res.output  # observed: 14 of 16 GPUs busy
    assert "gcp-h100: no action: no placeholder Deployment" in res.output
