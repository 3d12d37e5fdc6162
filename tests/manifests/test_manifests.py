"""The plan as Kubernetes objects: valid against the Kubernetes schemas, identical on the Pulumi
and GitOps paths, and addressable by the router exactly as the router config says."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import typer
import yaml
from typer.testing import CliRunner

from gpufleet.infra import manifests, names, router_config
from gpufleet.infra import plan as plan_mod
from gpufleet.infra.cli.render_manifests import register_manifests
from gpufleet.infra.pulumi import Fleet, FleetArgs
from gpufleet.infra.pulumi.mocks import sanitize
from gpufleet.infra.pulumi.preview import run_program
from gpufleet.router.config import RouterConfig

ROOT = Path(__file__).resolve().parents[2]
STACKS = ROOT / "stacks"
K8S_VERSION = "1.31"


def _inline(stack: str) -> plan_mod.Plan:
    data = yaml.safe_load((STACKS / stack / f"Pulumi.{stack}.yaml").read_text())["config"]["gpufleet:fleet"]
    return plan_mod.compile_data(data, stack)


PLANS = {
    "multicloud": lambda: plan_mod.compile_file(str(STACKS / "multicloud" / "fleet.yaml")),
    "aws-eks": lambda: _inline("aws-eks"),
    "gcp-gke": lambda: _inline("gcp-gke"),
}


@pytest.fixture(scope="module", params=sorted(PLANS))
def plan(request) -> plan_mod.Plan:
    return PLANS[request.param]()


def test_every_object_validates_against_the_kubernetes_schema(plan):
    objs = [o for group in manifests.all_objects(plan).values() for o in group]
    assert objs
    for obj in objs:
        # strict: unknown fields are errors, so a typo'd field cannot pass.
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_schema_validation_catches_a_wrong_field(plan):
    sts = next(o for g in manifests.all_objects(plan).values() for o in g if o["kind"] == "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["startupProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)


def test_replica_pods_are_the_plan_replica_ids_at_the_router_config_urls(plan):
    """StatefulSet `<dep>-<pool>` with serviceName `<dep>` names its pods `<dep>-<pool>-<k>`,
    resolvable as `<pod>.<dep>.<ns>.svc.cluster.local`: exactly the router config's replicas."""
    objs = [o for g in manifests.all_objects(plan).values() for o in g]
    pods = {}
    for sts in (o for o in objs if o["kind"] == "StatefulSet"):
        for k in range(sts["spec"]["replicas"]):
            pods[f"{sts['metadata']['name']}-{k}"] = sts
    cfg = manifests.router_config(plan)
    disc = cfg.discovery.kubernetes
    targets = {(t.deployment, t.pool) for t in disc.targets} if disc is not None else set()
    listed = {r.id for r in cfg.replicas}
    assert listed <= set(pods)
    for pod, sts in pods.items():
        labels = sts["spec"]["template"]["metadata"]["labels"]
        key = (labels[names.LABEL_DEPLOYMENT], labels[names.LABEL_POOL])
        # Every baseline pod is either listed (another cluster) or discovered (the router's own).
        assert (pod in listed) != (key in targets), pod
        if key in targets:
            # Its (deployment, pool) Service selects it, and its slices carry the labels discovery reads.
            svc = next(
                o
                for o in objs
                if o["kind"] == "Service"
                and o["metadata"]["name"] == sts["metadata"]["name"]
                and o["metadata"]["namespace"] == sts["metadata"]["namespace"]
            )
            assert svc["spec"]["selector"].items() <= labels.items()
            svc_labels = svc["metadata"]["labels"]
            assert (svc_labels[disc.deployment_label], svc_labels[disc.pool_label]) == key
            assert svc_labels[names.LABEL_FLEET] == plan.fleet and disc.namespace == plan.namespace
    home = manifests.router_cluster(plan)
    for r in cfg.replicas:
        sts = pods[r.id]
        svc = sts["spec"]["serviceName"]
        host = re.match(r"http://([^:]+):(\d+)$", r.url)
        assert host is not None
        local = f"{r.id}.{svc}.{plan.namespace}.svc.cluster.local"
        assert host.group(1) == local or (host.group(1).endswith(".svc.clusterset.local") and home is not None)
        assert int(host.group(2)) == sts["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
        # The headless Service selects the pod.
        service = next(
            o
            for o in objs
            if o["kind"] == "Service"
            and o["metadata"]["name"] == svc
            and o["metadata"]["namespace"] == sts["metadata"]["namespace"]
        )
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def test_router_configmap_holds_the_rendered_router_config(plan):
    cm = next(
        o
        for g in manifests.all_objects(plan).values()
        for o in g
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-router")
    )
    got = RouterConfig.model_validate(yaml.safe_load(cm["data"]["router.yaml"]))
    every = router_config.render(plan, lambda r: manifests.replica_url(plan, r))
    disc = got.discovery.kubernetes
    found = {t.pool for t in disc.targets} if disc is not None else set()
    # Listed: the replicas outside the router's cluster, exactly as the one renderer writes them.
    assert got.replicas == [r for r in every.replicas if r.pool not in found]
    assert got.settings == every.settings and got.fleet == every.fleet
    # Discovered: what the plan says of each (deployment, pool), the same facts a listed replica carries.
    for r in every.replicas:
        if r.pool in found:
            t = next(t for t in disc.targets if (t.deployment, t.pool) == (r.deployment, r.pool))
            facts = ("model", "priority", "kv_capacity_tokens", "max_model_len", "max_concurrent_requests")
            assert [getattr(t, f) for f in facts] == [getattr(r, f) for f in facts]


def test_pulumi_registers_exactly_the_rendered_objects():
    """The Fleet component and `render manifests` share the builders: same objects, field for field."""
    plan = PLANS["multicloud"]()
    result = run_program(lambda: Fleet("f", FleetArgs(admin_token="t", plan=plan)))
    registered = {}
    for r in result.resources:
        if r.type.startswith("kubernetes:") and r.type != "kubernetes:core/v1:Secret":
            cluster = "aws" if "::f-aws-k8s::" in (r.provider or "") else "gcp"
            registered[
                (cluster, r.inputs["kind"], r.inputs["metadata"].get("namespace"), r.inputs["metadata"]["name"])
            ] = r.inputs
    rendered = {}
    for key, objs in manifests.all_objects(plan).items():
        for o in objs:
            rendered[(key.split("-")[0], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])] = sanitize(
                o
            )
    assert registered.keys() == rendered.keys()
    for k in rendered:
        assert registered[k] == rendered[k], k


