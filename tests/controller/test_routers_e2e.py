"""End to end: two REAL routers (in front of fake OpenAI-compatible replicas) on loopback, found by
the controller through the router Service's EndpointSlices on the fake Kubernetes API server with
the REAL kubernetes client; their load, added up, scales the (deployment, pool) StatefulSets."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gpufleet.infra import names, spec
from gpufleet.infra.controller import autoscale as a
from gpufleet.infra.controller import router_load as rl
from gpufleet.infra.controller.runtime import ControllerMetrics
from gpufleet.infra.controller.scaler import ReplicaScaler
from gpufleet.provider_adapters.kubernetes import KubernetesAdapter
from gpufleet.router import app as router_app
from gpufleet.router.config import ReplicaConfig, RouterConfig, RouterSettings
from tests.fakes.k8s_server import FakeKubernetes
from tests.router.router_fakes import FakeReplica, LoopThread, RunningRouter, chat, wait_for

NS = "gpufleet"
ROUTER = "f-router"
ROUTER_LABELS = {names.LABEL_FLEET: "f", "app.kubernetes.io/component": "router"}
REPLICA = "llama-top-0"


def _facts(signal: str, target: float) -> a.AutoscaleFacts:
    auto = spec.Autoscaling.model_validate(
        {"signal": signal, "target": target, "scale_up_delay_s": 0, "scale_down_delay_s": 0}
    )
    chain = (a.PoolSlots("top", 100, capacity=2), a.PoolSlots("mid", 50, capacity=2, warm_placeholders=1))
    return a.AutoscaleFacts((a.ScalingFacts("llama", 1, 4, 1, chain, auto),), {"top": 2, "mid": 2})


class Fleet:
    """The fake cluster, two routers, one fake replica behind them, and the controller's reader."""

    def __init__(self, kube: FakeKubernetes, loop: LoopThread, replica: FakeReplica) -> None:
        self.kube, self.loop, self.replica = kube, loop, replica
        self.routers: list[RunningRouter] = []
        self.now = [1000.0]
        self.metrics = ControllerMetrics()
        self.adapter = KubernetesAdapter(api_client=kube.api_client(), namespace=NS)
        self.reader = rl.RouterLoadReader(
            rl.service_routers(self.adapter, ROUTER),
            timeout_s=1.0,
            window_s=30.0,
            clock=lambda: self.now[0],
            metrics=self.metrics,
        )

    def start_router(self) -> RunningRouter:
        cfg = RouterConfig(
            fleet="f",
            settings=RouterSettings(policy="round_robin", health={"interval_s": 30}),
            replicas=[
                ReplicaConfig(id=REPLICA, url=self.replica.url, deployment="llama", model="m", pool="top",
                              priority=100, kv_capacity_tokens=100_000, max_model_len=8192, max_concurrent_requests=64)
            ],
        )  # fmt: skip
        app = router_app.create_app(cfg)
        runner, port = self.loop.run(router_app.start(app, "127.0.0.1", 0))
        rr = RunningRouter(url=f"http://127.0.0.1:{port}", router=app[router_app.ROUTER_KEY], app=app, runner=runner)
        self.routers.append(rr)
        return rr

    def scaler(self, facts: a.AutoscaleFacts) -> ReplicaScaler:
        return ReplicaScaler(
            facts,
            {"top": self.adapter, "mid": self.adapter},
            load=lambda _now: rl.samples(facts, self.reader.read()),
            clock=lambda: self.now[0],
        )

    def queued(self, rr: RunningRouter) -> int:
        return int(self.loop.call(lambda: rr.router.replicas.get(REPLICA).queued_prefill_tokens))

    def replicas(self, pool: str) -> int:
        return int(self.kube.statefulsets[(NS, names.replica_set_name("llama", pool))]["spec"]["replicas"])


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    loop = LoopThread()
    replica = FakeReplica(name=REPLICA, ttft_s=0.3)
    loop.run(replica.start())
    with FakeKubernetes() as kube:
        kube.add_node("top-1", labels={names.LABEL_POOL: "top"}, gpus=2)
        kube.add_node("mid-1", labels={names.LABEL_POOL: "mid"}, gpus=2)
        kube.add_node("cpu-1", labels={}, gpus=0)
        for pool, n in (("top", 1), ("mid", 0)):
            kube.add_statefulset(
                names.replica_set_name("llama", pool),
                namespace=NS,
                replicas=n,
                labels={names.LABEL_DEPLOYMENT: "llama", names.LABEL_POOL: pool},
                gpus_per_pod=1,
                node_selector={names.LABEL_POOL: pool},
            )
        f = Fleet(kube, loop, replica)
        try:
            for i in range(2):
                rr = f.start_router()
                kube.pod_network[f"{ROUTER}-{i}"] = ("127.0.0.1", {"http": int(rr.url.rsplit(":", 1)[1])})
            # The router pods (a StatefulSet in the fake: only their names, readiness and
            # addresses matter to the Service's EndpointSlices) and the router Service.
            kube.add_statefulset(ROUTER, namespace=NS, replicas=2, labels=ROUTER_LABELS, ports={"http": 8080})
            kube.add_service(ROUTER, namespace=NS, selector=ROUTER_LABELS, labels=ROUTER_LABELS)
            for i in range(2):
                kube.set_pod_ready(NS, f"{ROUTER}-{i}")
            yield f
        finally:
            for rr in f.routers:
                loop.run(rr.runner.cleanup())
            loop.run(replica.stop())
            loop.close()


