"""`kv_offload`: the declaration's checks (file:line), the node-RAM fit, and the tiers in the plan."""

from __future__ import annotations

import pytest

from gpufleet.infra import catalog, plan, report, spec
from gpufleet.infra.plan import tiers

GIB = 2**30

L40S = """\
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
    max_nodes: 2
deployments:
  - name: llama
    model: meta-llama/Llama-3.1-8B-Instruct
    engine: ENGINE
    min_replicas: 4
    max_replicas: 8
    max_model_len: 16384
    kv_offload: OFFLOAD
"""


def text(offload: str, engine: str = "vllm") -> str:
    return L40S.replace("OFFLOAD", offload).replace("ENGINE", engine)


def compile_text(t: str) -> plan.Plan:
    fleet, smap = spec.load_text(t, "fleet.yaml")
    return plan.compile_fleet(fleet, smap)


def errors(t: str) -> list[str]:
    with pytest.raises(spec.FleetError) as exc:
        compile_text(t)
    return [str(i) for i in exc.value.issues]


@pytest.mark.parametrize(
    ("engine", "offload", "needle"),
    [
        (
            "sglang",
            "{cpu_gib: 40, backend: native}",
            "'native' is not a KV offload backend of sglang; allowed: hicache",
        ),
        (
            "vllm",
            "{cpu_gib: 40, backend: hicache}",
            "'hicache' is not a KV offload backend of vllm; allowed: native, lmcache",
        ),
        ("vllm", "{cpu_gib: 40, disk_gib: 100}", "backend 'native' offloads to CPU memory only"),
        ("vllm", "{disk_gib: 100, backend: lmcache}", "must be above 0"),
        ("vllm", "{cpu_gib: 40, backend: mooncake}", "expected 'native', 'lmcache' or 'hicache'"),
    ],
)
def test_an_offload_the_engine_cannot_do_is_an_error_at_its_line(engine, offload, needle):
    msgs = errors(text(offload, engine))
    assert any(m.startswith("fleet.yaml:19: deployments[0].kv_offload") and needle in m for m in msgs), msgs


def test_a_cpu_tier_above_the_replicas_share_of_the_node_after_engine_is_an_error():
    # g6e.12xlarge on EKS: 384 GiB less 7.5% VM overhead, 4 x L40S, 292 pods -> the kubelet keeps
    # 11 x 292 + 255 MiB and 100 MiB for eviction, system daemonsets 1 GiB; each replica (1 GPU) gets
    # a quarter, 8 GiB of it for the engine.
    left_mib = int(384 * 1024 * 0.925) - (11 * 292 + 255) - 100 - 1024
    most = (left_mib // 4) / 1024 - 8
    msgs = errors(text(f"{{cpu_gib: {most + 1:.0f}}}"))
    assert len(msgs) == 1
    assert msgs[0].startswith("fleet.yaml:19: deployments[0].kv_offload.cpu_gib:")
    assert "(1 of 4 GPUs)" in msgs[0] and "384 GiB RAM" in msgs[0] and f"at most {most:.1f} GiB" in msgs[0]
    assert "eks kubelet reservation" in msgs[0]
    compile_text(text(f"{{cpu_gib: {int(most)}}}"))  # just under: fits


def test_node_reservation_follows_the_gke_schedule():
    assert tiers.node_reserved_gib(4) == pytest.approx(1.0)
    assert tiers.node_reserved_gib(16) == pytest.approx(1 + 0.8 + 0.8)
    assert tiers.node_reserved_gib(384) == pytest.approx(1 + 0.8 + 0.8 + 112 * 0.06 + 256 * 0.02)


def test_plan_reports_tokens_rates_and_cost_of_each_tier_per_replica_and_pool():
    p = compile_text(text("{cpu_gib: 64}"))
    d = p.deployment("llama")
    t = d.pools[0].kv_tiers
    assert t is not None and t.backend == "native"
    assert t.cpu_kv_tokens == 64 * GIB // 131072 == 524288
    # g6e: PCIe Gen4, 25 GB/s effective per GPU.
    assert t.pcie_gen == 4 and t.cpu_hit_gb_per_s == 25
    assert t.cpu_hit_tokens_per_s == pytest.approx(25e9 / 131072, rel=1e-6)
    assert "L40S" in t.host_link_source
    assert t.usd_per_hour == 0 and t.host_memory_gib == 64 + 8
    pool = p.pool("l40s")
    assert pool.cpu_kv_tokens_baseline == 4 * 524288
    assert pool.gpu_kv_tokens_baseline == 4 * d.kv_cache_tokens_per_replica
    assert pool.kv_tier_usd_per_hour == 0
    data = p.to_json_dict()
    assert data["deployments"][0]["pools"][0]["kv_tiers"]["cpu_kv_tokens"] == 524288
    assert plan.Plan.from_json_dict(data) == p


def test_a_disk_tier_on_the_nodes_nvme_is_free_and_beyond_it_is_provisioned_block_storage():
    local = compile_text(text("{cpu_gib: 32, disk_gib: 900, backend: lmcache}")).deployment("llama").pools[0].kv_tiers
    assert local is not None and local.disk_medium == "local_nvme" and local.usd_per_hour == 0
    assert local.disk_kv_tokens == 900 * GIB // 131072
    big = compile_text(text("{cpu_gib: 32, disk_gib: 1000, backend: lmcache}"))  # 4 x 1000 > 3800 GiB NVMe
    t = big.deployment("llama").pools[0].kv_tiers
    assert t is not None and t.disk_medium == "gp3"
    assert t.usd_per_hour == pytest.approx(1000 * 0.08 / 730, abs=1e-4)
    pool = big.pool("l40s")
    assert pool.kv_tier_usd_per_hour == pytest.approx(4 * t.usd_per_hour, abs=1e-3)
    assert pool.baseline_usd_per_hour == pytest.approx(10.493 + pool.kv_tier_usd_per_hour, abs=1e-3)


def test_gen5_machines_move_a_cpu_hit_twice_as_fast():
    cat = catalog.bundled()
    assert cat.host_link(cat.machine("aws", "p5.48xlarge")).pcie_gen == 5
    assert cat.host_link(cat.machine("gcp", "a3-highgpu-8g")).host_to_device_gb_per_s == 50
    assert cat.host_link(cat.machine("gcp", "g2-standard-48")).pcie_gen == 4


def test_without_offload_the_plan_has_no_tiers():
    p = compile_text(L40S.replace("    kv_offload: OFFLOAD\n", "").replace("ENGINE", "vllm"))
    assert p.deployment("llama").pools[0].kv_tiers is None
    assert p.pool("l40s").cpu_kv_tokens_baseline == 0


def test_tables_show_the_tiers():
    p = compile_text(text("{cpu_gib: 64}"))
    out = report.markdown(p)
    assert "524,288" in out and "PCIe Gen4" in out


def test_the_router_config_carries_each_replicas_cpu_tier_from_the_plan():
    from gpufleet.infra import router_config
    from gpufleet.router.replicas import ReplicaSet

    p = compile_text(text("{cpu_gib: 64}"))
    cfg = router_config.render(p, lambda r: f"http://{r.id}:8000")
    t = p.deployment("llama").pools[0].kv_tiers
    assert all(r.cpu_kv_capacity_tokens == t.cpu_kv_tokens for r in cfg.replicas)
    assert all(r.cpu_load_tokens_per_s == t.cpu_hit_tokens_per_s for r in cfg.replicas)
    states = list(ReplicaSet(cfg.replicas))
    assert states[0].cpu_kv_capacity_tokens == t.cpu_kv_tokens
