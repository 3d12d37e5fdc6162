"""The controller scales (deployment, pool) StatefulSets through the scale subresource, by pool
priority: the REAL kubernetes client against the fake API server (tests/fakes)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gpufleet.infra import names, spec
from gpufleet.infra.controller import autoscale as a
from gpufleet.infra.controller.router_load import RouterLoad, samples
from gpufleet.infra.controller.runtime import ControllerMetrics
from gpufleet.infra.controller.scaler import ReplicaScaler, facts_from_plan_json
from gpufleet.provider_adapters.kubernetes import KubernetesAdapter
from tests.fakes.k8s_server import FakeKubernetes

NS = "gpufleet"


def _facts(pending_timeout_s: float = 60) -> a.AutoscaleFacts:
    auto = spec.Autoscaling.model_validate(
        {
            "signal": "in_flight",
            "target": 2,
            "scale_up_delay_s": 0,
            "scale_down_delay_s": 0,
            "pending_timeout_s": pending_timeout_s,
        }
    )
    chain = (a.PoolSlots("top", 100, capacity=2), a.PoolSlots("mid", 50, capacity=2, warm_placeholders=1))
    return a.AutoscaleFacts((a.ScalingFacts("llama", 1, 4, 1, chain, auto),), {"top": 2, "mid": 2})


@pytest.fixture
def kube() -> Iterator[FakeKubernetes]:
    with FakeKubernetes() as k:
        k.add_node("top-1", labels={names.LABEL_POOL: "top"}, gpus=2)
        k.add_node("mid-1", labels={names.LABEL_POOL: "mid"}, gpus=2)
        for pool, n in (("top", 1), ("mid", 0)):
            k.add_statefulset(
                names.replica_set_name("llama", pool),
                namespace=NS,
                replicas=n,
                labels={names.LABEL_DEPLOYMENT: "llama", names.LABEL_POOL: pool},
                gpus_per_pod=1,
                node_selector={names.LABEL_POOL: pool},
            )
        yield k  # type: ignore[misc]


def _replicas(kube: FakeKubernetes, pool: str) -> int:
    return int(kube.statefulsets[(NS, names.replica_set_name("llama", pool))]["spec"]["replicas"])


def test_load_scales_the_top_pool_to_its_room_then_the_next_and_falls_lowest_first(kube) -> None:
    adapter = KubernetesAdapter(api_client=kube.api_client(), namespace=NS)
    in_flight = {"value": 7.0}
    now = [1000.0]
    metrics = ControllerMetrics()
    scaler = ReplicaScaler(
        _facts(),
        {"top": adapter, "mid": adapter},
        load=lambda t: {"llama": a.LoadSample(t, in_flight["value"])},
        clock=lambda: now[0],
        metrics=metrics,
    )
    scaler.round()
    assert (_replicas(kube, "top"), _replicas(kube, "mid")) == (2, 2)  # ceil(7 / 2) = 4: top's 2, then mid
    assert ("PATCH", f"/apis/apps/v1/namespaces/{NS}/statefulsets/llama-top/scale") in kube.log
    assert sorted(p for (_, p) in kube.pods if p.startswith("llama-")) == [
        "llama-mid-0",
        "llama-mid-1",
        "llama-top-0",
        "llama-top-1",
    ]
    assert {o for _, o in scaler.applied} == {"applied"}
    in_flight["value"] = 2.0
    now[0] += 10
    scaler.round()
    assert (_replicas(kube, "top"), _replicas(kube, "mid")) == (1, 0)  # down to 1: mid empties first
    assert metrics.replica_target.labels("llama", "mid")._value.get() == 0


def test_a_pool_whose_pods_stay_pending_is_full_and_the_next_one_takes_the_replicas(kube) -> None:
    kube.set_node_ready("top-1", False)  # the top pool's pods cannot be scheduled
    adapter = KubernetesAdapter(api_client=kube.api_client(), namespace=NS)
    now = [0.0]
    scaler = ReplicaScaler(
        _facts(pending_timeout_s=30),
        {"top": adapter, "mid": adapter},
        load=lambda t: {"llama": a.LoadSample(t, 3.0)},
        clock=lambda: now[0],
    )
    scaler.round()
    assert _replicas(kube, "top") == 2 and _replicas(kube, "mid") == 0  # top first: its pods go Pending
    obs = scaler.observe(now[0])
    assert len(obs[("llama", "top")].pending_since_s) == 1  # the new one (llama-top-0 was placed before)
    now[0] += 31
    scaler.round()
    assert _replicas(kube, "mid") == 2  # top is full after pending_timeout_s: the next pool is used
    assert _replicas(kube, "top") == 0


def test_a_missing_statefulset_counts_as_a_full_pool_and_dry_run_changes_nothing(kube) -> None:
    adapter = KubernetesAdapter(api_client=kube.api_client(), namespace=NS)
    facts = _facts()
    chain = (a.PoolSlots("gone", 200, capacity=4), *facts.deployments[0].chain)
    facts = a.AutoscaleFacts(
        (a.ScalingFacts("llama", 1, 4, 1, chain, facts.deployments[0].autoscaling),), {"gone": 4, "top": 2, "mid": 2}
    )
    scaler = ReplicaScaler(
        facts,
        {"gone": adapter, "top": adapter, "mid": adapter},
        load=lambda t: {"llama": a.LoadSample(t, 4.0)},
        dry_run=True,
    )
    decision = scaler.round()
    assert decision.targets[("llama", "gone")] == 0 and decision.targets[("llama", "top")] == 2
    assert _replicas(kube, "top") == 1 and {o for _, o in scaler.applied} == {"dry_run"}


def test_router_in_flight_is_summed_per_deployment_and_plan_json_gives_the_facts() -> None:
    facts = _facts()
    in_flight = {"llama-top-0": 3.0, "llama-mid-1": 2.0, "other-top-0": 9.0, "llama-top-x": 5.0}
    load = samples(facts, RouterLoad(5.0, in_flight, {}, None, ("router-0",), ()))
    assert load["llama"].value == 5 and load["llama"].observed_at_s == 5.0
    plan = {
        "pools": [
            {"name": "top", "priority": 100, "max_nodes": 1, "warm_nodes": 0, "gpus_per_node": 2},
            {"name": "mid", "priority": 50, "max_nodes": 1, "warm_nodes": 1, "gpus_per_node": 2},
        ],
        "deployments": [
            {
                "name": "llama",
                "min_replicas": 1,
                "max_replicas": 4,
                "gpus_per_replica": 1,
                "failover": ["top", "mid"],
                "pools": [{"pool": "top", "replicas_per_node": 2}, {"pool": "mid", "replicas_per_node": 2}],
                "autoscaling": {"signal": "in_flight", "target": 2},
            }
        ],
    }
    got = facts_from_plan_json(plan)
    slots = [(s.pool, s.priority, s.capacity, s.warm_placeholders, s.gpus_per_node) for s in got.deployments[0].chain]
    assert slots == [("top", 100, 2, 0, 2), ("mid", 50, 2, 1, 2)] and got.pool_gpus == {"top": 2, "mid": 2}
    assert got.deployments[0].autoscaling.target == 2