def test_secondary_cluster_replicas_use_multi_cluster_dns():
    plan = PLANS["multicloud"]()
    gcp_replica = plan_mod.ReplicaPlan(
        id="llama-8b-gcp-h100-0", deployment="llama-8b", pool="gcp-h100", priority=50, index=0
    )
    assert (
        manifests.replica_url(plan, gcp_replica)
        == "http://llama-8b-gcp-h100-0.prod-gke.llama-8b.gpufleet.svc.clusterset.local:8000"
    )


def _cli() -> typer.Typer:
    app = typer.Typer()
    sub = typer.Typer()
    register_manifests(sub)
    app.add_typer(sub, name="render")
    return app


def test_render_manifests_writes_one_file_per_cluster_with_the_objects(tmp_path):
    res = CliRunner().invoke(
        _cli(), ["render", "manifests", str(STACKS / "multicloud" / "fleet.yaml"), "--out", str(tmp_path / "out")]
    )
    assert res.exit_code == 0, res.output
    plan = PLANS["multicloud"]()
    expected = manifests.all_objects(plan)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{k}.yaml" for k in expected)
    for key, objs in expected.items():
        docs = list(yaml.safe_load_all((tmp_path / "out" / f"{key}.yaml").read_text()))
        assert docs == objs
    assert "create secret generic llm-prod-router-admin" in res.output


def test_render_manifests_reports_a_bad_declaration_in_one_line(tmp_path):
    bad = tmp_path / "fleet.yaml"
    bad.write_text(
        (STACKS / "multicloud" / "fleet.yaml")
        .read_text()
        .replace("max_nodes: 4\n    warm_nodes: 1\n  - name: gcp", "max_nodes: 0\n    warm_nodes: 1\n  - name: gcp")
    )
    res = CliRunner().invoke(_cli(), ["render", "manifests", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "nodepools[0].max_nodes" in res.output and "fleet.yaml:" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("token", "env_name", "mount"),
    [
        ({"env": "ROUTER_ADMIN"}, "ROUTER_ADMIN", None),
        ({"secret": "my-admin"}, "GPUFLEET_ADMIN_TOKEN", None),
        ({"file": "/run/admin/token"}, None, "/run/admin/token"),
    ],
)
def test_router_reads_the_admin_token_where_its_settings_say(token, env_name, mount):
    data = yaml.safe_load((STACKS / "multicloud" / "fleet.yaml").read_text())
    data["router"]["admin_token"] = token
    plan = plan_mod.compile_data(data)
    dep = manifests.router_deployment(plan)
    kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    secret_name = token.get("secret", "llm-prod-router-admin")
    # Every router replica shares the session-token key, from the same Secret (optional: no key, no tokens).
    session = {"secretKeyRef": {"name": secret_name, "key": "session-key", "optional": True}}
    assert {"name": "GPUFLEET_SESSION_SECRET", "valueFrom": session} in c["env"]
    if env_name:
        admin = [e for e in c["env"] if e["name"] != "GPUFLEET_SESSION_SECRET"]
        assert admin == [{"name": env_name, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": "token"}}}]
    else:
        assert {"name": "admin-token", "mountPath": mount, "subPath": "token", "readOnly": True} in c["volumeMounts"]
        assert {"name": "admin-token", "secret": {"secretName": secret_name}} in dep["spec"]["template"]["spec"][
            "volumes"
        ]


def test_render_manifests_hf_token_secret_is_a_reference_never_a_value(tmp_path):
    out = tmp_path / "o"
    res = CliRunner().invoke(
        _cli(),
        [
            "render",
            "manifests",
            str(STACKS / "multicloud" / "fleet.yaml"),
            "--out",
            str(out),
            "--hf-token-secret",
            "hf-gated",
        ],
    )
    assert res.exit_code == 0, res.output
    objs = [o for f in sorted(out.glob("*.yaml")) for o in yaml.safe_load_all(f.read_text()) if o]
    engines = [o for o in objs if o["kind"] == "StatefulSet"]
    assert engines
    for sts in engines:
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)
        env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["HF_TOKEN"] == {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "hf-gated", "key": "token"}},
        }
    assert not [o for o in objs if o["kind"] == "Secret"]  # the value is never written
    bad = CliRunner().invoke(
        _cli(),
        [
            "render",
            "manifests",
            str(STACKS / "multicloud" / "fleet.yaml"),
            "--out",
            str(out),
            "--hf-token-secret",
            "Bad_Name",
        ],
    )
    assert bad.exit_code == 1 and "--hf-token-secret" in bad.output