def _post(url: str, body: dict[str, Any]) -> None:
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=20) as r:
        r.read()


def _in_background(calls: list[Callable[[], None]]) -> list[threading.Thread]:
    threads = [threading.Thread(target=c) for c in calls]
    for t in threads:
        t.start()
    return threads


def test_the_controller_finds_both_router_pods_by_their_endpoint_slices(fleet: Fleet) -> None:
    urls = rl.service_routers(fleet.adapter, ROUTER)()
    assert sorted(urls) == [f"{ROUTER}-0", f"{ROUTER}-1"]
    assert sorted(urls.values()) == sorted(rr.url + "/metrics" for rr in fleet.routers)
    fleet.kube.set_pod_ready(NS, f"{ROUTER}-1", False)  # not ready: not read
    assert sorted(rl.service_routers(fleet.adapter, ROUTER)()) == [f"{ROUTER}-0"]


def test_queued_prefill_of_both_routers_adds_up_and_fills_the_top_pool_then_the_next(fleet: Fleet) -> None:
    fleet.replica.ttft_s = 3.0  # the prefills stay queued while the controller looks
    a_router, b_router = fleet.routers
    body = chat("tokens " * 300, stream=True)
    threads = _in_background(
        [lambda: _post(a_router.url, body), lambda: _post(a_router.url, body), lambda: _post(b_router.url, body)]
    )
    try:
        assert wait_for(lambda: fleet.queued(a_router) > 0 and fleet.queued(b_router) > 0, timeout=5)
        assert wait_for(lambda: fleet.queued(a_router) == 2 * fleet.queued(b_router), timeout=5)
        per_request = fleet.queued(b_router)
        load = fleet.reader.read()
        assert load is not None and not load.partial and sorted(load.answered) == [f"{ROUTER}-0", f"{ROUTER}-1"]
        assert load.queued_prefill_tokens[REPLICA] == 3 * per_request  # both routers, added up
        assert load.in_flight[REPLICA] == 3
        # Target: one request's prefill per replica; three queued ask for three replicas.
        scaler = fleet.scaler(_facts("queued_prefill_tokens", per_request))
        decision = scaler.round()
        assert decision.desired["llama"] == 3
        assert (fleet.replicas("top"), fleet.replicas("mid")) == (2, 1)
    finally:
        for t in threads:
            t.join()


def test_ttft_histograms_of_both_routers_merge_into_the_p90_that_scales(fleet: Fleet) -> None:
    scaler = fleet.scaler(_facts("ttft_p90_s", 0.1))
    scaler.round()  # the first read sets each pod's baseline: no window yet, the count holds
    assert fleet.replicas("top") == 1
    for rr in fleet.routers:
        for i in range(3):
            _post(rr.url, chat(f"stream {i}", stream=True))
    fleet.now[0] += 10
    load = fleet.reader.read()
    assert load is not None and load.ttft is not None
    assert load.ttft[REPLICA][float("inf")] == 6  # three streams through each router
    p90 = rl.samples(_facts("ttft_p90_s", 0.1), load)["llama"].value
    assert p90 is not None and 0.3 <= p90 <= 0.75  # the replica's 0.3 s to first token, in its bucket
    fleet.now[0] += 10
    decision = scaler.round()  # the same window (30 s) still holds those six: p90 / 0.1 > 3x
    assert decision.desired["llama"] == 4 and (fleet.replicas("top"), fleet.replicas("mid")) == (2, 2)


def test_a_router_pod_that_fails_is_counted_and_left_out_and_never_passes_for_idle(fleet: Fleet, caplog) -> None:  # type: ignore[no-untyped-def]
    scaler = fleet.scaler(_facts("in_flight", 10))
    fleet.adapter.scale_replica_set(names.replica_set_name("llama", "top"), 2)
    fleet.loop.run(fleet.routers[1].runner.cleanup())  # router 1 dies; its pod still shows ready
    fleet.routers.pop()
    with caplog.at_level(logging.WARNING, logger="gpufleet.controller.routers"):
        decision = scaler.round()
    assert any(f"{ROUTER}-1" in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)
    assert fleet.metrics.router_scrapes.labels(f"{ROUTER}-1", "failed")._value.get() == 1
    assert fleet.metrics.router_scrapes.labels(f"{ROUTER}-0", "ok")._value.get() == 1
    # No request in flight on the router that answered, but the other may hold them: no scale-down.
    assert fleet.reader.last is not None and fleet.reader.last.partial
    assert decision.targets[("llama", "top")] == 2 and fleet.replicas("top") == 2
    fleet.kube.set_pod_ready(NS, f"{ROUTER}-1", False)  # the pod leaves the Service's endpoints
    fleet.now[0] += 15
    decision = scaler.round()
    assert fleet.reader.last is not None and not fleet.reader.last.partial
    assert decision.targets[("llama", "top")] == 1 and fleet.replicas("top") == 1  # complete and idle
