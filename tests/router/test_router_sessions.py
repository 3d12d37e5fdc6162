"""Session affinity inside the default profile, over real loopback HTTP: stickiness, moves, tokens, Redis."""

from __future__ import annotations

import json

import httpx
import pytest

from gpufleet.router import errors
from gpufleet.router.config import RouterSettings, SessionSecret
from gpufleet.router.sessions import SessionTokens, resolve_secret, scoped_session_id
from tests.router.router_fakes import chat, replica_configs, serve_process

SECRET = "test-session-secret-0123456789"
ENV = {"GPUFLEET_SESSION_SECRET": SECRET}
# No active checks during a test: ejection comes from the proxied requests only.
QUIET = {"health": {"interval_s": 60, "timeout_s": 5, "backoff_initial_s": 60, "backoff_max_s": 60}}


def turn(url: str, sid: str | None, text: str, *, system: str = "A long shared system prompt. " * 8, **headers: str):  # type: ignore[no-untyped-def]
    sess = {"x-session-id": sid} if sid is not None else {}
    r = httpx.post(
        url + "/v1/chat/completions", json=chat(text, system=system), headers={**sess, **headers}, timeout=10
    )
    assert r.status_code == 200, r.text
    return r


def test_eight_turns_of_one_session_stay_on_one_replica_under_the_default_policy(replicas, make_router) -> None:
    reps = replicas(3)
    rr = make_router(replica_configs(reps), settings=QUIET)
    assert rr.router.policy.name == "cache_aware"  # the default, not `policy: session`

    def spread(sid: str | None, tag: str) -> list[str]:
        # No two turns share a prefix: without affinity they go wherever their first block hashes.
        return [
            turn(rr.url, sid, f"question {i}", system=f"{tag} turn {i}: a distinct context. " * 6).headers[
                "x-gpufleet-replica"
            ]
            for i in range(8)
        ]

    assert len(set(spread(None, "control"))) > 1  # the same kind of turns without a session id
    got = spread("chat-1", "session")
    assert len(set(got)) == 1, got


def test_the_body_user_is_the_session_id_when_there_is_no_header(replicas, make_router) -> None:
    reps = replicas(3)
    rr = make_router(replica_configs(reps), settings=QUIET)
    seen = set()
    for i in range(6):
        body = chat(f"turn {i} " + "y" * (50 * i), user="user-7")
        seen.add(httpx.post(rr.url + "/v1/chat/completions", json=body, timeout=10).headers["x-gpufleet-replica"])
    assert len(seen) == 1


def test_a_session_whose_replica_dies_moves_once_then_sticks_again(replicas, make_router, loop_thread) -> None:
    reps = replicas(3)
    rr = make_router(replica_configs(reps), settings=QUIET)
    first = {turn(rr.url, "s-move", f"t{i} " * (i + 1)).headers["x-gpufleet-replica"] for i in range(4)}
    assert len(first) == 1
    home = first.pop()
    loop_thread.run(next(r for r in reps if r.name == home).stop())
    after = [turn(rr.url, "s-move", f"after {i} " * (i + 1)).headers["x-gpufleet-replica"] for i in range(6)]
    assert home not in after
    assert len(set(after)) == 1, after  # one move, then sticky on the new replica
    reasons = rr.router.metrics.decisions
    assert reasons.labels("cache_aware", "session_moved")._value.get() == 1
    assert reasons.labels("cache_aware", "session")._value.get() >= 3 + 5


def test_a_session_moves_when_its_replica_is_slower_than_the_best_by_more_than_the_penalty(replicas, make_router):
    reps = replicas(2)
    cfg = replica_configs(reps, max_concurrent_requests=64)
    rr = make_router(cfg, settings={**QUIET, "session": {"max_penalty_s": 0.05}})
    home = turn(rr.url, "s-pen", "first").headers["x-gpufleet-replica"]
    state = next(r for r in rr.router.replicas if r.id == home)
    # 10k tokens of someone else's prefill queued there: about 1 s at the default rate, over 0.05 s.
    state.queued_prefill_tokens += 10_000
    try:
        moved = turn(rr.url, "s-pen", "second").headers["x-gpufleet-replica"]
        assert moved != home
        state.queued_prefill_tokens -= 10_000
        # ... and it stays on the new replica, though the old one is idle again.
        assert turn(rr.url, "s-pen", "third").headers["x-gpufleet-replica"] == moved
    finally:
        state.queued_prefill_tokens = max(0, state.queued_prefill_tokens - 10_000)


def _write_config(path, reps) -> None:  # type: ignore[no-untyped-def]
    cfg = {
        "fleet": "test",
        "settings": QUIET,
        "replicas": [c.model_dump() for c in replica_configs(reps)],
    }
    path.write_text(json.dumps(cfg))


