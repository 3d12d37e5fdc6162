"""Hostile and broken client input over real loopback HTTP: a 4xx in JSON, no 5xx, no traceback, one log line."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from gpufleet.router import guard
from gpufleet.router.workloads import hostile
from tests.router.router_fakes import chat, replica_configs, wait_for

CORPUS = hostile.cases("m")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logs() -> Iterator[_Records]:
    h = _Records()
    root = logging.getLogger()
    old = root.level
    root.addHandler(h)
    root.setLevel(logging.INFO)
    guard.CLIENT_ERRORS._last.clear()
    try:
        yield h
    finally:
        root.removeHandler(h)
        root.setLevel(old)


@pytest.fixture
def router(replicas, make_router):  # type: ignore[no-untyped-def]
    reps = replicas(2)
    rr = make_router(
        replica_configs(reps),
        settings={
            "server": {"header_timeout_s": 1.0},
            "health": {"interval_s": 60},
            "prediction_cache": {"enabled": True},  # the cache key sees every body too
        },
        admin_token="s3cret",
    )
    port = int(rr.url.rsplit(":", 1)[1])
    return rr, port, reps


def test_the_corpus_has_at_least_93_cases_with_unique_names() -> None:
    assert len(CORPUS) >= 93
    assert len({(c.group, c.name) for c in CORPUS}) == len(CORPUS)


def test_every_hostile_input_gets_its_answer_without_5xx_or_traceback(router, logs) -> None:  # type: ignore[no-untyped-def]
    rr, port, reps = router
    wrong = {}
    for case in CORPUS:
        ans = hostile.send("127.0.0.1", port, case.data, timeout_s=5)
        why = hostile.check(case, ans)
        if why:
            wrong[f"{case.group}/{case.name}"] = why
    assert wrong == {}
    tracebacks = [r for r in logs.records if r.exc_info]
    assert tracebacks == []
    assert all(r.levelno < logging.ERROR for r in logs.records), [r.getMessage() for r in logs.records]
    # the router still serves
    assert httpx.post(rr.url + "/v1/chat/completions", json=chat("after"), timeout=5).status_code == 200


def test_a_flood_of_one_mistake_logs_one_line(router, logs) -> None:  # type: ignore[no-untyped-def]
    _, port, _ = router
    bad = next(c for c in CORPUS if c.name == "cl_and_te")
    for _ in range(30):
        assert hostile.send("127.0.0.1", port, bad.data).status == 400
    lines = [r for r in logs.records if r.name.startswith("gpufleet")]
    assert len(lines) == 1 and "malformed HTTP" in lines[0].getMessage()


def test_a_header_named_in_connection_is_not_forwarded_and_a_gzip_body_is_forwarded_plain(router) -> None:  # type: ignore[no-untyped-def]
    rr, port, reps = router
    case = next(c for c in CORPUS if c.name == "connection_named_header")
    assert hostile.send("127.0.0.1", port, case.data).status == 200
    gz = next(c for c in CORPUS if c.name == "gzip_valid")
    assert hostile.send("127.0.0.1", port, gz.data).status == 200
    seen = [{k.lower(): v for k, v in r["headers"].items()} for rep in reps for r in rep.requests]
    assert not any("x-hop" in h for h in seen)
    assert not any("content-encoding" in h for h in seen)  # the body went on inflated, so no encoding


def test_an_encoded_slash_is_not_a_slash(router) -> None:  # type: ignore[no-untyped-def]
    rr, _, _ = router
    r = httpx.get(rr.url + "/admin%2freplicas", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert "/admin%2freplicas" in r.json()["error"]["message"]


def _open(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    sock.settimeout(seconds)
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return True, data
            data += chunk
    except TimeoutError:
        return False, data


def test_idle_sockets_and_slow_heads_are_closed_at_the_header_timeout_with_a_408(router, logs) -> None:  # type: ignore[no-untyped-def]
    _, port, _ = router
    idle, slow = _open(port), _open(port)
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    t0 = time.monotonic()
    for s in (idle, slow):
        closed, data = _closed_within(s, 4)
        assert closed and data.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in data
    assert time.monotonic() - t0 < 3
    time.sleep(0.2)
    assert [r.getMessage() for r in logs.records if r.levelno >= logging.ERROR] == []


def test_a_short_body_gets_408_at_the_body_timeout(replicas, make_router) -> None:
    rr = make_router(replica_configs(replicas(1)), settings={"server": {"body_timeout_s": 0.5}})
    s = _open(int(rr.url.rsplit(":", 1)[1]))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    closed, data = _closed_within(s, 4)
    assert closed and data.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5s" in data


def test_an_idle_keep_alive_connection_is_closed_at_the_idle_timeout(replicas, make_router) -> None:
    rr = make_router(replica_configs(replicas(1)), settings={"server": {"idle_timeout_s": 0.5}})
    s = _open(int(rr.url.rsplit(":", 1)[1]))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    s.settimeout(2)
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    closed, _ = _closed_within(s, 3)
    assert closed


def test_connections_over_the_limit_are_refused_and_service_continues(replicas, make_router) -> None:
    rr = make_router(replica_configs(replicas(1)), settings={"server": {"max_connections": 20}})
    port = int(rr.url.rsplit(":", 1)[1])
    held = [_open(port) for _ in range(20)]
    try:
        assert wait_for(lambda: rr.runner.guard is not None and rr.runner.guard.guard_open == 20)  # type: ignore[attr-defined]
        over = _open(port)
        closed, data = _closed_within(over, 3)
        assert closed and data.startswith(b"HTTP/1.1 503") and b"too_many_connections" in data
    finally:
        for s in held:
            s.close()
    assert wait_for(lambda: rr.runner.guard.guard_open == 0)  # type: ignore[attr-defined]
    assert httpx.post(rr.url + "/v1/chat/completions", json=chat("x"), timeout=5).status_code == 200


def test_client_disconnects_are_counted_as_cancelled(replicas, make_router) -> None:
    reps = replicas(1, ttft_s=5.0)
    rr = make_router(replica_configs(reps))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(rr.url + "/v1/chat/completions", json=chat("slow"), timeout=0.3)
    assert wait_for(
        lambda: 'gpufleet_router_cancelled_total{stage="disconnect"} 1.0' in httpx.get(rr.url + "/metrics").text
    )
