"""Kubernetes discovery end to end: the REAL kubernetes client lists and watches EndpointSlices on
the fake API server (tests/fakes), and the router's membership follows the pods' readiness."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gpufleet.infra import names
from gpufleet.router import app as router_app
from gpufleet.router.config import (
    DiscoverySettings,
    DiscoveryTarget,
    KubernetesDiscovery,
    RouterConfig,
    RouterSettings,
)
from gpufleet.router.discovery import read_slice
from tests.fakes.k8s_server import FakeKubernetes
from tests.router.router_fakes import FakeReplica, RunningRouter, chat, wait_for

NS = "gpufleet"
FLEET = "f"
TOKEN = "tok"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _labels(deployment: str, pool: str) -> dict[str, str]:
    return {names.LABEL_FLEET: FLEET, names.LABEL_DEPLOYMENT: deployment, names.LABEL_POOL: pool}


def _target(pool: str = "aws", priority: int = 10, **kw: Any) -> DiscoveryTarget:
    return DiscoveryTarget(
        deployment="llama",
        pool=pool,
        model="m",
        priority=priority,
        kv_capacity_tokens=kw.pop("kv_capacity_tokens", 123_456),
        max_model_len=4096,
        max_concurrent_requests=8,
        **kw,
    )


def _discovery(targets: list[DiscoveryTarget], **kw: Any) -> KubernetesDiscovery:
    return KubernetesDiscovery(
        namespace=NS,
        label_selector=f"{names.LABEL_FLEET}={FLEET},{names.LABEL_POOL}",
        targets=targets,
        watch_timeout_s=kw.pop("watch_timeout_s", 30),
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
        **kw,
    )


@pytest.fixture
def kube() -> Iterator[FakeKubernetes]:
    with FakeKubernetes() as k:
        k.add_node("gpu-1", labels={names.LABEL_POOL: "aws"}, gpus=8)
        yield k  # type: ignore[misc]


@pytest.fixture
def discovered_router(loop_thread) -> Iterator[Callable[..., RunningRouter]]:
    started: list[RunningRouter] = []

    def make(kube: FakeKubernetes, disc: KubernetesDiscovery, replicas: list | None = None) -> RunningRouter:
        cfg = RouterConfig(
            fleet=FLEET,
            settings=RouterSettings(policy="round_robin", health={"interval_s": 30}),
            replicas=replicas or [],
            discovery=DiscoverySettings(kubernetes=disc),
        )
        app = router_app.create_app(cfg, admin_token=TOKEN, kube_api_client=kube.api_client())
        runner, port = loop_thread.run(router_app.start(app, "127.0.0.1", 0))
        rr = RunningRouter(url=f"http://127.0.0.1:{port}", router=app[router_app.ROUTER_KEY], app=app, runner=runner)
        started.append(rr)
        return rr

    yield make
    for rr in started:
        loop_thread.run(rr.runner.cleanup())


def _statefulset(kube: FakeKubernetes, reps: list[FakeReplica], pool: str = "aws", deployment: str = "llama") -> str:
    """The (deployment, pool) StatefulSet and its Service, its pods reachable at the fake replicas."""
    sts = names.replica_set_name(deployment, pool)
    for i, rep in enumerate(reps):
        kube.pod_network[names.replica_id(deployment, pool, i)] = ("127.0.0.1", {"http": rep.port})
    labels = _labels(deployment, pool)
    kube.add_statefulset(sts, namespace=NS, replicas=len(reps), labels=labels, gpus_per_pod=1)
    kube.add_service(sts, namespace=NS, selector=labels, labels=labels)
    return sts


def _members(rr: RunningRouter) -> list[str]:
    return sorted(r.id for r in rr.router.replicas)


def test_a_pod_that_becomes_ready_joins_and_carries_what_the_plan_knows(replicas, kube, discovered_router) -> None:
    reps = replicas(2)
    sts = _statefulset(kube, reps)
    rr = discovered_router(kube, _discovery([_target()]))
    assert wait_for(lambda: rr.router.discovery.synced.is_set())
    assert _members(rr) == []  # scheduled, not ready: not routed to
    r = httpx.post(rr.url + "/v1/chat/completions", json=chat("hi"))
    assert r.status_code == 503  # the plan's model is known, it just has no replica yet
    assert httpx.get(rr.url + "/ready").status_code == 503
    kube.set_pod_ready(NS, f"{sts}-0")
    assert wait_for(lambda: _members(rr) == [f"{sts}-0"])
    r0 = rr.router.replicas.get(f"{sts}-0")
    assert (r0.pool, r0.priority, r0.kv_capacity_tokens, r0.model) == ("aws", 10, 123_456, "m")
    assert r0.url == f"http://127.0.0.1:{reps[0].port}"
    assert rr.router.replicas.source_of(r0.id) == f"kubernetes:{NS}/{sts}"
    r = httpx.post(rr.url + "/v1/chat/completions", json=chat("hi"))
    assert r.status_code == 200 and r.headers["x-gpufleet-replica"] == f"{sts}-0"
    kube.set_pod_ready(NS, f"{sts}-1")
    assert wait_for(lambda: _members(rr) == [f"{sts}-0", f"{sts}-1"])
    seen = {
        httpx.post(rr.url + "/v1/chat/completions", json=chat(f"q{i}")).headers["x-gpufleet-replica"] for i in range(4)
    }
    assert seen == {f"{sts}-0", f"{sts}-1"}
    assert reps[1].requests  # the request really reached the pod's address


def test_a_deleted_or_unready_pod_leaves_and_the_stayer_keeps_its_state(replicas, kube, discovered_router) -> None:
    reps = replicas(2)
    sts = _statefulset(kube, reps)
    for i in range(2):
        kube.set_pod_ready(NS, f"{sts}-{i}")
    rr = discovered_router(kube, _discovery([_target()]))
    assert wait_for(lambda: len(_members(rr)) == 2)
    stayer = rr.router.replicas.get(f"{sts}-0")
    kube.delete_pod(NS, f"{sts}-1")  # the StatefulSet makes it again, not ready
    assert wait_for(lambda: _members(rr) == [f"{sts}-0"])
    assert rr.router.replicas.get(f"{sts}-0") is stayer
    kube.set_pod_ready(NS, f"{sts}-1")
    assert wait_for(lambda: len(_members(rr)) == 2)
    kube.set_pod_ready(NS, f"{sts}-0", False)
    assert wait_for(lambda: _members(rr) == [f"{sts}-1"])
    assert {
        httpx.post(rr.url + "/v1/chat/completions", json=chat(f"x{i}")).headers["x-gpufleet-replica"] for i in range(3)
    } == {f"{sts}-1"}


def test_a_410_gone_makes_the_watch_re_list(replicas, kube, discovered_router) -> None:
    reps = replicas(2)
    sts = _statefulset(kube, reps)
    kube.set_pod_ready(NS, f"{sts}-0")
    rr = discovered_router(kube, _discovery([_target()]))
    assert wait_for(lambda: _members(rr) == [f"{sts}-0"])
    lists = rr.router.metrics.discovery_relists.labels("gone")
    kube.expire_watches()  # open watches end; resuming from an older version is a 410
    kube.set_pod_ready(NS, f"{sts}-1")
    assert wait_for(lambda: lists._value.get() >= 1)
    assert wait_for(lambda: _members(rr) == [f"{sts}-0", f"{sts}-1"])
    assert any(q.get("resourceVersion") for q in kube.watch_requests)  # it watched from a version
    text = httpx.get(rr.url + "/metrics").text
    assert 'gpufleet_router_discovery_lists_total{reason="gone"}' in text


def test_endpoints_with_labels_the_plan_does_not_know_are_ignored_and_counted(
    replicas, kube, discovered_router
) -> None:
    reps = replicas(2)
    sts = _statefulset(kube, reps[:1])
    stranger = _statefulset(kube, reps[1:], deployment="other")  # the plan knows no (other, aws)
    kube.set_pod_ready(NS, f"{sts}-0")
    kube.set_pod_ready(NS, f"{stranger}-0")
    rr = discovered_router(kube, _discovery([_target()]))
    assert wait_for(lambda: _members(rr) == [f"{sts}-0"])
    gauge = rr.router.metrics.discovery_ignored.labels("unknown_labels")
    assert wait_for(lambda: gauge._value.get() == 1)
    assert (
        'gpufleet_router_discovery_ignored_endpoints{reason="unknown_labels"} 1.0'
        in httpx.get(rr.url + "/metrics").text
    )


def test_api_errors_back_off_and_discovery_recovers(replicas, kube, discovered_router) -> None:
    reps = replicas(1)
    sts = _statefulset(kube, reps)
    kube.set_pod_ready(NS, f"{sts}-0")
    kube.forbidden.add("/apis/discovery.k8s.io")  # RBAC not granted yet
    rr = discovered_router(kube, _discovery([_target()]))
    errors = rr.router.metrics.discovery_errors.labels("403")
    assert wait_for(lambda: errors._value.get() >= 2)
    assert _members(rr) == []
    kube.forbidden.clear()
    assert wait_for(lambda: _members(rr) == [f"{sts}-0"])


def test_a_discovered_id_that_the_config_already_lists_stays_the_configs(replicas, kube, discovered_router) -> None:
    reps = replicas(1)
    sts = _statefulset(kube, reps)
    kube.set_pod_ready(NS, f"{sts}-0")
    static = [
        {
            "id": f"{sts}-0",
            "url": reps[0].url,
            "deployment": "llama",
            "model": "m",
            "pool": "aws",
            "priority": 10,
            "kv_capacity_tokens": 1,
            "max_model_len": 4096,
            "max_concurrent_requests": 8,
        }
    ]
    rr = discovered_router(kube, _discovery([_target()]), replicas=static)
    gauge = rr.router.metrics.discovery_ignored.labels("id_conflict")
    assert wait_for(lambda: gauge._value.get() == 1)
    assert rr.router.replicas.source_of(f"{sts}-0") == "config"


def test_read_slice_takes_only_ready_endpoints_and_the_plan_facts() -> None:
    disc = _discovery([_target(port="api", scheme="https", data_parallel_size=2)])
    obj = {
        "metadata": {
            "name": "llama-aws-x1",
            "labels": {**_labels("llama", "aws"), "kubernetes.io/service-name": "llama-aws", "model": "evil"},
        },
        "ports": [{"name": "api", "port": 9000}],
        "endpoints": [
            {"addresses": ["fd00::1"], "conditions": {"ready": True}, "targetRef": {"kind": "Pod", "name": "p0"}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": False}, "targetRef": {"kind": "Pod", "name": "p1"}},
            {"addresses": ["10.0.0.3"], "conditions": {}, "targetRef": {"kind": "Pod", "name": "p2"}},
            {"addresses": [], "conditions": {"ready": True}},
        ],
    }
    view = read_slice(obj, {("llama", "aws"): disc.targets[0]}, disc)
    assert view.service == "llama-aws"
    assert [(r.id, r.url, r.model) for r in view.replicas] == [
        ("p0", "https://[fd00::1]:9000", "m"),
        ("p2", "https://10.0.0.3:9000", "m"),  # a nil `ready` reads as ready
    ]
    assert view.ignored == {"no_address": 1}
    assert {r.data_parallel_size for r in view.replicas} == {2}  # each pod: one KV-event stream per rank
    obj["ports"] = [{"name": "metrics", "port": 9100}]
    assert read_slice(obj, {("llama", "aws"): disc.targets[0]}, disc).ignored == {"no_port": 3}
