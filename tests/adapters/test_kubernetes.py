"""Kubernetes adapter: the REAL kubernetes client against the stateful fake API server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gpufleet.infra import names
from gpufleet.provider_adapters import base, errors
from gpufleet.provider_adapters import kubernetes as kube_adapter
from tests.fakes.k8s_server import FakeKubernetes, label_selector_matches

NS = "gpufleet-system"
POOL = {"gpufleet.io/pool": "aws-h100"}
PLACEHOLDER = {"app.kubernetes.io/component": "placeholder", **POOL}


@pytest.fixture
def kube() -> Iterator[FakeKubernetes]:
    with FakeKubernetes() as server:
        yield server


@pytest.fixture
def adapter(kube: FakeKubernetes) -> kube_adapter.KubernetesAdapter:
    return kube_adapter.KubernetesAdapter(kube.api_client(), namespace=NS)


def two_node_pool(kube: FakeKubernetes, placeholders: int = 1) -> None:
    kube.add_node("h100-a", labels=POOL, gpus=8)
    kube.add_node("h100-b", labels=POOL, gpus=8)
    kube.add_node("other", labels={"gpufleet.io/pool": "gcp-h100"}, gpus=8)
    kube.add_pod("vllm-0", namespace="serving", labels={"app": "vllm"}, gpus=4, node_selector=POOL)
    kube.add_deployment(
        names.placeholder_name("aws-h100"),
        namespace=NS,
        replicas=placeholders,
        labels=PLACEHOLDER,
        gpus_per_pod=8,
        node_selector=POOL,
    )


def test_utilisation_counts_serving_placeholder_and_pending_gpus(
    kube: FakeKubernetes, adapter: kube_adapter.KubernetesAdapter
) -> None:
    two_node_pool(kube)
    # A 4-GPU pod that cannot fit next to the 4 used on one node and the placeholder on the other
    # preempts the placeholder; the recreated placeholder then waits Pending.
    kube.add_pod("vllm-1", namespace="serving", labels={"app": "vllm"}, gpus=8, node_selector=POOL)
    kube.add_pod("vllm-2", namespace="serving", labels={"app": "vllm"}, gpus=8, node_selector=POOL)
    u = adapter.utilisation("aws-h100")
    assert (u.nodes, u.ready_nodes, u.gpus_allocatable) == (2, 2, 16)
    assert (u.gpus_requested, u.gpus_placeholder, u.placeholders_running, u.placeholders_desired) == (12, 0, 0, 1)
    assert (u.pending_gpu_pods, u.pending_gpus) == (1, 8)


def test_placeholders_hold_gpus_separately_from_serving(
    kube: FakeKubernetes, adapter: kube_adapter.KubernetesAdapter
) -> None:
    two_node_pool(kube)
    u = adapter.utilisation("aws-h100")
    assert (u.gpus_requested, u.gpus_placeholder, u.placeholders_running, u.pending_gpus) == (4, 8, 1, 0)


def test_not_ready_node_has_no_allocatable_gpus(kube: FakeKubernetes, adapter: kube_adapter.KubernetesAdapter) -> None:
    two_node_pool(kube, placeholders=0)
    kube.set_node_ready("h100-b", False)
    u = adapter.utilisation("aws-h100")
    assert (u.nodes, u.ready_nodes, u.gpus_allocatable) == (2, 1, 8)
    state = adapter.pool_state(base.PoolRef(cloud="kubernetes", name="aws-h100"))
    assert (state.desired_nodes, state.ready_nodes, state.max_nodes) == (2, 1, None)


def test_scale_placeholders_changes_running_count(
    kube: FakeKubernetes, adapter: kube_adapter.KubernetesAdapter
) -> None:
    two_node_pool(kube)
    assert adapter.scale_placeholders("aws-h100", 2) == 1
    u = adapter.utilisation("aws-h100")
    # Only one node has 8 free GPUs: the second placeholder pends (it is what asks for a node).
    assert (u.placeholders_desired, u.placeholders_running) == (2, 1)
    kube.add_node("h100-c", labels=POOL, gpus=8)
    assert adapter.utilisation("aws-h100").placeholders_running == 2
    assert adapter.scale_placeholders("aws-h100", 0) == 2
    assert adapter.utilisation("aws-h100").placeholders_running == 0


def test_missing_placeholder_deployment(adapter: kube_adapter.KubernetesAdapter) -> None:
    assert adapter.placeholder_count("nope") is None
    with pytest.raises(errors.NotFound, match="warm-nope"):
        adapter.scale_placeholders("nope", 1)


def test_forbidden_maps_to_permission_denied(kube: FakeKubernetes, adapter: kube_adapter.KubernetesAdapter) -> None:
    kube.forbidden.add("/api/v1/nodes")
    with pytest.raises(errors.PermissionDenied) as info:
        adapter.utilisation("aws-h100")
    assert (info.value.code, info.value.blocks) == ("Forbidden", "cloud")


def test_unreachable_api_is_a_typed_error() -> None:
    from kubernetes import client

    config = client.Configuration()
    config.host = "http://127.0.0.1:9"  # discard port: nothing listens
    config.retries = 0
    adapter = kube_adapter.KubernetesAdapter(client.ApiClient(config))
    with pytest.raises(errors.AdapterError) as info:
        adapter.utilisation("aws-h100")
    assert info.value.code == "Unreachable"


def test_cannot_scale_nodes_of_an_existing_cluster(adapter: kube_adapter.KubernetesAdapter) -> None:
    ref = base.PoolRef(cloud="kubernetes", name="aws-h100")
    with pytest.raises(errors.Unsupported, match="autoscaler"):
        adapter.scale_pool(base.ScaleRequest(ref=ref, desired_nodes=3))


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("a=1", True),
        ("a==1,b", True),
        ("a!=1", False),
        ("!c", True),
        ("c", False),
        ("a in (1,2),b notin (x)", True),
        ("b in (x, y)", False),
    ],
)
def test_fake_label_selectors(selector: str, expected: bool) -> None:
    assert label_selector_matches(selector, {"a": "1", "b": "2"}) is expected


def test_pending_replica_counts_against_its_planned_pool(
    kube: FakeKubernetes, adapter: kube_adapter.KubernetesAdapter
) -> None:
    # Like the rendered StatefulSets: pool label = planned pool, required affinity over the failover pools.
    kube.add_node("h100-a", labels=POOL, gpus=8)
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": "gpufleet.io/pool", "operator": "In", "values": ["aws-h100", "gcp-h100"]}
                        ]
                    }
                ]
            }
        }
    }
    for i in range(3):
        kube.add_pod(f"llama-{i}", namespace="serving", labels=dict(POOL), gpus=4, affinity=affinity)
    u = adapter.utilisation("aws-h100")
    assert (u.gpus_requested, u.pending_gpu_pods, u.pending_gpus) == (8, 1, 4)
    assert adapter.utilisation("gcp-h100").pending_gpus == 0


def test_names_match_the_rendered_manifests() -> None:
    from pathlib import Path

    from gpufleet.infra import manifests, plan

    fleet = Path(__file__).resolve().parents[2] / "stacks" / "multicloud" / "fleet.yaml"
    compiled = plan.compile_file(str(fleet))
    pool = compiled.pools[0]
    obj = manifests.placeholder_deployment(compiled, pool)
    assert obj["metadata"]["name"] == names.placeholder_name(pool.name)
    template_labels = obj["spec"]["template"]["metadata"]["labels"]
    assert template_labels[names.LABEL_COMPONENT] == names.PLACEHOLDER_COMPONENT
    assert template_labels[names.LABEL_POOL] == manifests.pool_labels(pool)[names.LABEL_POOL] == pool.name


def test_many_pools_are_read_with_one_node_and_one_pod_list(
    kube: FakeKubernetes, adapter: kube_adapter.KubernetesAdapter
) -> None:
    two_node_pool(kube)
    kube.add_pod("g-0", namespace="serving", gpus=8, node_selector={"gpufleet.io/pool": "gcp-h100"})
    kube.log.clear()
    both = adapter.utilisations(["aws-h100", "gcp-h100"])
    assert (both["aws-h100"].gpus_requested, both["gcp-h100"].gpus_requested) == (4, 8)
    assert both["aws-h100"] == adapter.utilisation("aws-h100").model_copy(
        update={"observed_at_s": both["aws-h100"].observed_at_s}
    )
    lists = [path for method, path in kube.log[:4] if path in ("/api/v1/nodes", "/api/v1/pods")]
    assert lists == ["/api/v1/nodes", "/api/v1/pods"]
