"""The router's HTTP application: an OpenAI-compatible proxy in front of vLLM / SGLang replicas.

`create_app(config)` builds an aiohttp application around one `Router` (`gpufleet.router.state`),
which owns through the app's lifespan (`cleanup_ctx`, `gpufleet.router.lifespan`) the upstream
connection pool (`gpufleet.router.upstream`, a lean HTTP/1.1 client: about a third of aiohttp's
client cost per request), an aiohttp client session for the active health checks, and the
health-check task: no singletons, so tests and benchmarks build as many routers as they like.
`start(app, host, port)` runs it on an `AppRunner` with handler cancellation, so a client that
disconnects cancels the handler and with it the upstream request.

Routes: POST /v1/chat/completions, /v1/completions, /v1/responses and /v1/embeddings go to the request pipeline
(`gpufleet.router.proxy`); GET /v1/models, /health, /ready, /metrics, /admin/replicas and
/admin/peer-state (`gpufleet.router.peers`) are `gpufleet.router.endpoints`'; the membership admin endpoints (PUT/POST /admin/replicas, DELETE
/admin/replicas/{id}, POST /admin/reload) are `gpufleet.router.membership`'s; any other path or
method gets an OpenAI-style 404 or 405 (here, as is every error aiohttp raises itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gpufleet.router import endpoints, errors, guard
from gpufleet.router.config import RouterConfig
from gpufleet.router.endpoints import resolve_admin_token
from gpufleet.router.membership import admin_routes
from gpufleet.router.policies import Policy
from gpufleet.router.proxy import error_response
from gpufleet.router.state import Router
from gpufleet.router.upstream.request import COMPLETION_PATHS

__all__ = ["ROUTER_KEY", "Router", "create_app", "resolve_admin_token", "start"]

ROUTER_KEY: web.AppKey[Router] = web.AppKey("gpufleet_router")


_ROUTES = {
    **{path: "POST" for path in COMPLETION_PATHS},
    "/v1/models": "GET",
    "/health": "GET",
    "/ready": "GET",
    "/metrics": "GET",
    "/admin/replicas": "GET, POST, PUT",
    "/admin/reload": "POST",
    "/admin/peer-state": "GET",
}


async def _not_found(request: web.Request) -> web.Response:
    """Unknown path: 404; known path, wrong method: 405 with Allow. Both as OpenAI-style JSON."""
    # The path as sent: `/admin%2freplicas` is not `/admin/replicas` (an encoded slash is no slash).
    raw = request.raw_path.split("?", 1)[0]
    allowed = _ROUTES.get(raw) or ("DELETE" if raw.startswith("/admin/replicas/") else None)
    shown = raw if len(raw) <= 200 else raw[:200] + "..."
    exc = errors.RequestError(
        f"{shown} takes {allowed}, not {request.method}" if allowed else f"no route for {request.method} {shown}"
    )
    exc.status, exc.code = (405, "method_not_allowed") if allowed else (404, "not_found")
    return error_response(exc, {"Allow": allowed} if allowed else None)


def _http_exception_as_json(exc: web.HTTPException) -> web.Response:
    """aiohttp's own HTTP errors (no route, unknown Expect, ...) in the API's JSON shape."""
    err = errors.RequestError(exc.reason or "bad request")
    err.status = exc.status
    err.code = {404: "not_found", 405: "method_not_allowed", 417: "expectation_failed"}.get(exc.status)
    return error_response(err)


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error aiohttp raises itself (a request target no route can match: CONNECT, `OPTIONS *`)
    is answered as JSON, like the router's own."""
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_exception_as_json(exc)


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` is honoured as aiohttp does; any other expectation gets a JSON 417."""
    expect = request.headers.get("Expect", "")
    if expect.lower() == "100-continue":
        if request.version == aiohttp.HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the answer's body has not started
        return None
    resp = _http_exception_as_json(web.HTTPExpectationFailed(reason="Unknown Expect"))
    resp.force_close()
    return resp


def create_app(
    config: RouterConfig,
    *,
    policy: Policy | None = None,
    admin_token: str | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: str | Path | None = None,
    reload_interval_s: float = 1.0,
    kube_api_client: Any = None,
) -> web.Application:
    """Build the router application. The `Router` is reachable as `app[ROUTER_KEY]`.

    With `config_path` (the file `config` was read from) the router reloads its replicas from it
    when it changes (polled every `reload_interval_s`; 0: only on SIGHUP or `POST /admin/reload`).
    With `config.discovery.kubernetes` it watches EndpointSlices (`kube_api_client`: a kubernetes
    `ApiClient` to use, else one from the discovery's kubeconfig or the in-cluster account).
    """
    router = Router(
        config,
        policy=policy,
        admin_token=admin_token,
        environ=environ,
        config_path=config_path,
        reload_interval_s=reload_interval_s,
        kube_api_client=kube_api_client,
    )
    # client_max_size bounds what aiohttp buffers for a body: it is the router's body limit.
    app = web.Application(client_max_size=config.settings.max_body_bytes, middlewares=[_json_errors])
    app[ROUTER_KEY] = router
    app.cleanup_ctx.append(router.lifespan)
    proxy = router.proxy

    async def chat(request: web.Request) -> web.StreamResponse:
        return await proxy.handle(request, "/v1/chat/completions")

    async def completions(request: web.Request) -> web.StreamResponse:
        return await proxy.handle(request, "/v1/completions")

    async def responses(request: web.Request) -> web.StreamResponse:
        return await proxy.handle(request, "/v1/responses")

    async def embeddings(request: web.Request) -> web.StreamResponse:
        return await proxy.handle(request, "/v1/embeddings")

    app.router.add_post("/v1/chat/completions", chat, expect_handler=_expect)
    app.router.add_post("/v1/completions", completions, expect_handler=_expect)
    app.router.add_post("/v1/responses", responses, expect_handler=_expect)
    app.router.add_post("/v1/embeddings", embeddings, expect_handler=_expect)
    app.router.add_get("/v1/models", partial(endpoints.models, router), expect_handler=_expect)
    app.router.add_get("/health", partial(endpoints.health_endpoint, router), expect_handler=_expect)
    app.router.add_get("/ready", partial(endpoints.ready, router), expect_handler=_expect)
    app.router.add_get("/metrics", partial(endpoints.metrics_endpoint, router), expect_handler=_expect)
    app.router.add_get("/admin/replicas", partial(endpoints.admin_replicas, router), expect_handler=_expect)
    app.router.add_get("/admin/peer-state", partial(endpoints.admin_peer_state, router), expect_handler=_expect)
    for method, path, handler in admin_routes(router):
        app.router.add_route(method, path, handler, expect_handler=_expect)
    app.router.add_route("*", "/{tail:.*}", _not_found, expect_handler=_expect)
    return app


async def start(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 = a free port); returns the runner (call `cleanup()`) and the port.

    Handler cancellation is on: a client disconnect cancels the handler and the upstream request.
    A router app is served by `guard.GuardedAppRunner` (`router.server` limits and timeouts).
    """
    # Its shutdown timeout is the drain: how long running handlers may finish once the sites close.
    router = app.get(ROUTER_KEY)
    runner: web.AppRunner
    if router is not None:  # the router's own server: connection limits, timeouts, JSON protocol errors
        drain_s = router.settings.drain_timeout_s
        runner = guard.GuardedAppRunner(
            app, router.settings.server, handler_cancellation=True, access_log=None, shutdown_timeout=drain_s
        )
    else:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=60.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    addresses = runner.addresses
    return runner, int(addresses[0][1]) if addresses else port
