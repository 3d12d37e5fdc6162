"""Live membership: replicas join and leave a running router (ReplicaSet.replace, the admin API,
the config file reload), and the replicas that stay keep their prefix index, sessions and health."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from gpufleet.router import errors
from gpufleet.router.config import RouterSettings
from gpufleet.router.replicas import ReplicaSet
from tests.router.router_fakes import chat, replica_configs, wait_for

TOKEN = "s3cret-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _post(url: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=10, trust_env=False)


def _dump(cfgs: list) -> list[dict]:
    return [c.model_dump() for c in cfgs]


# -- the replica set on its own ------------------------------------------------------------------


def test_replace_keeps_the_same_state_for_stayers_and_reports_joins_and_leaves(replicas) -> None:
    a, b, c = replica_configs(replicas(3))
    rs = ReplicaSet([a, b])
    heard = []
    rs.subscribe(heard.append)
    sa, sb = rs.get("r0"), rs.get("r1")
    sa.in_flight = 3  # load carries over too
    change = rs.replace([a, c])
    assert [r.id for r in change.added] == ["r2"] and [r.id for r in change.removed] == ["r1"]
    assert rs.get("r0") is sa and sa.in_flight == 3
    assert sb.healthy is False  # a request still holding it is not routed there again
    assert [r.id for r in rs.by_model["m"].replicas] == ["r0", "r2"] and set(rs.targets) == {"r0", "r2"}
    assert heard == [change]
    assert not rs.replace([a, c]) and len(heard) == 1  # no change, no event


def test_a_changed_identity_is_a_leave_and_a_join_but_a_new_priority_is_an_update(replicas) -> None:
    (a,) = replica_configs(replicas(1))
    rs = ReplicaSet([a])
    old = rs.get("r0")
    change = rs.replace([a.model_copy(update={"priority": 7, "pool": "q"})])
    assert change.updated == (old,) and rs.get("r0") is old and old.priority == 7 and old.pool == "q"
    assert rs.by_model["m"].top_priority == 7
    change = rs.replace([a.model_copy(update={"kv_capacity_tokens": 5})])  # another engine behind r0
    assert change.removed == (old,) and change.added[0] is rs.get("r0") and rs.get("r0") is not old


def test_a_refused_replace_changes_nothing_and_names_every_problem(replicas) -> None:
    a, b = replica_configs(replicas(2))
    rs = ReplicaSet([a])
    rs.replace([b], source="kubernetes:ns/svc")
    bad = [a.model_copy(update={"url": "ftp://x"}), b, a]
    with pytest.raises(errors.ConfigError) as exc:
        rs.replace(bad)
    msg = str(exc.value)
    assert "replicas[0].url" in msg and "already comes from kubernetes:ns/svc" in msg and "duplicate" in msg
    assert [r.id for r in rs] == ["r0", "r1"] and rs.source_of("r1") == "kubernetes:ns/svc"


def test_a_declared_model_without_replicas_is_still_served(replicas) -> None:
    (a,) = replica_configs(replicas(1))
    rs = ReplicaSet([a])
    rs.declare_model("m", top_priority=10, max_model_len=2048)
    rs.replace([])
    g = rs.by_model["m"]
    assert g.replicas == [] and g.top_priority == 10 and g.max_model_len == 2048


# -- over real HTTP ---------------------------------------------------------------------------


def test_a_replica_added_at_run_time_gets_traffic_and_one_removed_gets_none(replicas, make_router) -> None:
    reps = replicas(3)
    cfgs = replica_configs(reps)
    rr = make_router(cfgs[:1], settings={"policy": "round_robin"}, admin_token=TOKEN)
    r = httpx.post(rr.url + "/admin/replicas", json=cfgs[1].model_dump(), headers=AUTH, trust_env=False)
    assert r.status_code == 200 and r.json()["added"] == ["r1"] and r.json()["replicas"] == 2
    seen = {_post(rr.url, chat(f"q{i}")).headers["x-gpufleet-replica"] for i in range(6)}
    assert seen == {"r0", "r1"}
    r = httpx.put(rr.url + "/admin/replicas", json={"replicas": _dump([cfgs[1], cfgs[2]])}, headers=AUTH)
    assert r.json() == {"added": ["r2"], "removed": ["r0"], "updated": [], "replicas": 2}
    before = len(reps[0].requests)
    seen = {_post(rr.url, chat(f"z{i}")).headers["x-gpufleet-replica"] for i in range(6)}
    assert seen == {"r1", "r2"} and len(reps[0].requests) == before
    r = httpx.delete(rr.url + "/admin/replicas/r1", headers=AUTH)
    assert r.json()["removed"] == ["r1"]
    assert {_post(rr.url, chat(f"y{i}")).headers["x-gpufleet-replica"] for i in range(3)} == {"r2"}
    rows = httpx.get(rr.url + "/admin/replicas", headers=AUTH).json()["replicas"]
    assert [(x["id"], x["source"]) for x in rows] == [("r2", "config")]
    text = httpx.get(rr.url + "/metrics").text
    assert 'gpufleet_router_membership_changes_total{change="added",source="config"} 2.0' in text
    assert 'gpufleet_router_replica_healthy{replica="r0"}' not in text


def test_stayers_keep_prefix_index_sessions_and_health_across_a_change(replicas, make_router) -> None:
    reps = replicas(3)
    cfgs = replica_configs(reps)
    rr = make_router(cfgs[:2], admin_token=TOKEN)
    long = "shared context " * 40
    holder = _post(rr.url, chat(long + "a")).headers["x-gpufleet-replica"]
    cached = rr.router.policy.cached_blocks(holder)
    assert cached > 0
    sess = RouterSettings().session.header
    router_s = make_router(cfgs[:2], settings={"policy": "session"}, admin_token=TOKEN)
    bound = _post(router_s.url, chat("hi"), **{sess: "user-1"}).headers["x-gpufleet-replica"]
    other = "r1" if holder == "r0" else "r0"
    # Eject the other replica by hand: its health state must survive the change too.
    rr.router.health.check_failed(rr.router.replicas.get(other), "test")
    assert rr.router.replicas.get(other).healthy is False
    for url in (rr.url, router_s.url):
        r = httpx.post(url + "/admin/replicas", json=cfgs[2].model_dump(), headers=AUTH)
        assert r.json()["added"] == ["r2"]
    assert rr.router.policy.cached_blocks(holder) == cached
    assert rr.router.replicas.get(other).healthy is False
    assert _post(rr.url, chat(long + "b")).headers["x-gpufleet-replica"] == holder
    assert _post(router_s.url, chat("again"), **{sess: "user-1"}).headers["x-gpufleet-replica"] == bound
    # The bound replica leaves: the session moves to a stayer and sticks there.
    keep = [c for c in cfgs if c.id != bound]
    httpx.put(router_s.url + "/admin/replicas", json={"replicas": _dump(keep)}, headers=AUTH)
    moved = _post(router_s.url, chat("x"), **{sess: "user-1"}).headers["x-gpufleet-replica"]
    assert moved != bound and _post(router_s.url, chat("y"), **{sess: "user-1"}).headers["x-gpufleet-replica"] == moved


def test_a_request_in_flight_on_a_replica_that_leaves_completes(replicas, make_router) -> None:
    reps = replicas(2, token_delay_s=0.05, n_tokens=10)
    cfgs = replica_configs(reps)
    rr = make_router(cfgs[:1], admin_token=TOKEN)
    out: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: out.setdefault("r", _post(rr.url, chat("slow"))))
    t.start()
    assert wait_for(lambda: rr.router.replicas.get("r0").in_flight == 1)
    r = httpx.put(rr.url + "/admin/replicas", json={"replicas": _dump(cfgs[1:])}, headers=AUTH)
    assert r.json()["removed"] == ["r0"]
    t.join(10)
    assert out["r"].status_code == 200 and out["r"].headers["x-gpufleet-replica"] == "r0"
    assert _post(rr.url, chat("next")).headers["x-gpufleet-replica"] == "r1"


def test_admin_membership_needs_the_token_and_a_bad_body_changes_nothing(replicas, make_router) -> None:
    cfgs = replica_configs(replicas(2))
    rr = make_router(cfgs[:1], admin_token=TOKEN)
    body = {"replicas": _dump(cfgs)}
    assert httpx.put(rr.url + "/admin/replicas", json=body).status_code == 401
    assert httpx.put(rr.url + "/admin/replicas", json=body, headers={"Authorization": "Bearer no"}).status_code == 403
    bad = _dump(cfgs)
    bad[1]["url"] = "gopher://x"
    del bad[0]["model"]
    r = httpx.put(rr.url + "/admin/replicas", json={"replicas": bad}, headers=AUTH)
    assert r.status_code == 400 and "replicas[0].model" in r.json()["error"]["message"]
    r = httpx.put(rr.url + "/admin/replicas", json={"replicas": [_dump(cfgs)[0], bad[1]]}, headers=AUTH)
    assert r.status_code == 400 and "replicas[1].url" in r.json()["error"]["message"]
    assert httpx.delete(rr.url + "/admin/replicas/nope", headers=AUTH).status_code == 404
    assert httpx.post(rr.url + "/admin/replicas", content=b"{", headers=AUTH).status_code == 400
    assert [r.id for r in rr.router.replicas] == ["r0"]
    rr.router.replicas.replace(cfgs[1:], source="kubernetes:ns/svc")
    r = httpx.delete(rr.url + "/admin/replicas/r1", headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "membership_conflict"
    assert httpx.patch(rr.url + "/admin/replicas", headers=AUTH).headers["Allow"] == "GET, POST, PUT"


# -- the config file ---------------------------------------------------------------------------


def _write(path, cfgs, *, fleet: str = "test", settings: dict | None = None) -> None:
    doc = {"fleet": fleet, "settings": settings or {}, "replicas": _dump(cfgs)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    os.replace(tmp, path)  # atomic, as docs/router.md asks


def test_the_router_reloads_a_changed_config_file_and_keeps_the_old_one_when_it_is_invalid(
    replicas, make_router, tmp_path, caplog
) -> None:
    cfgs = replica_configs(replicas(3))
    path = tmp_path / "router.yaml"
    _write(path, cfgs[:1])
    rr = make_router(cfgs[:1], admin_token=TOKEN, config_path=path, reload_interval_s=0.05)
    _write(path, cfgs[:2])
    # The reload runs on the router's event loop; this thread may look between its two steps
    # (the replica set, then the config), so wait for both.
    assert wait_for(
        lambda: [r.id for r in rr.router.replicas] == ["r0", "r1"] and list(rr.router.config.replicas) == cfgs[:2]
    )
    caplog.set_level(logging.ERROR, logger="gpufleet.router.membership")
    path.write_text("fleet: test\nreplicas:\n  - id: r9\n    url: http://127.0.0.1:1\n  - 3\n")
    assert wait_for(lambda: "keeping the previous config" in caplog.text)
    assert "replicas[0].deployment" in caplog.text and "replicas[1]" in caplog.text
    assert [r.id for r in rr.router.replicas] == ["r0", "r1"]
    assert _post(rr.url, chat("still fine")).status_code == 200
    # POST /admin/reload answers at once, with the change or with every problem.
    r = httpx.post(rr.url + "/admin/reload", headers=AUTH)
    assert r.status_code == 422 and "replicas[0].deployment" in r.json()["error"]["message"]
    rr.router.reloader.interval_s = 3600  # from here on, only explicit reloads
    time.sleep(0.3)  # the poller's short sleep ends, its next one is long
    _write(path, cfgs[1:], settings={"max_retries": 5})
    r = httpx.post(rr.url + "/admin/reload", headers=AUTH)
    assert r.status_code == 200 and r.json()["added"] == ["r2"] and r.json()["removed"] == ["r0"]
    assert "max_retries" in r.json()["notes"][0] and rr.router.settings.max_retries == 2
    _write(path, cfgs, fleet="another")
    r = httpx.post(rr.url + "/admin/reload", headers=AUTH)
    assert r.status_code == 422 and "another" in r.json()["error"]["message"]
    assert 'gpufleet_router_config_reloads_total{result="error"}' in httpx.get(rr.url + "/metrics").text


def test_router_serve_reloads_its_config_file_on_sighup(replicas, tmp_path) -> None:
    cfgs = replica_configs(replicas(2))
    path = tmp_path / "router.yaml"
    _write(path, cfgs[:1], settings={"policy": "round_robin"})
    argv = [sys.executable, "-c", "from gpufleet.infra.cli import main; main()", "router", "serve", "-c", str(path)]
    # --reload-interval 0: only the signal can make it reload.
    proc = subprocess.Popen(
        [*argv, "--port", "0", "--reload-interval", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "GPUFLEET_ADMIN_TOKEN": TOKEN},
    )
    try:
        line = ""
        while "listening on" not in line and proc.poll() is None:
            line = proc.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert m, line
        url = m.group(1)
        _write(path, cfgs, settings={"policy": "round_robin"})
        proc.send_signal(signal.SIGHUP)
        assert wait_for(
            lambda: len(httpx.get(url + "/admin/replicas", headers=AUTH).json()["replicas"]) == 2, timeout=10
        )
        assert {_post(url, chat(f"q{i}")).headers["x-gpufleet-replica"] for i in range(4)} == {"r0", "r1"}
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
