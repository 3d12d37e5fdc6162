"""The router's HTTP application: an OpenAI-compatible proxy in front of vLLM / SGLang replicas.

`create_app(config)` builds an aiohttp application around one `Router`, which owns through the
app's lifespan (`cleanup_ctx`) the upstream connection pool (`gpufleet.router.upstream`, a lean
HTTP/1.1 client: about a third of aiohttp's client cost per request), an aiohttp client session
for the active health checks, and the health-check task: no singletons, so tests and benchmarks
build as many routers as they like. `start(app, host, port)` runs it on an `AppRunner` with
handler cancellation, so a client that disconnects cancels the handler and with it the upstream
request.

Routes: POST /v1/chat/completions, /v1/completions, /v1/responses and /v1/embeddings go to the request pipeline
(`gpufleet.router.proxy`); GET /v1/models, /health, /ready, /metrics and /admin/replicas are
answered here; the membership admin endpoints (PUT/POST /admin/replicas, DELETE
/admin/replicas/{id}, POST /admin/reload) are `gpufleet.router.membership`'s; any other path or
method gets an OpenAI-style 404 or 405.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gpufleet.router import errors, guard
from gpufleet.router.config import AdminToken, RouterConfig
from gpufleet.router.discovery import EndpointSliceWatcher
from gpufleet.router.engine_load import EngineLoadScraper
from gpufleet.router.health import HealthChecker, HealthTracker
from gpufleet.router.kvevents import runtime as kvevents_runtime
from gpufleet.router.membership import ConfigReloader, admin_routes
from gpufleet.router.metrics import RouterMetrics
from gpufleet.router.policies import Policy, registry
from gpufleet.router.prediction_cache import make_prediction_cache
from gpufleet.router.proxy import JSON, Proxy, error_response
from gpufleet.router.replicas import MembershipChange, ReplicaSet
from gpufleet.router.sessions import SessionBinder
from gpufleet.router.tenant import TenantResolver
from gpufleet.router.types import ReplicaState
from gpufleet.router.upstream import UpstreamPool
from gpufleet.router.upstream.request import COMPLETION_PATHS, UpstreamTarget

__all__ = ["ROUTER_KEY", "Router", "create_app", "resolve_admin_token", "start"]

log = logging.getLogger("gpufleet.router")

ROUTER_KEY: web.AppKey[Router] = web.AppKey("gpufleet_router")

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


class Router:
    """The router's state: config, replica set, policy, caches, metrics, health, upstream pool."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        policy: Policy | None = None,
        admin_token: str | None = None,
        environ: Mapping[str, str] | None = None,
        config_path: str | Path | None = None,
        reload_interval_s: float = 1.0,
        kube_api_client: Any = None,
    ) -> None:
        self.config = config
        s = self.settings = config.settings
        self.replicas = ReplicaSet(config.replicas)
        self.metrics = RouterMetrics(((r.id, r.model) for r in self.replicas), policy.name if policy else s.policy)
        self.metrics.watch_replicas(lambda: self.replicas)  # queued prefill, read at each scrape
        # Precise mode (KV events) when enabled and a tokenizer loads; else None, said once in the log.
        self.kv = kvevents_runtime.build(config, self.metrics.registry)
        kv_ctx: dict[str, Any] = {"kv_index": self.kv.index} if self.kv is not None else {}
        self.policy = policy or registry.make(s.policy, s, **kv_ctx)
        if policy is not None and self.kv is not None:
            policy.bind(clock=policy.clock, kv_index=self.kv.index)
        try:
            self.cache = make_prediction_cache(s.prediction_cache, environ) if s.prediction_cache.enabled else None
        except ValueError as exc:
            raise errors.ConfigError(str(exc)) from None
        self.admin_token = admin_token if admin_token is not None else resolve_admin_token(s.admin_token, environ)
        tokens = self.metrics.session_tokens
        self.sessions = SessionBinder(s.session, environ, on_token=lambda why: tokens.labels(why).inc())
        self.health = HealthTracker(
            s.health, self.replicas, on_eject=self._ejected, on_readmit=self._readmitted, on_suspect=self._suspect
        )
        self.upstream = UpstreamPool(connect_timeout_s=s.connect_timeout_s)  # the proxied requests
        self.session: aiohttp.ClientSession | None = None  # health checks only; opened by the lifespan
        self.checker: HealthChecker | None = None
        self.proxy = Proxy(
            s,
            self.replicas,
            self.policy,
            self.metrics,
            self.health,
            self.upstream,
            self.cache,
            TenantResolver(s.tenant, environ),
            sessions=self.sessions,
        )
        self.proxy.kv = self.kv
        self.draining = False
        """Set on SIGTERM/SIGINT: /ready answers 503 while in-flight requests finish (`gpufleet router serve`)."""
        self.replicas.subscribe(self._membership_changed)
        self.reloader = ConfigReloader(self, config_path, interval_s=reload_interval_s) if config_path else None
        k8s = config.discovery.kubernetes
        self.discovery = (
            EndpointSliceWatcher(k8s, self.replicas, self.metrics, api_client=kube_api_client) if k8s else None
        )

    # -- membership -----------------------------------------------------------------------
    def _membership_changed(self, change: MembershipChange) -> None:
        """Replicas joined or left (`ReplicaSet.replace`): health records, metrics, policy, connections."""
        for r in change.removed:
            self.health.remove(r.id)
            self.metrics.remove_replica(r.id)
            self.policy.on_replica_removed(r.id)
            if self.kv is not None:
                self.kv.replica_removed(r.id)
            t = UpstreamTarget(r.url)
            if not any(x.host == t.host and x.port == t.port for x in self.replicas.targets.values()):
                self.upstream.forget(t.host, t.port, t.tls)
            self.metrics.membership.labels(change.source, "removed").inc()
        for r in change.added:
            self.health.add(r)
            if self.kv is not None:  # it routes approximately until its event stream speaks
                cfg = next((c for c in self.replicas.configs(change.source) if c.id == r.id), None)
                if cfg is not None:
                    self.kv.replica_added(cfg)
            self.metrics.add_replica(r.id)
            self.metrics.membership.labels(change.source, "added").inc()
        if change.updated:
            self.metrics.membership.labels(change.source, "updated").inc(len(change.updated))
        s = change.summary()
        log.info(
            "membership of %s: added %s, removed %s, updated %s; %d replicas",
            change.source,
            ",".join(s["added"]) or "-",
            ",".join(s["removed"]) or "-",
            ",".join(s["updated"]) or "-",
            len(self.replicas),
        )

    # -- health hooks ---------------------------------------------------------------------
    def _ejected(self, r: ReplicaState, kind: str, reason: str) -> None:
        log.warning("replica %s ejected: %s", r.id, reason)
        self.metrics.ejections.labels(r.id).inc()
        self.metrics.ejection_reasons.labels(kind).inc()
        self.metrics.healthy.labels(r.id).set(0)
        self.policy.on_replica_reset(r.id)  # whatever it held is no longer a safe prediction

    def _suspect(self, r: ReplicaState) -> None:
        if self.checker is not None:
            self.checker.probe_soon(r)  # a hung or dead replica is out within one check timeout

    def _readmitted(self, r: ReplicaState) -> None:
        log.info("replica %s re-admitted", r.id)
        self.metrics.readmissions.labels(r.id).inc()
        self.metrics.healthy.labels(r.id).set(1)

    # -- lifespan -------------------------------------------------------------------------
    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: own the client session, the upstream pool and the health-check task."""
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
        # No cookies (a proxy must not carry state between tenants), no proxies from the
        # environment (the router talks only to configured replicas), and no compression
        # negotiation: replicas answer plain, and that saves work on every request.
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        )
        self.checker = HealthChecker(self.health, self.replicas, self.session)
        tasks = [asyncio.create_task(self.checker.run())]
        s = self.settings
        if s.engine_metrics_interval_s > 0:
            scrapes = self.metrics.engine_scrapes
            scraper = EngineLoadScraper(
                lambda: self.replicas,
                self.session,
                interval_s=s.engine_metrics_interval_s,
                timeout_s=s.engine_metrics_timeout_s,
                clock=self.policy.clock,
                on_result=lambda r, result: scrapes.labels(r.id, result).inc(),
            )
            tasks.append(asyncio.create_task(scraper.run()))
        if self.reloader is not None and self.reloader.interval_s > 0:
            tasks.append(asyncio.create_task(self.reloader.run()))
        if self.kv is not None:
            await self.kv.start()
        if self.discovery is not None:
            self.discovery.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            if self.discovery is not None:
                await asyncio.to_thread(self.discovery.stop)
            if self.kv is not None:
                await self.kv.stop()
            for task in tasks:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
            await self.session.close()
            await self.upstream.close()
            await self.sessions.close()
            if self.cache is not None:
                await self.cache.close()

    # -- endpoints other than the proxied ones ------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        """GET /v1/models: the models this fleet serves."""
        created = int(time.time())
        data = [
            {
                "id": m,
                "object": "model",
                "created": created,
                "owned_by": "gpufleet",
                "max_model_len": self.replicas.by_model[m].max_model_len,
            }
            for m in self.replicas.models()
        ]
        return _json_response(200, {"object": "list", "data": data})

    async def health_endpoint(self, request: web.Request) -> web.Response:
        """GET /health: the router process is alive."""
        return _json_response(200, {"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        """GET /ready: 200 when every model has at least one healthy replica and the router is not draining."""
        if self.draining:
            return _json_response(503, {"status": "draining"})
        down = sorted(m for m, g in self.replicas.by_model.items() if not any(r.healthy for r in g.replicas))
        if down:
            return _json_response(503, {"status": "not ready", "models_without_healthy_replica": down})
        return _json_response(200, {"status": "ready"})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        """GET /metrics: Prometheus text format."""
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    def authorize_admin(self, request: web.Request) -> None:
        """Raise `Unauthorized` / `Forbidden` unless the request carries the admin bearer token."""
        if self.admin_token is None:
            raise errors.Forbidden("admin endpoints are disabled: no admin token is configured")
        auth = request.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise errors.Unauthorized(
                "admin endpoints need `Authorization: Bearer <token>`", headers={"WWW-Authenticate": "Bearer"}
            )
        # aiohttp decodes header bytes with surrogateescape: compare the bytes the client sent
        given = value.strip().encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self.admin_token.encode("utf-8", "surrogateescape")):
            raise errors.Forbidden("admin token rejected")

    async def admin_replicas(self, request: web.Request) -> web.Response:
        """GET /admin/replicas: state, load, health and estimated cached blocks of every replica."""
        try:
            self.authorize_admin(request)
        except errors.RouterError as exc:
            return error_response(exc)
        rows = []
        for r in self.replicas:
            failures, readmit_in, backoff = self.health.record(r.id)
            rows.append(
                {
                    "id": r.id,
                    "source": self.replicas.source_of(r.id),
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
                    "estimated_cached_blocks": self.policy.cached_blocks(r.id),
                    "kv_usage": r.kv_usage,
                    "engine_load": {
                        "waiting": r.engine_waiting,
                        "running": r.engine_running,
                        "kv_usage": r.engine_kv_usage,
                        "age_s": round(self.policy.clock() - r.engine_sampled_at, 3)
                        if r.engine_sampled_at > float("-inf")
                        else None,
                    },
                    "consecutive_failures": failures,
                    "readmit_in_s": round(readmit_in, 3),
                    "backoff_s": backoff,
                    "kv_state": self.kv.admin_view(r.id) if self.kv is not None else {"state": "approximate"},
                }
            )
        return _json_response(200, {"policy": self.policy.name, "replicas": rows})


_ROUTES = {
    **{path: "POST" for path in COMPLETION_PATHS},
    "/v1/models": "GET",
    "/health": "GET",
    "/ready": "GET",
    "/metrics": "GET",
    "/admin/replicas": "GET, POST, PUT",
    "/admin/reload": "POST",
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
    app.router.add_get("/v1/models", router.models, expect_handler=_expect)
    app.router.add_get("/health", router.health_endpoint, expect_handler=_expect)
    app.router.add_get("/ready", router.ready, expect_handler=_expect)
    app.router.add_get("/metrics", router.metrics_endpoint, expect_handler=_expect)
    app.router.add_get("/admin/replicas", router.admin_replicas, expect_handler=_expect)
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
