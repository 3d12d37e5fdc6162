"""The endpoints the router answers itself, and admin authorization.

GET /v1/models, /health, /ready, /metrics, /admin/replicas and /admin/peer-state (each a function of the `Router`
and the request; `create_app` binds them). The admin token is resolved once from its reference
(`resolve_admin_token`) and checked in constant time (`authorize_admin`, also used by the
membership admin endpoints through `Router.authorize_admin`).
"""

from __future__ import annotations

import hmac
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gpufleet.router import errors, peers
from gpufleet.router.config import AdminToken
from gpufleet.router.proxy import JSON, error_response

if TYPE_CHECKING:
    from gpufleet.router.state import Router

__all__ = [
    "admin_peer_state",
    "admin_replicas",
    "authorize_admin",
    "health_endpoint",
    "metrics_endpoint",
    "models",
    "ready",
    "resolve_admin_token",
]

_SECRET_ENV_DEFAULT = "GPUFLEET_ADMIN_TOKEN"


def resolve_admin_token(ref: AdminToken, environ: Mapping[str, str] | None = None) -> str | None:
    """The admin token named by `ref` (env var or file), or None when none is configured.

    A `secret` reference is mounted by the stacks as the GPUFLEET_ADMIN_TOKEN env var.
    """
    env = os.environ if environ is None else environ
    if ref.file is not None:
        try:
            token = Path(ref.file).read_text().strip()
        except OSError as exc:
            raise errors.ConfigError(f"admin token file {ref.file}: {exc.strerror or exc}") from None
    elif ref.env is not None:
        token = env.get(ref.env, "").strip()
    elif ref.secret is not None:
        token = env.get(_SECRET_ENV_DEFAULT, "").strip()
    else:
        token = ""
    return token or None


def _json_response(status: int, payload: Any) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type=JSON)


async def models(router: Router, request: web.Request) -> web.Response:
    """GET /v1/models: the models this fleet serves."""
    created = int(time.time())
    data = [
        {
            "id": m,
            "object": "model",
            "created": created,
            "owned_by": "gpufleet",
            "max_model_len": router.replicas.by_model[m].max_model_len,
        }
        for m in router.replicas.models()
    ]
    return _json_response(200, {"object": "list", "data": data})


async def health_endpoint(router: Router, request: web.Request) -> web.Response:
    """GET /health: the router process is alive."""
    return _json_response(200, {"status": "ok"})


async def ready(router: Router, request: web.Request) -> web.Response:
    """GET /ready: 200 when every model has at least one healthy replica and the router is not draining."""
    if router.draining:
        return _json_response(503, {"status": "draining"})
    down = sorted(m for m, g in router.replicas.by_model.items() if not any(r.healthy for r in g.replicas))
    if down:
        return _json_response(503, {"status": "not ready", "models_without_healthy_replica": down})
    return _json_response(200, {"status": "ready"})


async def metrics_endpoint(router: Router, request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    return web.Response(
        body=router.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


def authorize_admin(router: Router, request: web.Request) -> None:
    """Raise `Unauthorized` / `Forbidden` unless the request carries the admin bearer token."""
    if router.admin_token is None:
        raise errors.Forbidden("admin endpoints are disabled: no admin token is configured")
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise errors.Unauthorized(
            "admin endpoints need `Authorization: Bearer <token>`", headers={"WWW-Authenticate": "Bearer"}
        )
    # aiohttp decodes header bytes with surrogateescape: compare the bytes the client sent
    given = value.strip().encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, router.admin_token.encode("utf-8", "surrogateescape")):
        raise errors.Forbidden("admin token rejected")


async def admin_replicas(router: Router, request: web.Request) -> web.Response:
    """GET /admin/replicas: state, load, health and estimated cached blocks of every replica."""
    try:
        authorize_admin(router, request)
    except errors.RouterError as exc:
        return error_response(exc)
    rows = []
    for r in router.replicas:
        failures, readmit_in, backoff = router.health.record(r.id)
        rows.append(
            {
                "id": r.id,
                "source": router.replicas.source_of(r.id),
                "model": r.model,
                "pool": r.pool,
                "priority": r.priority,
                "url": r.url,
                "healthy": r.healthy,
                "in_flight": r.in_flight,
                "saturated": r.saturated,
                "queued_prefill_tokens": r.queued_prefill_tokens,
                "max_concurrent_requests": r.max_concurrent_requests,
                "kv_capacity_tokens": r.kv_capacity_tokens,
                "max_model_len": r.max_model_len,
                "estimated_cached_blocks": router.policy.cached_blocks(r.id),
                "kv_usage": r.kv_usage,
                "engine_load": {
                    "waiting": r.engine_waiting,
                    "running": r.engine_running,
                    "kv_usage": r.engine_kv_usage,
                    "age_s": round(router.policy.clock() - r.engine_sampled_at, 3)
                    if r.engine_sampled_at > float("-inf")
                    else None,
                },
                "peers": {
                    peer: {
                        "queued_prefill_tokens": p.queued_prefill_tokens,
                        "queued_requests": p.queued_requests,
                        "in_flight": p.in_flight,
                        "age_s": round(router.policy.clock() - p.at, 3),
                    }
                    for peer, p in r.peers.items()
                },
                "consecutive_failures": failures,
                "readmit_in_s": round(readmit_in, 3),
                "backoff_s": backoff,
                "kv_state": router.kv.admin_view(r.id) if router.kv is not None else {"state": "approximate"},
            }
        )
    return _json_response(200, {"policy": router.policy.name, "replicas": rows})


async def admin_peer_state(router: Router, request: web.Request) -> web.Response:
    """GET /admin/peer-state: this router's own counts per replica, for its peers (`router.peers`)."""
    try:
        authorize_admin(router, request)
    except errors.RouterError as exc:
        return error_response(exc)
    return _json_response(200, peers.peer_state(router.router_id, router.replicas))
