"""The KV tiers in the engine pods: the engines' own flags and environment, the tier inside the
replica's memory request, a disk tier's volume; every object valid against the Kubernetes schema,
and the Pulumi path registering the same objects."""

from __future__ import annotations

import kubernetes_validate
import pytest

from gpufleet.infra import manifests, spec
from gpufleet.infra import plan as plan_mod

K8S_VERSION = "1.31"

FLEET = """\
fleet: tiered
clouds:
  aws: {region: us-east-1, cluster: prod-eks}
nodepools:
  - name: l40s
    cloud: aws
    zones: [us-east-1a, us-east-1b]
    instance_type: g6e.12xlarge
    priority: 10
    min_nodes: 1
    max_nodes: 4
deployments:
  - name: native
    model: meta-llama/Llama-3.1-8B-Instruct
    min_replicas: 1
    max_replicas: 2
    max_model_len: 16384
    kv_offload: {cpu_gib: 64}
  - name: lmc
    model: meta-llama/Llama-3.1-8B-Instruct
    min_replicas: 1
    max_replicas: 2
    max_model_len: 16384
    kv_offload: {cpu_gib: 32, disk_gib: 500, backend: lmcache}
  - name: sgl
    model: meta-llama/Llama-3.1-8B-Instruct
    engine: sglang
    gpus_per_replica: 2
    min_replicas: 1
    max_replicas: 2
    max_model_len: 16384
    kv_offload: {cpu_gib: 100, disk_gib: 1500}
  - name: plain
    model: meta-llama/Llama-3.1-8B-Instruct
    min_replicas: 1
    max_replicas: 2
    max_model_len: 16384
"""


@pytest.fixture(scope="module")
def plan() -> plan_mod.Plan:
    fleet, smap = spec.load_text(FLEET, "fleet.yaml")
    return plan_mod.compile_fleet(fleet, smap)


def sts_of(plan: plan_mod.Plan, dep: str) -> dict:
    return manifests.model_statefulset(plan, plan.deployment(dep), plan.pool("l40s"))


def container(sts: dict) -> dict:
    return sts["spec"]["template"]["spec"]["containers"][0]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_every_object_with_tiers_validates_against_the_kubernetes_schema(plan):
    objs = [o for group in manifests.all_objects(plan).values() for o in group]
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# g6e.12xlarge on EKS: what the node leaves to pods (384 GiB less 7.5% VM overhead, kubelet 11 MiB x
# 292 pods + 255 MiB, 100 MiB eviction, 1 GiB system daemonsets), a quarter of it per GPU.
NODE_LEFT_MIB = int(384 * 1024 * 0.925) - (11 * 292 + 255) - 100 - 1024


def test_vllm_native_gets_the_offloading_flags_and_its_tier_inside_its_memory_share(plan):
    c = container(sts_of(plan, "native"))
    assert flag(c["args"], "--kv-offloading-backend") == "native"
    assert flag(c["args"], "--kv-offloading-size") == "64"
    share = NODE_LEFT_MIB // 4
    # The tier (64 GiB) and the engine (6 + 2 GiB) live inside the share: not added on top of it.
    assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"] == f"{share}Mi"
    assert share >= 72 * 1024


def test_lmcache_gets_the_connector_its_sizes_and_a_local_nvme_volume(plan):
    sts = sts_of(plan, "lmc")
    c = container(sts)
    assert flag(c["args"], "--kv-transfer-config") == '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["LMCACHE_LOCAL_CPU"] == "True"
    assert env["LMCACHE_MAX_LOCAL_CPU_SIZE"] == "32"
    assert env["LMCACHE_LOCAL_DISK"] == "file:///kv-disk/"
    assert env["LMCACHE_MAX_LOCAL_DISK_SIZE"] == "500"
    # 4 replicas per node x 500 GiB fit the node's 3800 GiB of instance store: an emptyDir there.
    vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert vols["kv-disk"] == {"name": "kv-disk", "emptyDir": {"sizeLimit": "500Gi"}}
    assert c["resources"]["requests"]["ephemeral-storage"] == "500Gi"
    assert {"name": "kv-disk", "mountPath": "/kv-disk"} in c["volumeMounts"]
    assert "volumeClaimTemplates" not in sts["spec"]


def test_sglang_hicache_sizes_per_rank_and_a_disk_beyond_the_nvme_is_a_claim(plan):
    sts = sts_of(plan, "sgl")
    c = container(sts)
    assert "--enable-hierarchical-cache" in c["args"]
    assert flag(c["args"], "--hicache-size") == str(int(100 * 2**30 / 1e9 / 2))  # GB per TP rank
    assert flag(c["args"], "--hicache-storage-backend") == "file"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] == "/kv-disk"
    # 2 replicas per node x 1500 GiB fit the node's 3800 GiB of instance store: an emptyDir there.
    assert plan.deployment("sgl").pools[0].kv_tiers.disk_medium == "local_nvme"
    assert "volumeClaimTemplates" not in sts["spec"]
    assert c["resources"]["requests"]["memory"] == f"{NODE_LEFT_MIB * 2 // 4}Mi"  # 2 of 4 GPUs; holds 6 + 2 x 2 + 100


def test_a_disk_tier_beyond_the_nodes_nvme_becomes_a_volume_claim():
    text = FLEET.replace(
        "{cpu_gib: 32, disk_gib: 500, backend: lmcache}", "{cpu_gib: 32, disk_gib: 1200, backend: lmcache}"
    )
    fleet, smap = spec.load_text(text, "fleet.yaml")
    p = plan_mod.compile_fleet(fleet, smap)
    sts = sts_of(p, "lmc")
    kubernetes_validate.validate(sts, K8S_VERSION, strict=True)
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "kv-disk"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1200Gi"
    assert all(v["name"] != "kv-disk" for v in sts["spec"]["template"]["spec"]["volumes"])
    assert p.deployment("lmc").pools[0].kv_tiers.disk_medium == "gp3"


def test_without_offload_no_tier_flags_and_the_same_memory_share(plan):
    c = container(sts_of(plan, "plain"))
    assert not any(a.startswith("--kv-offloading") or a == "--kv-transfer-config" for a in c["args"])
    assert c["resources"]["requests"]["memory"] == container(sts_of(plan, "native"))["resources"]["requests"]["memory"]


def test_pulumi_registers_the_engine_pods_with_their_tier_flags_and_requests(plan):
    from gpufleet.infra.pulumi import Fleet, FleetArgs
    from gpufleet.infra.pulumi.mocks import sanitize
    from gpufleet.infra.pulumi.preview import run_program

    result = run_program(lambda: Fleet("f", FleetArgs(admin_token="t", plan=plan)))
    registered = {
        r.inputs["metadata"]["name"]: r.inputs
        for r in result.resources
        if r.type.startswith("kubernetes:") and r.inputs.get("kind") == "StatefulSet"
    }
    for dep in ("native", "lmc", "sgl"):
        sts = sts_of(plan, dep)
        got = registered[sts["metadata"]["name"]]
        assert got == sanitize(sts)
        assert got["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"].endswith("Mi")