def test_two_router_pods_by_default_with_a_pdb_and_spread_over_nodes():
    plan = PLANS["multicloud"]()
    one = manifests.router_objects(plan, manifests.ManifestOptions(router_replicas=1))
    assert not [o for o in one if o["kind"] == "PodDisruptionBudget"]
    two = manifests.router_objects(plan)  # the default
    assert next(o for o in two if o["kind"] == "Deployment")["spec"]["replicas"] == 2
    pdb = next(o for o in two if o["kind"] == "PodDisruptionBudget")
    dep = next(o for o in two if o["kind"] == "Deployment")
    for obj in (pdb, dep):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    affinity = dep["spec"]["template"]["spec"]["affinity"]
    term = affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    assert "nodeAffinity" in affinity  # still off the GPU nodes


@pytest.mark.parametrize(
    ("options", "volume", "claim"),
    [
        (manifests.ManifestOptions(), {"name": "cache", "emptyDir": {}}, None),
        (
            manifests.ManifestOptions(model_cache_host_path="/var/lib/gpufleet/models"),
            {"name": "cache", "hostPath": {"path": "/var/lib/gpufleet/models", "type": "DirectoryOrCreate"}},
            None,
        ),
        (manifests.ManifestOptions(model_cache_storage_class="gp3", model_cache_size="300Gi"), None, ("gp3", "300Gi")),
    ],
)
def test_model_cache_is_an_emptydir_a_host_path_or_a_claim_per_replica(options, volume, claim):
    plan = PLANS["multicloud"]()
    dep = plan.deployments[0]
    sts = manifests.model_statefulset(plan, dep, plan.pool(dep.failover[0]), options)
    kubernetes_validate.validate(sts, K8S_VERSION, strict=True)
    pod = sts["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["cache"] == "/cache"
    cache = [v for v in pod["volumes"] if v["name"] == "cache"]
    assert cache == ([volume] if volume else [])
    claims = {c["metadata"]["name"]: c["spec"] for c in sts["spec"].get("volumeClaimTemplates", [])}
    if claim is None:
        assert "cache" not in claims
    else:
        assert claims["cache"]["storageClassName"] == claim[0]
        assert claims["cache"]["resources"]["requests"]["storage"] == claim[1]


def test_render_manifests_model_cache_options(tmp_path):
    fleet = str(STACKS / "multicloud" / "fleet.yaml")
    out = tmp_path / "o"
    res = CliRunner().invoke(
        _cli(), ["render", "manifests", fleet, "--out", str(out), "--model-cache-storage-class", "gp3"]
    )
    assert res.exit_code == 0, res.output
    objs = [o for f in sorted(out.glob("*.yaml")) for o in yaml.safe_load_all(f.read_text()) if o]
    for sts in (o for o in objs if o["kind"] == "StatefulSet"):
        claims = {c["metadata"]["name"]: c for c in sts["spec"]["volumeClaimTemplates"]}
        assert claims["cache"]["spec"]["storageClassName"] == "gp3"
    both = CliRunner().invoke(
        _cli(),
        [
            "render",
            "manifests",
            fleet,
            "--out",
            str(out),
            "--model-cache-storage-class",
            "gp3",
            "--model-cache-host-path",
            "/x",
        ],
    )
    assert both.exit_code == 1 and "give one of them" in both.output
