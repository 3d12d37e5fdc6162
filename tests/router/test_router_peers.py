"""Peer routers over real loopback HTTP: each serves its own queue state on /admin/peer-state and
reads the others' (`router.peers`); garbage, dead and unauthenticated peers are handled."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from gpufleet.router.config import RouterConfig, RouterSettings
from gpufleet.router.peers import parse_peer_state
from tests.router.router_fakes import LoopThread, chat, free_port, replica_configs, serve_process, wait_for

TOKEN = "peer-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _config(replicas, peers: list[str], **settings: Any) -> str:  # type: ignore[no-untyped-def]
    cfg = RouterConfig(
        fleet="test",
        settings=RouterSettings.model_validate({"peer_interval_s": 0.05, **settings}),
        replicas=replicas,
        discovery={"peers": {"urls": peers}},
    )
    return json.dumps(cfg.model_dump(mode="json", exclude_defaults=True))


def _row(url: str, replica: str) -> dict[str, Any]:
    rows = httpx.get(url + "/admin/replicas", headers=AUTH, timeout=5).json()["replicas"]
    return next(r for r in rows if r["id"] == replica)


def _reads(url: str, result: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(f'gpufleet_router_peer_reads_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_two_router_processes_see_each_others_queued_load_and_ignore_themselves(tmp_path, replicas) -> None:
    reps = replicas(1, ttft_s=3.0)  # a first token 3 s away: the request stays queued meanwhile
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    files = []
    for i in range(2):
        f = tmp_path / f"router-{i}.json"
        f.write_text(_config(replica_configs(reps), urls))  # both list both: each is among its peers
        files.append(f)
    with (
        serve_process(files[0], port=ports[0], GPUFLEET_ADMIN_TOKEN=TOKEN) as (_, a),
        serve_process(files[1], port=ports[1], GPUFLEET_ADMIN_TOKEN=TOKEN) as (_, b),
    ):
        assert (a, b) == (urls[0], urls[1])
        # Each reads the other and recognises its own address by the id it answers with.
        assert wait_for(lambda: len(_row(b, "r0")["peers"]) == 1 and len(_row(a, "r0")["peers"]) == 1, 10)
        assert wait_for(lambda: _reads(a, "self") >= 1 and _reads(b, "self") >= 1, 10)
        state_a = parse_peer_state(httpx.get(a + "/admin/peer-state", headers=AUTH, timeout=5).content)
        assert _row(b, "r0")["peers"].keys() == {state_a[0]}  # b holds a's report under a's id
        t = threading.Thread(
            target=httpx.post,
            args=(a + "/v1/chat/completions",),
            kwargs={"json": chat("x " * 400, stream=True), "timeout": 20},
        )
        t.start()
        try:
            # The request router a sent is queued prefill in b's view of r0, in tokens.
            def seen_by_b() -> bool:
                p = next(iter(_row(b, "r0")["peers"].values()))
                return p["queued_requests"] == 1 and p["in_flight"] == 1 and p["queued_prefill_tokens"] >= 200

            assert wait_for(seen_by_b, 10)
            assert next(iter(_row(a, "r0")["peers"].values()))["in_flight"] == 0  # b sent nothing
        finally:
            t.join()
        # Done: b sees a's counts go back to zero.
        assert wait_for(lambda: next(iter(_row(b, "r0")["peers"].values()))["in_flight"] == 0, 10)


@pytest.fixture
def bad_peers(loop_thread: LoopThread) -> Iterator[dict[str, str]]:
    """Peers that answer garbage: not JSON, JSON of the wrong shape, negative counts, a 500."""
    bodies = {
        "/text": (200, b"not json at all"),
        "/shape": (200, b'{"router": "x", "replicas": [1, 2]}'),
        "/negative": (
            200,
            b'{"router": "y", "replicas": {"r0": {"queued_prefill_tokens": -1, "queued_requests": 0, "in_flight": 0}}}',
        ),
        "/error": (500, b"boom"),
    }

    async def handle(request: web.Request) -> web.Response:
        status, body = bodies[request.path.removesuffix("/admin/peer-state")]
        return web.Response(status=status, body=body)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    loop_thread.run(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop_thread.run(site.start())
    port = runner.addresses[0][1]
    yield {k: f"http://127.0.0.1:{port}{k}" for k in bodies}
    loop_thread.run(runner.cleanup())


def test_garbage_and_dead_peers_are_ignored_counted_and_routing_goes_on(replicas, make_router, bad_peers) -> None:
    reps = replicas(1)
    dead = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    rr = make_router(
        replica_configs(reps),
        settings={"peer_interval_s": 0.05, "peer_timeout_s": 0.5},
        discovery={"peers": {"urls": [*bad_peers.values(), dead]}},
        admin_token=TOKEN,
    )
    # Three bodies that are no peer state; a 500 and a dead port that give none.
    assert wait_for(lambda: _reads(rr.url, "invalid") >= 3 and _reads(rr.url, "failed") >= 2, 10)
    assert _reads(rr.url, "ok") == 0
    assert _row(rr.url, "r0")["peers"] == {}  # nothing from any of them reached the replica's state
    r = httpx.post(rr.url + "/v1/chat/completions", json=chat("hello"), timeout=10)
    assert r.status_code == 200  # and the router routes as before


def test_peer_state_needs_the_admin_token(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps), admin_token=TOKEN)
    url = rr.url + "/admin/peer-state"
    no = httpx.get(url, timeout=5)
    assert no.status_code == 401 and no.json()["error"]["message"].startswith("admin endpoints need")
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 403
    ok = httpx.get(url, headers=AUTH, timeout=5)
    assert ok.status_code == 200
    rid, counts = parse_peer_state(ok.content)
    assert rid == rr.router.router_id and counts == {"r0": (0, 0, 0)}
    closed = make_router(replica_configs(reps))  # no admin token configured: the endpoint is off
    assert httpx.get(closed.url + "/admin/peer-state", headers=AUTH, timeout=5).status_code == 403


def test_routers_find_each_other_in_their_services_endpoint_slices(loop_thread, replicas) -> None:
    from gpufleet.infra import names
    from gpufleet.router import app as router_app
    from tests.fakes.k8s_server import FakeKubernetes

    reps = replicas(1)
    ns = "gpufleet"
    labels = {names.LABEL_FLEET: "f", "app.kubernetes.io/component": "router"}
    ports = [free_port(), free_port()]
    started = []
    with FakeKubernetes() as kube:
        kube.add_node("cpu-1", labels={}, gpus=0)
        for i, port in enumerate(ports):  # the router pods, reachable at the routers below
            kube.pod_network[f"router-{i}"] = ("127.0.0.1", {"http": port})
        kube.add_statefulset("router", namespace=ns, replicas=2, labels=labels)
        kube.add_service("router", namespace=ns, selector=labels, labels=labels)
        for i in range(2):
            kube.set_pod_ready(ns, f"router-{i}")
        try:
            for port in ports:
                cfg = RouterConfig.model_validate(
                    {
                        "fleet": "f",
                        "settings": {"peer_interval_s": 0.05},
                        "replicas": replica_configs(reps),
                        "discovery": {
                            "peers": {"kubernetes": {"namespace": ns, "service": "router", "refresh_s": 0.2}}
                        },
                    }
                )
                app = router_app.create_app(cfg, admin_token=TOKEN, kube_api_client=kube.api_client())
                runner, _ = loop_thread.run(router_app.start(app, "127.0.0.1", port))
                started.append((f"http://127.0.0.1:{port}", app[router_app.ROUTER_KEY], runner))
            (a, ra, _), (b, rb, _) = started
            # Each found both pods, recognised itself and reads the other.
            assert wait_for(lambda: loop_thread.call(lambda: set(ra.replicas.get("r0").peers)) == {rb.router_id}, 10)
            assert wait_for(lambda: loop_thread.call(lambda: set(rb.replicas.get("r0").peers)) == {ra.router_id}, 10)
            assert _reads(a, "self") >= 1 and _reads(b, "self") >= 1
            # The other pod goes unready: it leaves the slices, and its reports are dropped.
            kube.set_pod_ready(ns, "router-1", False)
            assert wait_for(lambda: loop_thread.call(lambda: not ra.replicas.get("r0").peers), 10)
        finally:
            for _, _, runner in started:
                loop_thread.run(runner.cleanup())
