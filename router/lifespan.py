"""The router's lifespan (aiohttp `cleanup_ctx`): what runs beside the request path, started and stopped.

On start: the aiohttp client session of the active health checks, the health checker, the
engine-load scraper (`engine_metrics_interval_s`), the config file reloader, precise mode's KV
event subscribers and Kubernetes discovery. On stop, in reverse: discovery, KV events, the
tasks, then every pool and connection the router opened (checks, upstream, sessions, cache).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from gpufleet.router.engine_load import EngineLoadScraper
from gpufleet.router.health import HealthChecker

if TYPE_CHECKING:
    from gpufleet.router.state import Router

__all__ = ["run_lifespan"]


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
