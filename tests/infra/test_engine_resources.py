"""The engine's CPU and memory in the plan: each replica's GPU share of what a node leaves to pods
after the kubelet's reservation (EKS's and GKE's formulas) and the system daemonsets, the KV tier
inside it, and the fit checks (file:line errors, a warning for a short CPU share)."""

from __future__ import annotations

import pytest

from gpufleet.infra import catalog, plan, spec
from gpufleet.infra.plan import resources

FLEET = """\
fleet: sized
clouds:
  CLOUD
nodepools:
  - name: gpu
    cloud: PROVIDER
    zones: [ZONE]
    instance_type: MACHINE
    priority: 10
    min_nodes: 1
    max_nodes: 2
deployments:
  - name: llama
    model: meta-llama/Llama-3.1-8B-Instruct
    nodepools: [gpu]
    gpus_per_replica: GPUS
    min_replicas: 1
    max_replicas: 2
    max_model_len: 8192
"""

AWS = ("aws: {region: us-east-1, cluster: prod-eks}", "aws", "us-east-1a")
GCP = ("gcp: {project: p, region: us-central1, cluster: prod-gke}", "gcp", "us-central1-a")


def fleet_text(cloud: tuple[str, str, str], machine: str, gpus: int = 1, offload: str | None = None) -> str:
    text = (
        FLEET.replace("CLOUD", cloud[0])
        .replace("PROVIDER", cloud[1])
        .replace("ZONE", cloud[2])
        .replace("MACHINE", machine)
        .replace("GPUS", str(gpus))
    )
    return text + (f"    kv_offload: {offload}\n" if offload else "")


def compile_text(text: str, cat: catalog.Catalog | None = None) -> plan.Plan:
    fleet, smap = spec.load_text(text, "fleet.yaml")
    return plan.compile_fleet(fleet, smap, cat)


def errors(text: str, cat: catalog.Catalog | None = None) -> list[str]:
    with pytest.raises(spec.FleetError) as exc:
        compile_text(text, cat)
    return [str(i) for i in exc.value.issues]


def cpu_steps_m(vcpus: int) -> float:
    """6% of the first core, 1% of the second, 0.5% of the next two, 0.25% of the rest, in millicores."""
    return 60 + 10 * (vcpus > 1) + 5 * min(max(vcpus - 2, 0), 2) + 2.5 * max(vcpus - 4, 0)


def test_an_eks_replica_gets_its_gpu_share_of_what_the_node_leaves_after_nodeadm_and_daemonsets():
    # p5.48xlarge: 192 vCPU, 2048 GiB (7.5% of it VM overhead), 8 H100, 100 pods (eni-max-pods); a
    # replica of 2 GPUs: a quarter.
    r = compile_text(fleet_text(AWS, "p5.48xlarge", gpus=2)).deployment("llama").pools[0].resources
    assert r is not None and r.reserve == "eks"
    node_cpu = 192_000 - cpu_steps_m(192) - 500
    node_mem = int(2048 * 1024 * 0.925) - (11 * 100 + 255) - 100 - 1024
    assert r.node_cpu_millicores == int(node_cpu) and r.node_memory_mib == node_mem
    assert r.cpu_millicores == int(int(node_cpu) / 4) and r.memory_mib == node_mem // 4
    assert r.engine_memory_gib == 6 + 2 * 2 and r.kv_tier_memory_gib == 0