def test_a_signed_token_is_honoured_by_a_second_router_process_and_a_forged_one_ignored(
    replicas, make_router, tmp_path
) -> None:
    reps = replicas(3)
    cfg = tmp_path / "router.json"
    _write_config(cfg, reps)
    # Router A knows one replica only, so the token it issues names a replica of our choosing.
    issued = {}
    for rep in reps:
        a = make_router(replica_configs([rep]), settings=QUIET, environ=ENV)
        r = turn(a.url, f"s-{rep.name}", "hello")
        issued[rep.name] = r.headers["x-gpufleet-session"]
        assert r.headers["x-gpufleet-replica"] == rep.name
    forger = SessionTokens(b"not-the-router-secret-at-all", 3600)
    with serve_process(cfg, **ENV) as (_, url):
        for name, token in issued.items():
            r = turn(url, f"s-{name}", "next turn", **{"x-gpufleet-session": token})
            assert r.headers["x-gpufleet-replica"] == name
            # B answers with a fresh token for the same replica.
            assert SessionTokens(SECRET.encode(), 3600).verify(
                r.headers["x-gpufleet-session"], scoped_session_id(None, f"s-{name}")
            ) == (
                name,
                "valid",
            )
        # Without a token B picks by itself; a forged token (another key, or a token of another
        # session) changes nothing: the request goes where B would have sent it anyway.
        own = turn(url, "fresh-0", "same prompt").headers["x-gpufleet-replica"]
        for k, rep in enumerate(r for r in reps if r.name != own):
            forged = forger.issue(f"fresh-{k + 1}", rep.name)
            stolen = issued[rep.name]  # valid, but for another session
            for j, token in enumerate((forged, stolen, "v1.garbage")):
                got = turn(url, f"fresh-{k + 1}-{j}", "same prompt", **{"x-gpufleet-session": token})
                assert got.headers["x-gpufleet-replica"] == own
        metrics = httpx.get(url + "/metrics").text
    assert 'gpufleet_router_session_tokens_total{result="valid"} 3.0' in metrics
    assert 'gpufleet_router_session_tokens_total{result="forged"} 4.0' in metrics
    assert 'gpufleet_router_session_tokens_total{result="malformed"} 2.0' in metrics


def test_no_secret_means_no_tokens_and_a_short_secret_is_a_config_error(replicas, make_router) -> None:
    reps = replicas(1)
    rr = make_router(replica_configs(reps), settings=QUIET, environ={})
    r = turn(rr.url, "s", "hi")
    assert "x-gpufleet-session" not in r.headers
    assert rr.router.sessions.describe() == "sessions: tokens off (no session.secret set)"
    with pytest.raises(errors.ConfigError, match="shorter than 16 bytes") as exc:
        resolve_secret(SessionSecret(env="S"), {"S": "short"})
    assert "short" not in str(exc.value).replace("shorter", "")  # never the value


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda t: t, "valid"),
        (lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"), "forged"),
        (lambda t: t.replace("v1.", "v2.", 1), "malformed"),
        (lambda t: ".".join(t.split(".")[:3]), "malformed"),
        (lambda t: "v1.!!!.1.2", "malformed"),
    ],
)
def test_token_verdicts(mutate, why) -> None:  # type: ignore[no-untyped-def]
    tokens = SessionTokens(SECRET.encode(), 60, clock=lambda: 1000.0)
    replica, verdict = tokens.verify(mutate(tokens.issue("sess", "r1")), "sess")
    assert verdict == why and (replica == "r1") == (why == "valid")


def test_an_expired_token_is_ignored_and_a_token_is_bound_to_its_session() -> None:
    now = [1000.0]
    tokens = SessionTokens(SECRET.encode(), 60, clock=lambda: now[0])
    t = tokens.issue("sess", "r1")
    assert tokens.verify(t, "other-session") == (None, "forged")
    now[0] += 61
    assert tokens.verify(t, "sess") == (None, "expired")


@pytest.mark.redis
def test_a_redis_binding_keeps_a_session_on_its_replica_across_routers_without_tokens(
    replicas, make_router, redis_url
) -> None:
    reps = replicas(3)
    env = {"GPUFLEET_SESSION_REDIS_URL": redis_url}  # and no secret: no tokens at all
    s = {**QUIET, "session": {"binding": "redis", "key_prefix": "t-sess:"}}
    b = make_router(replica_configs(reps), settings=s, environ=env)
    for rep in reps:
        a = make_router(replica_configs([rep]), settings=s, environ=env)
        assert turn(a.url, f"r-{rep.name}", "first").headers["x-gpufleet-replica"] == rep.name
    for rep in reps:
        # The binding is written in the background right after routing; a turn takes longer.
        r = turn(b.url, f"r-{rep.name}", "second turn on another router")
        assert "x-gpufleet-session" not in r.headers
        assert r.headers["x-gpufleet-replica"] == rep.name


