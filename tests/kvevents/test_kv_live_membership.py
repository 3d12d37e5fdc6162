"""KV-event streams follow live membership over real sockets: replica-sims that join a running router
(admin API, config reload, Kubernetes discovery) are subscribed and routed from their events; one
that leaves loses its stream, its index entries, its `gpufleet_router_kv_state` and its admin row."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

import aiohttp
import pytest
import yaml

from gpufleet.infra import names
from gpufleet.router import app as router_app
from gpufleet.router.config import (
    DiscoverySettings,
    DiscoveryTarget,
    KubernetesDiscovery,
    ReplicaConfig,
    RouterConfig,
    RouterSettings,
)
from gpufleet.router.kvevents import keys
from gpufleet.router.replica.app import listen
from tests.fakes.k8s_server import FakeKubernetes
from tests.kvevents import vllm_structs as v
from tests.kvevents.sims import chat_body, make_sim, replica_config

pytestmark = pytest.mark.timeout(90)
BS = 4
TOKEN = "tok"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _settings(tok: Any) -> RouterSettings:
    return RouterSettings(block_size_tokens=BS, kv_events={"enabled": True, "tokenizer": str(tok)})


PROMPT = [f"w{i}" for i in range(40)]


async def _served_by_events(http: aiohttp.ClientSession, router: Any, sim_port: int, rid: str) -> None:
    """Send PROMPT straight to the replica; wait until the router's index holds its blocks from events."""
    async with http.post(f"http://127.0.0.1:{sim_port}/v1/chat/completions", json=chat_body(PROMPT)) as r:
        assert r.status == 200
    ks = keys.block_keys(router.kv.tokenizer.encode_body(chat_body(PROMPT)), BS)
    end = time.monotonic() + 10
    while not (router.kv.index.exact(rid) and router.kv.index.match(ks, [rid])[0] == len(ks)):
        assert time.monotonic() < end, f"{rid}'s events never reached the router's index"
        await asyncio.sleep(0.05)