def test_a_gke_replica_gets_its_share_after_the_gke_memory_and_cpu_schedule():
    # g2-standard-48: 48 vCPU, 192 GiB, 4 L4.
    r = compile_text(fleet_text(GCP, "g2-standard-48")).deployment("llama").pools[0].resources
    assert r is not None and r.reserve == "gke"
    reserved_gib = 4 * 0.25 + 4 * 0.20 + 8 * 0.10 + 112 * 0.06 + (192 - 128) * 0.02
    node_mem = int(192 * 1024 * 0.925) - int(-(-reserved_gib * 1024 // 1)) - 100 - 1024
    assert r.node_memory_mib == node_mem and r.memory_mib == node_mem // 4
    assert r.node_cpu_millicores == int(48_000 - cpu_steps_m(48) - 500)


def test_the_cpu_tier_is_inside_the_share_and_one_past_it_is_an_error_at_its_line():
    base = compile_text(fleet_text(AWS, "g6e.12xlarge")).deployment("llama").pools[0].resources
    assert base is not None
    most = base.memory_mib / 1024 - 8  # the engine's own 6 + 2 GiB
    fits = compile_text(fleet_text(AWS, "g6e.12xlarge", offload=f"{{cpu_gib: {int(most)}}}"))
    r = fits.deployment("llama").pools[0].resources
    assert r is not None and r.memory_mib == base.memory_mib and r.kv_tier_memory_gib == int(most)
    msgs = errors(fleet_text(AWS, "g6e.12xlarge", offload=f"{{cpu_gib: {int(most) + 1}}}"))
    assert len(msgs) == 1 and msgs[0].startswith("fleet.yaml:20: deployments[0].kv_offload.cpu_gib:")
    assert f"at most {most:.1f} GiB per replica" in msgs[0]


def user_catalog(tmp_path, vcpus: int, ram_gib: int) -> catalog.Catalog:
    path = tmp_path / "machines.yaml"
    path.write_text(
        "cloud: aws\n"
        f"machines:\n  tiny.8x: {{gpu: L4, gpus: 8, vcpus: {vcpus}, ram_gib: {ram_gib}, usd_per_hour: 1.0, regions: [us-east-1]}}\n"
    )
    return catalog.load([path])


def test_an_engine_whose_memory_share_is_below_its_own_need_is_an_error_at_the_pool_reference(tmp_path):
    # 8 GPUs on 32 GiB: an eighth of what is left (~3.7 GiB) cannot hold the engine's 8 GiB.
    cat = user_catalog(tmp_path, vcpus=64, ram_gib=32)
    msgs = errors(fleet_text(AWS, "tiny.8x"), cat)
    assert len(msgs) == 1 and msgs[0].startswith("fleet.yaml:15: deployments[0].nodepools[0]:")
    assert "(1 of 8 GPUs)" in msgs[0] and "below the 8 GiB its engine needs" in msgs[0]


def test_a_cpu_share_below_what_the_engine_keeps_busy_is_a_warning(tmp_path):
    # 8 vCPUs for 8 GPUs: under 1 core per replica; the engine keeps 2 + 1 per GPU busy.
    cat = user_catalog(tmp_path, vcpus=8, ram_gib=256)
    p = compile_text(fleet_text(AWS, "tiny.8x"), cat)
    short = [w for w in p.warnings if w.code == "engine_cpu_short"]
    assert len(short) == 1 and short[0].subject == "llama"
    res = p.deployment("llama").pools[0].resources
    assert res is not None and f"gets {res.cpu_millicores}m CPU" in short[0].message
    assert res.cpu_millicores < 3000
    roomy = compile_text(fleet_text(AWS, "g6e.12xlarge"))
    assert not [w for w in roomy.warnings if w.code == "engine_cpu_short"]


def test_an_existing_clusters_unknown_machine_has_no_resources_and_a_known_one_the_larger_reserve():
    text = """\
fleet: lab
clouds:
  kubernetes: {context: lab}
nodepools:
  - {name: own, cloud: kubernetes, instance_type: dgx-a100, gpu: A100-80GB, gpus_per_node: 8, max_nodes: 2}
  - {name: known, cloud: kubernetes, instance_type: g6e.12xlarge, max_nodes: 2}
deployments:
  - {name: llama, model: meta-llama/Llama-3.1-8B-Instruct, min_replicas: 1, max_replicas: 2, max_model_len: 8192}
"""
    by_pool = {pp.pool: pp.resources for pp in compile_text(text).deployment("llama").pools}
    assert by_pool["own"] is None
    known = by_pool["known"]
    assert known is not None and known.reserve == "larger of gke and eks"
    gke_mib = -(-(4 * 0.25 + 4 * 0.20 + 8 * 0.10 + 112 * 0.06 + 256 * 0.02) * 1024 // 1)
    assert known.node_memory_mib == int(384 * 1024 * 0.925) - int(gke_mib) - 100 - 1024  # GKE's is larger at 384 GiB


def test_resources_are_in_the_plan_json_and_round_trip():
    p = compile_text(fleet_text(AWS, "g6e.12xlarge"))
    data = p.to_json_dict()
    got = data["deployments"][0]["pools"][0]["resources"]
    assert set(got) >= {"cpu_millicores", "memory_mib", "node_cpu_millicores", "node_memory_mib", "reserve"}
    assert plan.Plan.from_json_dict(data) == p


def test_reserved_uses_the_kubelet_default_pods_when_the_catalog_has_no_max_pods():
    machine = plan.pools.PoolMachine(
        gpu_name="L4",
        gpu=catalog.bundled().gpus["L4"],
        gpus_per_node=1,
        usd_per_node_hour=1.0,
        price_source="test",
        ram_gib=16,
        vcpus=4,
        cloud="aws",
    )
    cpu, mem, source = resources.reserved(machine)
    assert (cpu, mem, source) == (int(cpu_steps_m(4)), 11 * 110 + 255 + 100, "eks")