@pytest.mark.redis
def test_a_session_binding_survives_redis_going_away(replicas, make_router) -> None:
    from tests.router.router_fakes import free_port

    reps = replicas(2)
    env = {"GPUFLEET_SESSION_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    rr = make_router(replica_configs(reps), settings={**QUIET, "session": {"binding": "redis"}}, environ=env)
    got = {turn(rr.url, "s-down", f"turn {i} " * (i + 1)).headers["x-gpufleet-replica"] for i in range(4)}
    assert len(got) == 1  # the router's own memory keeps the session


def test_settings_reject_an_unknown_binding() -> None:
    with pytest.raises(ValueError, match="binding"):
        RouterSettings.model_validate({"session": {"binding": "etcd"}})


# -- per tenant -------------------------------------------------------------------------------

TENANT_A = {"Authorization": "Bearer key-of-tenant-a"}
TENANT_B = {"Authorization": "Bearer key-of-tenant-b"}


def _own_and_other(url: str, reps: list) -> tuple[str, str]:  # type: ignore[type-arg]
    """Where router `url` sends tenant B's "same prompt" by itself (its prefix is cached there from
    then on), and the other replica."""
    own = turn(url, "b-warmup", "same prompt", **TENANT_B).headers["x-gpufleet-replica"]
    return own, next(r.name for r in reps if r.name != own)


def test_one_tenant_cannot_steer_with_or_land_on_another_tenants_session(replicas, make_router) -> None:
    reps = replicas(2)
    b_router = make_router(replica_configs(reps), settings=QUIET, environ=ENV)
    own, other = _own_and_other(b_router.url, reps)
    # Tenant A's session "shared" lives on `other`: a router that knows only `other` issued its token.
    a_router = make_router(replica_configs([r for r in reps if r.name == other]), settings=QUIET, environ=ENV)
    token_a = turn(a_router.url, "shared", "hello", **TENANT_A).headers["x-gpufleet-session"]
    # A's token steers A's own next turn on the other router ...
    r = turn(b_router.url, "shared", "same prompt", **{"x-gpufleet-session": token_a}, **TENANT_A)
    assert r.headers["x-gpufleet-replica"] == other
    # ... but not tenant B's with the same session id: the MAC covers the tenant's scope.
    r = turn(b_router.url, "shared", "same prompt", **{"x-gpufleet-session": token_a}, **TENANT_B)
    assert r.headers["x-gpufleet-replica"] == own
    token_b = r.headers["x-gpufleet-session"]
    assert token_b != token_a
    # Nor does the router's own memory of A's "shared" (on `other`) pull B's "shared" there, or the reverse.
    for i in range(3):
        assert turn(b_router.url, "shared", "same prompt", **TENANT_B).headers["x-gpufleet-replica"] == own
        assert turn(b_router.url, "shared", f"turn {i}", **TENANT_A).headers["x-gpufleet-replica"] == other
    # B's token is no good to A either.
    r = turn(b_router.url, "shared", "same prompt", **{"x-gpufleet-session": token_b}, **TENANT_A)
    assert r.headers["x-gpufleet-replica"] == other
    metrics = httpx.get(b_router.url + "/metrics").text
    assert 'gpufleet_router_session_tokens_total{result="valid"} 1.0' in metrics
    assert 'gpufleet_router_session_tokens_total{result="forged"} 2.0' in metrics


@pytest.mark.redis
def test_a_redis_session_binding_is_per_tenant(replicas, make_router, redis_url) -> None:
    reps = replicas(2)
    env = {"GPUFLEET_SESSION_REDIS_URL": redis_url}  # no secret: the binding alone decides
    s = {**QUIET, "session": {"binding": "redis", "key_prefix": "t-tenant:"}}
    b_router = make_router(replica_configs(reps), settings=s, environ=env)
    own, other = _own_and_other(b_router.url, reps)
    a_router = make_router(replica_configs([r for r in reps if r.name == other]), settings=s, environ=env)
    assert turn(a_router.url, "r-shared", "first", **TENANT_A).headers["x-gpufleet-replica"] == other
    # B's turn with A's session id neither reads A's binding ...
    assert turn(b_router.url, "r-shared", "same prompt", **TENANT_B).headers["x-gpufleet-replica"] == own
    # ... nor overwrites it: A's next turn on the other router still finds its replica.
    assert turn(b_router.url, "r-shared", "second", **TENANT_A).headers["x-gpufleet-replica"] == other