async def _admin_rows(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/admin/replicas", headers=AUTH) as r:
        return {row["id"]: row for row in (await r.json())["replicas"]}


async def _metrics(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as r:
        return await r.text()


async def _assert_gone(http: aiohttp.ClientSession, url: str, router: Any, rid: str) -> None:
    assert rid not in router.kv.streams.status and rid not in router.kv.index.replicas
    assert rid not in await _admin_rows(http, url)
    assert f'gpufleet_router_kv_state{{replica="{rid}"' not in await _metrics(http, url)
    await asyncio.sleep(0.05)  # the cancelled stream task ran its finally: no task left for it
    assert rid not in router.kv.streams._by_replica


def test_a_replica_sim_added_and_removed_through_the_admin_api(tmp_path) -> None:
    tok = v.tiny_tokenizer_files(tmp_path / "tok")

    async def run() -> None:
        sims = [make_sim(tok, f"r{i}") for i in range(2)]
        served = [await listen(s, "127.0.0.1", 0) for s in sims]
        cfgs = [replica_config(f"r{i}", s, p) for i, (s, (_, p)) in enumerate(zip(sims, served))]
        app = router_app.create_app(
            RouterConfig(fleet="t", settings=_settings(tok), replicas=cfgs[:1]), admin_token=TOKEN
        )
        runner, port = await router_app.start(app, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}"
        router = app[router_app.ROUTER_KEY]
        try:
            async with aiohttp.ClientSession() as http:
                assert "r1" not in router.kv.streams.status
                async with http.post(url + "/admin/replicas", json=cfgs[1].model_dump(), headers=AUTH) as r:
                    assert r.status == 200 and (await r.json())["added"] == ["r1"]
                assert router.kv.streams.status["r1"].endpoint.endpoint == cfgs[1].kv_events_endpoint
                await _served_by_events(http, router, served[1][1], "r1")
                row = (await _admin_rows(http, url))["r1"]["kv_state"]
                assert row["state"] == "events" and row["blocks"] >= len(PROMPT) // BS
                assert 'gpufleet_router_kv_state{replica="r1",state="events"} 1.0' in await _metrics(http, url)
                # routed through the router, the prompt goes where its blocks are, and hits there
                async with http.post(url + "/v1/chat/completions", json=chat_body([*PROMPT, "next"])) as r:
                    assert r.headers["x-gpufleet-replica"] == "r1"
                    assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
                async with http.delete(url + "/admin/replicas/r1", headers=AUTH) as r:
                    assert (await r.json())["removed"] == ["r1"]
                await _assert_gone(http, url, router, "r1")
                assert router.kv.streams.status["r0"] and "r0" in router.kv.index.replicas
        finally:
            await runner.cleanup()
            for r, _ in served:
                await r.cleanup()

    asyncio.run(run())


def test_a_replica_sim_added_by_a_config_reload_then_removed_by_another(tmp_path) -> None:
    tok = v.tiny_tokenizer_files(tmp_path / "tok")
    path = tmp_path / "router.yaml"

    def write(cfgs: list[ReplicaConfig]) -> None:
        doc = {
            "fleet": "t",
            "settings": _settings(tok).model_dump(mode="json", exclude_defaults=True),
            "replicas": [c.model_dump(mode="json", exclude_none=True) for c in cfgs],
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc))
        os.replace(tmp, path)

    async def run() -> None:
        sims = [make_sim(tok, f"r{i}") for i in range(2)]
        served = [await listen(s, "127.0.0.1", 0) for s in sims]
        cfgs = [replica_config(f"r{i}", s, p) for i, (s, (_, p)) in enumerate(zip(sims, served))]
        write(cfgs[:1])
        cfg = RouterConfig(fleet="t", settings=_settings(tok), replicas=cfgs[:1])
        app = router_app.create_app(cfg, admin_token=TOKEN, config_path=path, reload_interval_s=3600)
        runner, port = await router_app.start(app, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}"
        router = app[router_app.ROUTER_KEY]
        try:
            async with aiohttp.ClientSession() as http:
                write(cfgs)
                async with http.post(url + "/admin/reload", headers=AUTH) as r:
                    assert r.status == 200 and (await r.json())["added"] == ["r1"]
                await _served_by_events(http, router, served[1][1], "r1")
                assert (await _admin_rows(http, url))["r1"]["kv_state"]["state"] == "events"
                write(cfgs[:1])
                async with http.post(url + "/admin/reload", headers=AUTH) as r:
                    assert (await r.json())["removed"] == ["r1"]
                await _assert_gone(http, url, router, "r1")
        finally:
            await runner.cleanup()
            for r, _ in served:
                await r.cleanup()

    asyncio.run(run())


def test_a_discovered_pod_is_subscribed_at_its_address_and_the_plans_event_port(tmp_path) -> None:
    tok = v.tiny_tokenizer_files(tmp_path / "tok")
    kv_port = _free_port()
    ns, fleet = "gpufleet", "f"
    labels = {names.LABEL_FLEET: fleet, names.LABEL_DEPLOYMENT: "d", names.LABEL_POOL: "p"}
    target = DiscoveryTarget(
        deployment="d", pool="p", model="m", priority=0, kv_capacity_tokens=4096, max_model_len=32768,
        max_concurrent_requests=64,
    )  # fmt: skip
    disc = KubernetesDiscovery(
        namespace=ns,
        label_selector=f"{names.LABEL_FLEET}={fleet},{names.LABEL_POOL}",
        targets=[target],
        watch_timeout_s=30,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )
    settings = RouterSettings(
        block_size_tokens=BS, kv_events={"enabled": True, "tokenizer": str(tok), "port": kv_port, "replay_port": None}
    )

    async def run(kube: FakeKubernetes) -> None:
        sim = make_sim(tok, "pod", endpoint=f"tcp://127.0.0.1:{kv_port}", replay=None)
        sim_runner, sim_port = await listen(sim, "127.0.0.1", 0)
        sts = names.replica_set_name("d", "p")
        pod = f"{sts}-0"
        kube.pod_network[names.replica_id("d", "p", 0)] = ("127.0.0.1", {"http": sim_port})
        kube.add_statefulset(sts, namespace=ns, replicas=1, labels=labels, gpus_per_pod=1)
        kube.add_service(sts, namespace=ns, selector=labels, labels=labels)
        cfg = RouterConfig(fleet=fleet, settings=settings, replicas=[], discovery=DiscoverySettings(kubernetes=disc))
        app = router_app.create_app(cfg, admin_token=TOKEN, kube_api_client=kube.api_client())
        runner, port = await router_app.start(app, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}"
        router = app[router_app.ROUTER_KEY]
        try:
            async with aiohttp.ClientSession() as http:
                kube.set_pod_ready(ns, pod)
                end = time.monotonic() + 10
                while pod not in router.kv.streams.status:
                    assert time.monotonic() < end, "the discovered pod was never subscribed"
                    await asyncio.sleep(0.05)
                assert router.kv.streams.status[pod].endpoint.endpoint == f"tcp://127.0.0.1:{kv_port}"
                await _served_by_events(http, router, sim_port, pod)
                kube.set_pod_ready(ns, pod, False)
                end = time.monotonic() + 10
                while pod in router.kv.index.replicas:
                    assert time.monotonic() < end, "the unready pod kept its index entries"
                    await asyncio.sleep(0.05)
                await _assert_gone(http, url, router, pod)
        finally:
            await runner.cleanup()
            await sim_runner.cleanup()

    with FakeKubernetes() as kube:
        kube.add_node("gpu-1", labels={names.LABEL_POOL: "p"}, gpus=8)
        asyncio.run(run(kube))
