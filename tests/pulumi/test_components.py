"""Each Pulumi component under Pulumi's mocks: the properties that matter, asserted on what it registers."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from gpufleet.infra import manifests, router_config
from gpufleet.infra import plan as plan_mod
from gpufleet.infra.pulumi import (
    CacheAwareRouter,
    CacheAwareRouterArgs,
    FailoverPriorities,
    FailoverPrioritiesArgs,
    Fleet,
    FleetArgs,
    GpuNodepool,
    GpuNodepoolArgs,
    InvalidFleet,
    ModelDeployment,
    ModelDeploymentArgs,
    WarmCapacity,
    WarmCapacityArgs,
)

NG = "aws:eks/nodeGroup:NodeGroup"
NP = "gcp:container/nodePool:NodePool"
STS = "kubernetes:apps/v1:StatefulSet"
DEPLOY = "kubernetes:apps/v1:Deployment"
CM = "kubernetes:core/v1:ConfigMap"
PC = "kubernetes:scheduling.k8s.io/v1:PriorityClass"

LAB_FLEET: dict[str, Any] = {
    "fleet": "lab",
    "clouds": {"kubernetes": {"context": "lab-cluster"}},
    "nodepools": [
        {
            "name": "lab-a100",
            "cloud": "kubernetes",
            "instance_type": "dgx-a100",
            "gpu": "A100-80GB",
            "gpus_per_node": 4,
            "priority": 10,
            "min_nodes": 1,
            "max_nodes": 3,
            "warm_nodes": 1,
        },
    ],  # fmt: skip
    "deployments": [
        {
            "name": "small",
            "model": "Qwen/Qwen3-8B",
            "engine": "sglang",
            "min_replicas": 2,
            "max_replicas": 4,
            "max_model_len": 8192,
        }
    ],
}


def _pool(plan: plan_mod.Plan, name: str) -> plan_mod.PoolPlan:
    return plan.pool(name)


def test_aws_nodepool_is_an_eks_node_group_with_gpu_ami_scaling_labels_and_gpu_taint(run, eks_plan):
    pool = _pool(eks_plan, "h100-ondemand")
    reg = run(
        lambda: GpuNodepool(
            "np",
            GpuNodepoolArgs(
                eks_plan, pool, cluster_name="ml-prod", node_role_arn="arn:role", subnet_ids=["s-1", "s-2"]
            ),
        )
    )
    comp = reg.one("gpufleet:nodepool:GpuNodepool", "np")
    ng = reg.one(NG)
    assert ng.parent == comp.name and ng.name == "np-nodegroup"
    i = ng.inputs
    assert i["amiType"] == "AL2023_x86_64_NVIDIA"
    assert i["instanceTypes"] == ["p5.48xlarge"]
    assert i["capacityType"] == "ON_DEMAND"
    assert i["scalingConfig"] == {
        "minSize": pool.min_nodes,
        "desiredSize": pool.baseline_nodes + pool.warm_nodes,
        "maxSize": pool.max_nodes,
    }
    assert i["scalingConfig"]["desiredSize"] == 2  # 1 baseline + 1 warm
    assert i["subnetIds"] == ["s-1", "s-2"] and i["clusterName"] == "ml-prod" and i["nodeRoleArn"] == "arn:role"
    assert i["labels"]["gpufleet.io/pool"] == "h100-ondemand" and i["labels"]["gpufleet.io/priority"] == "100"
    assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"} in i["taints"]


def test_aws_spot_pool_uses_spot_capacity(run, eks_plan):
    reg = run(
        lambda: GpuNodepool(
            "np",
            GpuNodepoolArgs(
                eks_plan, _pool(eks_plan, "h100-spot"), cluster_name="c", node_role_arn="r", subnet_ids=["s"]
            ),
        )
    )
    i = reg.one(NG).inputs
    assert i["capacityType"] == "SPOT"
    assert i["scalingConfig"] == {"minSize": 0, "desiredSize": 0, "maxSize": 4}


def test_gcp_nodepool_has_accelerators_with_driver_autoscaling_spot_and_zones(run, gke_plan):
    pool = _pool(gke_plan, "l4-spot")
    reg = run(lambda: GpuNodepool("np", GpuNodepoolArgs(gke_plan, pool, cluster_name="gke", project="acme-ml")))
    i = reg.one(NP).inputs
    nc = i["nodeConfig"]
    assert nc["machineType"] == "g2-standard-24" and nc["spot"] is True
    assert nc["guestAccelerators"] == [
        {"type": "nvidia-l4", "count": 2, "gpuDriverInstallationConfig": {"gpuDriverVersion": "LATEST"}}
    ]
    assert (
        i["autoscaling"]["totalMinNodeCount"] == pool.min_nodes
        and i["autoscaling"]["totalMaxNodeCount"] == pool.max_nodes
    )
    assert i["nodeLocations"] == ["us-central1-a", "us-central1-b"]
    assert i["location"] == "us-central1" and i["cluster"] == "gke" and i["project"] == "acme-ml"
    assert nc["labels"]["gpufleet.io/pool"] == "l4-spot" and nc["labels"]["gpufleet.io/priority"] == "100"
    assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"} in nc["taints"]


def test_existing_cluster_pool_creates_no_nodes(run):
    plan = plan_mod.compile_data(LAB_FLEET)
    reg = run(lambda: GpuNodepool("np", GpuNodepoolArgs(plan, plan.pool("lab-a100"))))
    assert [r.type for r in reg.resources] == ["gpufleet:nodepool:GpuNodepool"]


def test_warm_capacity_holds_whole_nodes_with_lowest_non_preempting_priority(run, multicloud_plan):
    pools = list(multicloud_plan.pools)
    reg = run(lambda: WarmCapacity("warm", WarmCapacityArgs(multicloud_plan, pools)))
    low = reg.one(PC, "llm-prod-placeholder").inputs
    high = reg.one(PC, "llm-prod-serving").inputs
    assert low["value"] == -10 and low["preemptionPolicy"] == "Never"
    assert high["value"] > low["value"]
    for pool in pools:
        d = reg.one(DEPLOY, f"warm-{pool.name}")
        assert d.parent == "warm"
        spec_ = d.inputs["spec"]
        assert spec_["replicas"] == pool.warm_nodes == 1
        pod = spec_["template"]["spec"]
        assert pod["priorityClassName"] == "llm-prod-placeholder"
        assert pod["nodeSelector"] == {"gpufleet.io/pool": pool.name}
        res = pod["containers"][0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == str(pool.gpus_per_node) == "8"
        assert {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]


def test_warm_capacity_renders_placeholders_for_warm_pools_and_later_failover_pools(run, eks_plan):
    """h100-spot declares no warm nodes but follows h100-ondemand in llama-70b's failover chain:
    it gets an empty placeholder Deployment, which the controller scales to warm it."""
    assert eks_plan.deployment("llama-70b").failover == ["h100-ondemand", "h100-spot"]
    reg = run(lambda: WarmCapacity("warm", WarmCapacityArgs(eks_plan, list(eks_plan.pools))))
    replicas = {r.inputs["metadata"]["name"]: r.inputs["spec"]["replicas"] for r in reg.of_type(DEPLOY)}
    assert replicas == {"warm-h100-ondemand": 1, "warm-h100-spot": 0}


def test_warm_capacity_skips_pools_neither_warm_nor_in_a_failover_chain(run):
    spare = {**LAB_FLEET["nodepools"][0], "name": "lab-spare", "priority": 5, "warm_nodes": 0, "min_nodes": 0}
    fleet_ = {
        **LAB_FLEET,
        "nodepools": [{**LAB_FLEET["nodepools"][0], "warm_nodes": 0}, spare],
        "deployments": [{**LAB_FLEET["deployments"][0], "nodepools": ["lab-a100"]}],
    }
    plan = plan_mod.compile_data(fleet_)
    assert plan.deployment("small").failover == ["lab-a100"]
    reg = run(lambda: WarmCapacity("warm", WarmCapacityArgs(plan, list(plan.pools))))
    assert not reg.of_type(DEPLOY)
    assert manifests.placeholder_pools(plan, plan.pools) == []


def test_failover_priorities_map_pool_priorities_to_node_group_patterns(run, eks_plan):
    cluster = manifests.clusters(eks_plan)[0]
    opts = manifests.ManifestOptions(autoscaler_namespace="autoscaling")
    reg = run(lambda: FailoverPriorities("fo", FailoverPrioritiesArgs(eks_plan, cluster, opts)))
    cm = reg.one(CM)
    assert cm.inputs["metadata"]["name"] == "cluster-autoscaler-priority-expander"
    assert cm.inputs["metadata"]["namespace"] == "autoscaling"
    prios = yaml.safe_load(cm.inputs["data"]["priorities"])
    assert list(prios) == [100, 50]
    import re

    assert re.match(prios[100][0], "eks-eks-llm-h100-ondemand-4ac6f1a2-0b1c-7d2e-9f00-123456789abc")
    assert not re.match(prios[100][0], "eks-eks-llm-h100-spot-4ac6f1a2-0b1c-7d2e-9f00-123456789abc")
    assert re.match(prios[50][0], "eks-eks-llm-h100-spot-4ac6f1a2-0b1c-7d2e-9f00-123456789abc")


def test_model_deployment_vllm_replicas_flags_gpus_probes_and_priority(run, eks_plan):
    dep = eks_plan.deployment("llama-70b")
    cluster = manifests.clusters(eks_plan)[0]
    reg = run(lambda: ModelDeployment("m", ModelDeploymentArgs(eks_plan, dep, cluster)))
    main = reg.one(STS, "llama-70b-h100-ondemand").inputs
    spare = reg.one(STS, "llama-70b-h100-spot").inputs
    assert main["spec"]["replicas"] == dep.min_replicas == 2 and spare["spec"]["replicas"] == 0
    pod = main["spec"]["template"]["spec"]
    c = pod["containers"][0]
    argv = c["command"] + c["args"]
    assert argv[:3] == ["vllm", "serve", "meta-llama/Llama-3.1-70B-Instruct"]
    for flag, value in [("--max-model-len", "32768"), ("--tensor-parallel-size", "4"), ("--port", "8000"),
                        ("--gpu-memory-utilization", "0.9"), ("--max-num-seqs", "256")]:  # fmt: skip
        assert argv[argv.index(flag) + 1] == value
    assert "--enable-prefix-caching" in argv
    # Half a p5.48xlarge (4 of 8 GPUs) of what the node leaves to pods; the memory limit is the request.
    res = min((pp.resources for pp in dep.pools), key=lambda r: r.memory_mib)
    assert c["resources"] == {
        "requests": {"nvidia.com/gpu": "4", "cpu": f"{res.cpu_millicores}m", "memory": f"{res.memory_mib}Mi"},
        "limits": {"nvidia.com/gpu": "4", "memory": f"{res.memory_mib}Mi"},
    }
    assert res.memory_mib == res.node_memory_mib // 2
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    assert pod["priorityClassName"] == "eks-llm-serving"
    assert {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    prefs = pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    order = [p["preference"]["matchExpressions"][0]["values"][0] for p in prefs]
    weights = [p["weight"] for p in prefs]
    assert (
        order == ["h100-ondemand", "h100-spot"] and weights == sorted(weights, reverse=True) and weights[0] > weights[1]
    )
    # The spot StatefulSet never climbs above its own pool's priority.
    spare_pref = spare["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert spare_pref["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["h100-spot"]
    svc = reg.one("kubernetes:core/v1:Service", "llama-70b").inputs
    assert svc["spec"]["clusterIP"] == "None"
    assert main["spec"]["serviceName"] == "llama-70b"
    pdb = reg.one("kubernetes:policy/v1:PodDisruptionBudget", "llama-70b").inputs
    assert pdb["spec"]["selector"]["matchLabels"]["gpufleet.io/deployment"] == "llama-70b"


def test_model_deployment_sglang_flags(run, gke_plan):
    dep = gke_plan.deployment("qwen3-8b")
    cluster = manifests.clusters(gke_plan)[0]
    reg = run(lambda: ModelDeployment("m", ModelDeploymentArgs(gke_plan, dep, cluster)))
    c = reg.one(STS, "qwen3-8b-l4-spot").inputs["spec"]["template"]["spec"]["containers"][0]
    argv = c["command"] + c["args"]
    assert argv[:3] == ["python3", "-m", "sglang.launch_server"]
    for flag, value in [("--model-path", "Qwen/Qwen3-8B"), ("--context-length", "32768"), ("--tp-size", "1"),
                        ("--port", "8000"), ("--mem-fraction-static", "0.9"), ("--max-running-requests", "256"),
                        ("--host", "0.0.0.0")]:  # fmt: skip
        assert argv[argv.index(flag) + 1] == value
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"


def test_router_configmap_equals_the_rendered_router_config(run, multicloud_plan):
    reg = run(lambda: CacheAwareRouter("r", CacheAwareRouterArgs(multicloud_plan, admin_token="tok-abc")))
    cm = reg.one(CM, "llm-prod-router")
    expected = manifests.router_config(multicloud_plan)  # the one builder `render manifests` uses too
    got = yaml.safe_load(cm.inputs["data"]["router.yaml"])
    assert got == expected.model_dump(mode="json", by_alias=True)
    # The router's own cluster (EKS) is discovered by EndpointSlices, every pool of it; the GKE
    # pool's replicas stay listed at their Multi-Cluster DNS names (none in the baseline).
    every = router_config.render(multicloud_plan, lambda r: manifests.replica_url(multicloud_plan, r))
    aws = {p.name for p in multicloud_plan.pools if p.cloud == "aws"}
    assert got["replicas"] == [r.model_dump(mode="json") for r in every.replicas if r.pool not in aws]
    targets = got["discovery"]["kubernetes"]["targets"]
    assert {(t["deployment"], t["pool"]) for t in targets} == {
        (d.name, p) for d in multicloud_plan.deployments for p in d.failover if p in aws
    }


def test_router_runs_serve_with_admin_token_from_secret_probes_and_scrape_annotations(run, multicloud_plan):
    reg = run(lambda: CacheAwareRouter("r", CacheAwareRouterArgs(multicloud_plan, admin_token="tok-abc")))
    secret = reg.one("kubernetes:core/v1:Secret")
    assert secret.inputs["stringData"] == "[secret]"
    assert "tok-abc" not in json.dumps([r.to_json() for r in reg.resources])
    d = reg.one(DEPLOY, "llm-prod-router").inputs["spec"]["template"]
    c = d["spec"]["containers"][0]
    assert c["command"] + c["args"][:4] == ["gpufleet", "router", "serve", "--config", "/etc/gpufleet/router.yaml"]
    env = {e["name"]: e for e in c["env"]}
    assert env["GPUFLEET_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "llm-prod-router-admin", "key": "token"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    ann = d["metadata"]["annotations"]
    assert (
        ann["prometheus.io/scrape"] == "true"
        and ann["prometheus.io/path"] == "/metrics"
        and ann["prometheus.io/port"] == "8080"
    )


def test_router_rbac_is_exactly_get_list_watch_of_endpointslices_in_its_namespace(run, multicloud_plan):
    reg = run(lambda: CacheAwareRouter("r", CacheAwareRouterArgs(multicloud_plan, admin_token="t")))
    sa = reg.one("kubernetes:core/v1:ServiceAccount").inputs
    assert sa["automountServiceAccountToken"] is True  # discovery talks to the API server
    pod = reg.one(DEPLOY).inputs["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"] and pod["automountServiceAccountToken"] is True
    rbac = [r for r in reg.resources if "rbac.authorization.k8s.io" in r.type]
    assert sorted(r.inputs["kind"] for r in rbac) == ["Role", "RoleBinding"]  # no ClusterRole
    role = next(r.inputs for r in rbac if r.inputs["kind"] == "Role")
    assert role["metadata"]["namespace"] == multicloud_plan.namespace
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
    ]
    binding = next(r.inputs for r in rbac if r.inputs["kind"] == "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": multicloud_plan.namespace}
    ]


def test_invalid_declaration_fails_before_any_resource_is_registered(run):
    bad = {**LAB_FLEET, "nodepools": [{**LAB_FLEET["nodepools"][0], "max_nodes": 0}]}
    with pytest.raises(InvalidFleet) as info:
        run(lambda: Fleet("f", FleetArgs(admin_token="t", fleet=bad)))
    assert "nodepools[0].max_nodes" in str(info.value)
    assert info.value.issues and info.value.issues[0].field == "nodepools[0].max_nodes"


def test_invalid_declaration_registers_nothing_even_the_component(registrations):
    from gpufleet.infra.pulumi import preview

    bad = {**LAB_FLEET, "deployments": [{**LAB_FLEET["deployments"][0], "model": "no/such-model"}]}
    with pytest.raises(InvalidFleet):
        preview.run_program(lambda: Fleet("f", FleetArgs(admin_token="t", fleet=bad)))
    assert registrations == [[]]


def test_fleet_makes_a_provider_per_cloud_and_cluster_and_uses_them(run, multicloud_plan):
    reg = run(lambda: Fleet("f", FleetArgs(admin_token="t", plan=multicloud_plan)))
    assert reg.one("pulumi:providers:aws").inputs["region"] == "us-east-1"
    gcp = reg.one("pulumi:providers:gcp").inputs
    assert (gcp["project"], gcp["region"]) == ("acme-ml", "us-central1")
    k8s = {r.name: r for r in reg.of_type("pulumi:providers:kubernetes")}
    assert set(k8s) == {"f-aws-k8s", "f-gcp-k8s"}
    eks_cfg = json.loads(k8s["f-aws-k8s"].inputs["kubeconfig"])
    assert eks_cfg["users"][0]["user"]["exec"]["args"][:4] == ["eks", "get-token", "--cluster-name", "prod-eks"]
    gke_cfg = json.loads(k8s["f-gcp-k8s"].inputs["kubeconfig"])
    assert gke_cfg["users"][0]["user"]["exec"]["command"] == "gke-gcloud-auth-plugin"
    on_aws = reg.one(STS, "llama-8b-aws-h100")
    on_gcp = reg.one(STS, "llama-8b-gcp-h100")
    assert "::f-aws-k8s::" in on_aws.provider and "::f-gcp-k8s::" in on_gcp.provider
    assert "::f-aws::" in reg.one(NG).provider and "::f-gcp::" in reg.one(NP).provider
    # The router runs once, in the cluster of the highest-priority pool.
    assert "::f-aws-k8s::" in reg.one(DEPLOY, "llm-prod-router").provider
    # GKE's managed autoscaler does not read the expander ConfigMap: only EKS gets one.
    assert len(reg.of_type("gpufleet:failover:FailoverPriorities")) == 1


def test_fleet_subnets_are_narrowed_to_the_pool_zones(run, eks_plan):
    reg = run(lambda: Fleet("f", FleetArgs(admin_token="t", plan=eks_plan)))
    ng = reg.one(NG, "f-h100-ondemand-nodegroup").inputs
    assert ng["subnetIds"] == ["subnet-preview-us-east-1a", "subnet-preview-us-east-1b"]
    assert ng["nodeRoleArn"].endswith(":role/f-eks-node-role")


def test_fleet_on_an_existing_cluster_uses_its_context(run):
    reg = run(lambda: Fleet("f", FleetArgs(admin_token="t", fleet=LAB_FLEET)))
    assert reg.one("pulumi:providers:kubernetes").inputs["context"] == "lab-cluster"
    assert not reg.of_type(NG) and not reg.of_type(NP)
    assert reg.one(DEPLOY, "warm-lab-a100").inputs["spec"]["replicas"] == 1
    prios = yaml.safe_load(reg.one(CM, "cluster-autoscaler-priority-expander").inputs["data"]["priorities"])
    assert prios == {10: [".*lab-a100.*"]}


def test_fleet_exports_router_endpoint_pools_and_cost(run, multicloud_plan):
    def program():
        import pulumi

        f = Fleet("f", FleetArgs(admin_token="t", plan=multicloud_plan))
        pulumi.export("router_endpoint", f.router_endpoint)
        pulumi.export("pools", f.pools)
        pulumi.export("cost", f.cost)

    out = run(program).result.outputs
    assert out["router_endpoint"] == "http://llm-prod-router.gpufleet.svc.cluster.local:8080"
    assert out["cost"] == multicloud_plan.cost.model_dump(mode="json")
    rows = {p["name"]: p for p in out["pools"]}
    assert rows["aws-h100"]["node_group"] == "llm-prod-aws-h100" and rows["gcp-h100"]["warm_nodes"] == 1


def test_hf_token_becomes_a_secret_referenced_by_replicas(run, eks_plan):
    reg = run(lambda: Fleet("f", FleetArgs(admin_token="t", hf_token="hf_xyz", plan=eks_plan)))
    sec = reg.one("kubernetes:core/v1:Secret", "eks-llm-hf-token")
    assert sec.inputs["stringData"] == "[secret]"
    env = reg.one(STS, "llama-70b-h100-ondemand").inputs["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "eks-llm-hf-token", "key": "token"}}} in env
    assert "hf_xyz" not in json.dumps([r.to_json() for r in reg.resources])


def test_eks_cluster_gets_nvidia_device_plugin_on_its_gpu_pools_and_gke_does_not(run, multicloud_plan):
    reg = run(lambda: Fleet("f", FleetArgs(admin_token="t", plan=multicloud_plan)))
    ds = reg.one("kubernetes:apps/v1:DaemonSet")
    assert "::f-aws-k8s::" in ds.provider and ds.inputs["metadata"]["namespace"] == "kube-system"
    pod = ds.inputs["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["values"] == ["aws-h100"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["volumes"][0]["hostPath"]["path"] == "/var/lib/kubelet/device-plugins"


def test_stack_config_can_turn_the_device_plugin_off(run, eks_plan):
    import pulumi

    from gpufleet.infra.pulumi import stack_config

    def program():
        args = stack_config.read()
        pulumi.export("install", args.options.install_device_plugin)
        Fleet("f", FleetArgs(admin_token=args.admin_token, plan=eks_plan, options=args.options))

    config = {"gpufleet:adminToken": "t", "gpufleet:installDevicePlugin": "false", "gpufleet:fleetFile": "unused.yaml"}
    reg = run(program, config=config, secret_keys=["gpufleet:adminToken"])
    assert reg.result.outputs["install"] is False
    assert not reg.of_type("kubernetes:apps/v1:DaemonSet")
