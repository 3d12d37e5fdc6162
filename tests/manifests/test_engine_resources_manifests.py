"""The engine container's CPU and memory: the plan's share of the node as requests (memory also as
the limit, no CPU limit), the smallest node among the pools a pod may spill to, valid against the
Kubernetes schema; an existing cluster's unknown machines fall back to the KV tier's request."""

from __future__ import annotations

import kubernetes_validate

from gpufleet.infra import manifests, spec
from gpufleet.infra import plan as plan_mod

K8S_VERSION = "1.31"

SPILL = """\
fleet: spill
clouds:
  aws: {region: us-east-1, cluster: prod-eks}
nodepools:
  - {name: h100, cloud: aws, zones: [us-east-1a], instance_type: p5.48xlarge, priority: 20, max_nodes: 1}
  - {name: l40s, cloud: aws, zones: [us-east-1a], instance_type: g6e.12xlarge, priority: 10, max_nodes: 2}
deployments:
  - name: llama
    model: meta-llama/Llama-3.1-8B-Instruct
    min_replicas: 2
    max_replicas: 8
    max_model_len: 8192
    kv_offload: {cpu_gib: 40}
"""


def compile_text(text: str) -> plan_mod.Plan:
    fleet, smap = spec.load_text(text, "fleet.yaml")
    return plan_mod.compile_fleet(fleet, smap)


def engine(sts: dict) -> dict:
    return sts["spec"]["template"]["spec"]["containers"][0]


def test_requests_are_the_plans_share_memory_limit_equals_request_and_no_cpu_limit():
    p = compile_text(SPILL)
    dep = p.deployment("llama")
    sts = manifests.model_statefulset(p, dep, p.pool("l40s"))
    kubernetes_validate.validate(sts, K8S_VERSION, strict=True)
    res = next(pp.resources for pp in dep.pools if pp.pool == "l40s")
    assert res is not None
    assert engine(sts)["resources"] == {
        "requests": {"nvidia.com/gpu": "1", "cpu": f"{res.cpu_millicores}m", "memory": f"{res.memory_mib}Mi"},
        "limits": {"nvidia.com/gpu": "1", "memory": f"{res.memory_mib}Mi"},
    }
    # The 40 GiB tier and the engine's 8 GiB are inside the share, not on top of it.
    assert res.memory_mib >= (40 + 8) * 1024 and res.memory_mib == res.node_memory_mib // 4


def test_a_pod_that_may_spill_to_a_smaller_pool_asks_for_what_fits_there():
    p = compile_text(SPILL)
    dep = p.deployment("llama")
    by_pool = {pp.pool: pp.resources for pp in dep.pools}
    big, small = by_pool["h100"], by_pool["l40s"]
    assert big is not None and small is not None and big.memory_mib > small.memory_mib
    top = manifests.model_statefulset(p, dep, p.pool("h100"))
    kubernetes_validate.validate(top, K8S_VERSION, strict=True)
    req = engine(top)["resources"]["requests"]
    # Its affinity allows h100 and l40s nodes: the request is the smaller of the two shares.
    assert req["cpu"] == f"{min(big.cpu_millicores, small.cpu_millicores)}m"
    assert req["memory"] == f"{small.memory_mib}Mi"


def test_every_object_of_a_sized_fleet_validates():
    p = compile_text(SPILL)
    for objs in manifests.all_objects(p).values():
        for obj in objs:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_an_existing_clusters_unknown_machines_get_only_the_tiers_memory_request():
    text = """\
fleet: lab
clouds:
  kubernetes: {context: lab}
nodepools:
  - {name: own, cloud: kubernetes, instance_type: dgx-a100, gpu: A100-80GB, gpus_per_node: 8, max_nodes: 2}
deployments:
  - name: llama
    model: meta-llama/Llama-3.1-8B-Instruct
    min_replicas: 1
    max_replicas: 2
    max_model_len: 8192
    kv_offload: {cpu_gib: 40}
"""
    p = compile_text(text)
    sts = manifests.model_statefulset(p, p.deployment("llama"), p.pool("own"))
    kubernetes_validate.validate(sts, K8S_VERSION, strict=True)
    assert engine(sts)["resources"] == {
        "requests": {"nvidia.com/gpu": "1", "memory": "48Gi"},  # 6 + 2 per GPU + 40
        "limits": {"nvidia.com/gpu": "1"},
    }


def test_engine_option_problems_name_each_option_as_its_reader_spells_it():
    def label(name: str) -> str:
        return f"<{name}>"

    fine = manifests.ManifestOptions(hf_token_secret="hf", model_cache_storage_class="gp3", model_cache_size="1.5Ti")
    assert manifests.engine_option_problems(fine, label) == []
    bad = manifests.ManifestOptions(
        hf_token_secret="Bad_Name",
        model_cache_storage_class="gp3",
        model_cache_host_path="relative",
        model_cache_size="200gb",
    )
    problems = manifests.engine_option_problems(bad, label)
    assert problems == [
        "<hf_token_secret> 'Bad_Name': not a Kubernetes object name (lowercase letters, digits, '-', '.')",
        "<model_cache_storage_class> and <model_cache_host_path>: give one of them",
        "<model_cache_host_path> 'relative': must be an absolute path",
        "<model_cache_size> '200gb': a Kubernetes quantity, e.g. 200Gi",
    ]
