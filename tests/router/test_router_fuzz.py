"""Hypothesis fuzzes request bodies, headers and paths over real loopback HTTP: every answer comes,
none is a 5xx, every error is the JSON error body, and nothing writes a traceback or an error line."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpufleet.router.workloads import hostile
from tests.router.router_fakes import replica_configs

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool"]) | st.text(max_size=5)},
    optional={"content": _json, "tool_calls": _json, "name": _scalars},
)
_request = st.fixed_dictionaries(
    {"model": st.sampled_from(["m", "other"]) | _scalars},
    optional={
        "messages": st.lists(_message, max_size=3) | _json,
        "prompt": st.text(max_size=200) | st.lists(st.integers(0, 50_000), max_size=20) | _json,
        "input": _json,
        "max_tokens": st.integers(-5, 10**12) | _scalars,
        "max_completion_tokens": _scalars,
        "temperature": st.sampled_from([0, 0.0, 0.7]) | _scalars,
        "seed": _scalars,
        "n": _scalars,
        "stream": st.booleans() | _scalars,
        "stream_options": _json,
        "user": _scalars,
        "cache_salt": _scalars,
    },
)


def _encoded(doc: object) -> bytes:
    return json.dumps(doc).encode()


def _with_surrogate(doc: dict[str, object]) -> bytes:
    return json.dumps({**doc, "messages": [{"role": "user", "content": "@S@"}]}).replace("@S@", "\\ud9ab").encode()


_bodies = st.one_of(
    _request.map(_encoded),
    _request.map(_with_surrogate),
    _json.map(_encoded),
    st.binary(max_size=200),
)
_header_names = st.sampled_from(
    ["Authorization", "api-key", "x-api-key", "x-session-id", "Connection", "Content-Encoding", "Cache-Control",
     "Content-Type", "Expect", "x-request-id", "Upgrade", "TE", "Keep-Alive"]
) | st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)  # fmt: skip
_header_values = st.binary(max_size=40)
_paths = st.sampled_from(
    ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/models", "/health",
     "/admin/replicas", "/admin%2freplicas", "/nope"]
)  # fmt: skip


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.bad.append(record.getMessage())


@pytest.fixture
def fuzz_router(replicas, make_router):  # type: ignore[no-untyped-def]
    rr = make_router(
        replica_configs(replicas(2)),
        settings={"prediction_cache": {"enabled": True}, "server": {"header_timeout_s": 2, "body_timeout_s": 2}},
        admin_token="s3cret",
    )
    h = _Records()
    logging.getLogger().addHandler(h)
    try:
        yield int(rr.url.rsplit(":", 1)[1]), h
    finally:
        logging.getLogger().removeHandler(h)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT"]),
    path=_paths,
    body=_bodies,
    headers=st.lists(st.tuples(_header_names, _header_values), max_size=5),
)
def test_fuzzed_requests_get_an_answer_never_a_5xx_and_errors_are_json(
    fuzz_router, method, path, body, headers
) -> None:  # type: ignore[no-untyped-def]
    port, records = fuzz_router
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: router", b"Content-Length: %d" % len(body)]
    head += [name.encode() + b": " + value for name, value in headers]
    data = b"\r\n".join(head) + b"\r\n\r\n" + body
    ans = hostile.send("127.0.0.1", port, data, timeout_s=10)
    assert ans.status != 0, ans.error
    assert ans.status < 500, (ans.status, ans.body[:200])
    if ans.status >= 400:
        assert ans.headers.get("content-type", "").startswith("application/json"), ans.headers
        assert isinstance(json.loads(ans.body)["error"]["message"], str)
    assert records.bad == []
