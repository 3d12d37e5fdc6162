"""GCP adapter: the REAL google-cloud-compute REST client against the stateful local fake."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gpufleet.provider_adapters import base, errors, gcp
from tests.fakes.gcp_server import FakeGcpServer


@pytest.fixture
def fake() -> Iterator[FakeGcpServer]:
    with FakeGcpServer.with_defaults() as server:
        yield server


@pytest.fixture
def adapter(fake: FakeGcpServer) -> gcp.GcpAdapter:
    return gcp.GcpAdapter(fake.project, client_factory=fake.client)


def ref(zone: str = "us-central1-a", name: str = "gke-prod-h100") -> base.PoolRef:
    return base.PoolRef(cloud="gcp", name="gcp-h100", region="us-central1", zone=zone, provider_name=name)


def test_offerings_group_zones_and_read_gpu_facts(adapter: gcp.GcpAdapter) -> None:
    seen: list[str] = []
    offers = {o.machine_type: o for o in adapter.offerings("us-central1", progress=seen.append)}
    assert set(offers) == {"a3-highgpu-8g", "g2-standard-48"}  # n2 has no GPU
    a3 = offers["a3-highgpu-8g"]
    assert (a3.gpu_model, a3.gpu_count, a3.gpu_memory_gib, a3.vcpus, a3.zones) == (
        "H100",
        8,
        80.0,
        208,
        ("us-central1-a",),
    )
    assert offers["g2-standard-48"].zones == ("us-central1-a", "us-central1-b")
    assert seen == ["us-central1-a", "us-central1-b"]


def test_offerings_filter_by_gpu_and_region(adapter: gcp.GcpAdapter) -> None:
    assert [o.machine_type for o in adapter.offerings("us-central1", gpu="L4")] == ["g2-standard-48"]
    a2 = adapter.offerings("europe-west4")
    assert [(o.machine_type, o.gpu_model, o.gpu_memory_gib) for o in a2] == [("a2-highgpu-8g", "A100-40GB", 40.0)]


def test_accelerator_types_per_zone(adapter: gcp.GcpAdapter) -> None:
    accs = {(a.zone, a.gpu_model): a.max_per_instance for a in adapter.accelerators("us-central1")}
    assert accs == {("us-central1-a", "H100"): 8, ("us-central1-a", "L4"): 8, ("us-central1-b", "L4"): 8}


def test_regional_gpu_quotas(adapter: gcp.GcpAdapter) -> None:
    quotas = {q.name: q for q in adapter.quotas("us-central1")}
    assert "CPUS" not in quotas
    h100 = quotas["NVIDIA_H100_GPUS"]
    assert (h100.unit, h100.limit, h100.usage, h100.headroom, h100.applies_to, h100.spot) == (
        "gpu",
        16,
        8,
        8,
        ("H100",),
        False,
    )
    assert quotas["PREEMPTIBLE_NVIDIA_H100_GPUS"].spot
    assert gcp.quota_gpu_model("NVIDIA_A100_80GB_GPUS") == "A100-80GB"


def test_unknown_region_is_not_found(adapter: gcp.GcpAdapter) -> None:
    with pytest.raises(errors.NotFound) as info:
        adapter.quotas("mars-north1")
    assert info.value.code == "notFound"


def test_resize_changes_what_the_next_get_returns(fake: FakeGcpServer, adapter: gcp.GcpAdapter) -> None:
    fake.add_mig("us-central1-a", "gke-prod-h100", machine_type="a3-highgpu-8g", size=1)
    before = adapter.pool_state(ref())
    assert (before.desired_nodes, before.ready_nodes, before.max_nodes) == (1, 1, None)
    result = adapter.scale_pool(base.ScaleRequest(ref=ref(), desired_nodes=3))
    assert (result.previous_desired, result.desired_nodes) == (1, 3)
    during = adapter.pool_state(ref())
    assert (during.desired_nodes, during.ready_nodes, during.status) == (3, 1, "UPDATING")
    fake.settle("us-central1-a", "gke-prod-h100")
    after = adapter.pool_state(ref())
    assert (after.desired_nodes, after.ready_nodes, after.status) == (3, 3, "STABLE")


def test_stockout_in_operation_maps_to_capacity_error(fake: FakeGcpServer, adapter: gcp.GcpAdapter) -> None:
    fake.add_mig("us-central1-a", "gke-prod-h100", machine_type="a3-highgpu-8g", size=1)
    fake.fail_next_resize(
        "us-central1-a", "gke-prod-h100", http_status=503, reason="ZONE_RESOURCE_POOL_EXHAUSTED", as_operation=True
    )
    with pytest.raises(errors.CapacityError) as info:
        adapter.scale_pool(base.ScaleRequest(ref=ref(), desired_nodes=2))
    assert (info.value.code, info.value.blocks, info.value.zone) == (
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "zone",
        "us-central1-a",
    )
    assert adapter.pool_state(ref()).desired_nodes == 1


def test_quota_http_error_maps_to_quota_exceeded(fake: FakeGcpServer, adapter: gcp.GcpAdapter) -> None:
    fake.add_mig("us-central1-a", "gke-prod-h100", machine_type="a3-highgpu-8g", size=1)
    fake.fail_next_resize("us-central1-a", "gke-prod-h100", http_status=403, reason="quotaExceeded")
    with pytest.raises(errors.QuotaExceeded) as info:
        adapter.scale_pool(base.ScaleRequest(ref=ref(), desired_nodes=4))
    assert info.value.blocks == "region"


def test_wrong_project_is_permission_denied(fake: FakeGcpServer) -> None:
    other = gcp.GcpAdapter("someone-elses", client_factory=fake.client)
    with pytest.raises(errors.PermissionDenied) as info:
        other.regions()
    assert info.value.code == "forbidden"


def test_pool_without_zone_is_rejected(adapter: gcp.GcpAdapter) -> None:
    with pytest.raises(errors.InvalidRequest, match="needs its zone"):
        adapter.pool_state(base.PoolRef(cloud="gcp", name="p", region="us-central1"))
