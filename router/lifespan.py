"""The router's lifespan (aiohttp `cleanup_ctx`): what runs beside the request path, started and stopped.

On start: the aiohttp client session of the active health checks, the health checker, the
engine-load scraper (`engine_metrics_interval_s`), the peer routers' poller (`peer_interval_s`,
`router.peers`), the config file reloader, precise mode's KV event subscribers and Kubernetes
discovery. On stop, in reverse: discovery, KV events, the
tasks, then every pool and connection the router opened (checks, upstream, sessions, cache).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from gpufleet.router.engine_load import EngineLoadScraper
from gpufleet.router.health import HealthChecker
from gpufleet.router.peers import PeerPoller

if TYPE_CHECKING:
    from gpufleet.router.state import Router

__all__ = ["run_lifespan"]

log = logging.getLogger("gpufleet.router")


def peer_poller(router: Router, session: aiohttp.ClientSession) -> PeerPoller | None:
    """The poller of the configured or discovered peer routers; None without peers, without
    `peer_interval_s` or without an admin token (said once in the log)."""
    s = router.settings
    cfg = router.config.discovery.peers
    if s.peer_interval_s <= 0 or not (cfg.urls or cfg.kubernetes):
        return None
    if router.admin_token is None:
        log.warning("peer routers are configured but no admin token is: their state is not read")
        return None
    found: list[str] = []
    refresh: Callable[[], Coroutine[Any, Any, None]] | None = None
    k8s = cfg.kubernetes
    if k8s is not None:
        from gpufleet.router import discovery

        api_client = router.kube_api_client

        async def refresh() -> None:
            nonlocal api_client
            try:
                api, api_client = discovery.discovery_api(api_client, k8s.kubeconfig)
                found[:] = await asyncio.to_thread(discovery.list_peer_urls, api, k8s)
            except Exception as exc:  # the API is down or refuses: keep the last list
                log.warning("peer routers: listing %s/%s failed: %s", k8s.namespace, k8s.service, exc)

    reads = router.metrics.peer_reads
    return PeerPoller(
        router.router_id,
        lambda: [*cfg.urls, *found],
        lambda: router.replicas,
        session,
        router.admin_token,
        interval_s=s.peer_interval_s,
        timeout_s=s.peer_timeout_s,
        clock=router.policy.clock,
        on_result=lambda result: reads.labels(result).inc(),
        refresh=refresh,
        refresh_s=k8s.refresh_s if k8s is not None else 10.0,
    )


async def run_lifespan(router: Router, app: web.Application) -> AsyncIterator[None]:
    """Own the client session, the upstream pool and the health-check task for `app`'s life."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
    # No cookies (a proxy must not carry state between tenants), no proxies from the
    # environment (the router talks only to configured replicas), and no compression
    # negotiation: replicas answer plain, and that saves work on every request.
    router.session = aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding", "User-Agent"),
    )
    router.checker = HealthChecker(router.health, router.replicas, router.session)
    tasks = [asyncio.create_task(router.checker.run())]
    s = router.settings
    if s.engine_metrics_interval_s > 0:
        scrapes = router.metrics.engine_scrapes
        scraper = EngineLoadScraper(
            lambda: router.replicas,
            router.session,
            interval_s=s.engine_metrics_interval_s,
            timeout_s=s.engine_metrics_timeout_s,
            clock=router.policy.clock,
            on_result=lambda r, result: scrapes.labels(r.id, result).inc(),
        )
        tasks.append(asyncio.create_task(scraper.run()))
    poller = peer_poller(router, router.session)
    if poller is not None:
        tasks.append(asyncio.create_task(poller.run()))
    if router.reloader is not None and router.reloader.interval_s > 0:
        tasks.append(asyncio.create_task(router.reloader.run()))
    if router.kv is not None:
        await router.kv.start()
    if router.discovery is not None:
        router.discovery.start(asyncio.get_running_loop())
    try:
        yield
    finally:
        if router.discovery is not None:
            await asyncio.to_thread(router.discovery.stop)
        if router.kv is not None:
            await router.kv.stop()
        for task in tasks:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await router.session.close()
        await router.upstream.close()
        await router.sessions.close()
        if router.cache is not None:
            await router.cache.close()
