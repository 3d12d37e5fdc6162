"""Replica saturation read from the router's own /metrics exposition over loopback HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gpufleet.infra.controller import decision as d
from gpufleet.infra.controller import router_load, runtime
from gpufleet.provider_adapters import base
from gpufleet.router.metrics import RouterMetrics

FACTS = d.FleetFacts(
    pools={
        "a": d.PoolFacts("a", "kubernetes", 100, 1, 1, 0, 1, 8),
        "b": d.PoolFacts("b", "kubernetes", 50, 0, 0, 1, 3, 8),
    },
    deployments=(d.DeploymentFacts("m", ("a", "b")),),
)
PLAN = {
    "deployments": [
        {
            "name": "m",
            "max_concurrent_requests": 64,
            "replicas": [{"id": "m-a-0", "pool": "a"}, {"id": "m-a-1", "pool": "a"}],
        }
    ]
}


class StaticKube:
    """Pool utilisation that stays low, so only the router's view can make a pool hot."""

    def __init__(self) -> None:
        self.placeholders = {"a": 0, "b": 1}

    def utilisation(self, pool: str) -> base.PoolUtilisation:
        return base.PoolUtilisation(
            pool=pool,
            nodes=1,
            ready_nodes=1,
            gpus_allocatable=8,
            gpus_requested=2,
            placeholders_desired=self.placeholders[pool],
        )

    def scale_placeholders(self, pool: str, replicas: int) -> int:
        previous, self.placeholders[pool] = self.placeholders[pool], replicas
        return previous


@pytest.fixture
def router_metrics() -> Iterator[tuple[str, RouterMetrics]]:
    metrics = RouterMetrics([("m-a-0", "m"), ("m-a-1", "m")], policy="cache_aware")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = metrics.render()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics", metrics
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_saturated_replicas_warm_the_next_pool(router_metrics: tuple[str, RouterMetrics]) -> None:
    url, metrics = router_metrics
    metrics.in_flight.labels("m-a-0").set(60)
    metrics.in_flight.labels("m-a-1").set(50)  # 110 of 128 slots: 86 %
    kube = StaticKube()
    observer = runtime.Observer(
        FACTS,
        {"a": kube, "b": kube},
        router_load=router_load.RouterLoadReader(router_load.static_router(url)),
        replica_slots=runtime.replica_slots_from_plan(PLAN),
    )
    samples = observer.observe()
    assert samples["a"].replica_load == pytest.approx(110 / 128) and samples["b"].replica_load is None
    controller = runtime.Controller(FACTS, d.ControllerSettings(), observer)
    controller.reconcile()
    assert kube.placeholders["b"] == 2


def test_unreachable_router_leaves_gpu_pressure_only() -> None:
    kube = StaticKube()
    observer = runtime.Observer(
        FACTS,
        {"a": kube, "b": kube},
        router_load=router_load.RouterLoadReader(router_load.static_router("http://127.0.0.1:9/metrics"), timeout_s=1),
        replica_slots=runtime.replica_slots_from_plan(PLAN),
    )
    samples = observer.observe()
    assert samples["a"].replica_load is None and samples["a"].gpu_pressure == 0.25
    assert observer.errors and "router metrics not read" in observer.errors[0][1]
