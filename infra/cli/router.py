"""`gpufleet router ...`: run the KV-cache-aware router from a rendered router config."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gpufleet.infra.cli._common import UserError, console, group, user_errors

if TYPE_CHECKING:
    from aiohttp import web

    from gpufleet.router.app import Router
    from gpufleet.router.config import RouterConfig

router_app = group("The KV-cache-aware OpenAI-compatible router.")


@router_app.command("serve")
def serve(
    config: Annotated[
        Path, typer.Option("--config", "-c", metavar="<file>", help="router config (gpufleet render router-config)")
    ],
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 inside a container)")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="port to listen on [default: settings.port of the config]")] = None,
    standby: Annotated[
        bool,
        typer.Option(
            "--standby",
            hidden=True,
            help="hot spare (the local runtime's): import everything, then wait for SIGUSR1 before reading "
            "the config and listening",
        ),
    ] = False,
    reload_interval: Annotated[
        float,
        typer.Option(
            "--reload-interval", metavar="<s>", help="seconds between checks of the config file for changes (0: off)"
        ),
    ] = 1.0,
) -> None:
    """Serve the OpenAI-compatible router described by a router config file.

    The config's `settings.plugins` (and the `gpufleet.router.plugins` entry points) are imported
    while it is read, so its policy may name the plugins they register. The replicas are reloaded
    from the file when it changes, on SIGHUP and on `POST /admin/reload`; a file that does not
    load is refused (every problem logged) and the running replicas stay.
    """
    # Import inside the command: the router image has only the `router` extra, and
    # `gpufleet --help` must not pay for aiohttp.
    from gpufleet.router import errors, loader
    from gpufleet.router.policies import registry

    if standby:
        _wait_for_go()
    with user_errors(errors.ConfigError, registry.PluginError):
        cfg = loader.load_router_config(config)
        if not cfg.replicas and cfg.discovery.kubernetes is None:
            raise UserError(f"{config}: replicas: the config lists no replica to route to, and no discovery")
        listen_port = port if port is not None else cfg.settings.port
        if not 0 <= listen_port <= 65535:
            raise UserError(f"--port {listen_port}: must be between 0 and 65535")
        if reload_interval < 0:
            raise UserError(f"--reload-interval {reload_interval:g}: must be 0 (off) or more seconds")
        _run(cfg, host, listen_port, config, reload_interval)


def _wait_for_go() -> None:
    """A hot spare: pay every import now (they are most of a router's start-up), then block until
    SIGUSR1; the config is read after it, so the spare serves the membership of that moment."""
    import signal

    import gpufleet.router.app  # noqa: F401 - imported for its cost, before the wait

    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    console.print("router standby: ready, waiting for SIGUSR1", highlight=False)  # the runtime waits for this line
    signal.sigwait({signal.SIGUSR1})
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})


async def _drain(router: Router, runner: web.AppRunner, timeout_s: float) -> None:
    """Readiness 503, the listener closed, in-flight requests given `timeout_s` to finish, then stop.

    aiohttp's cleanup closes the sites (no new connections), closes idle keep-alive connections,
    lets running handlers (streams included) finish for up to the runner's shutdown timeout
    (`settings.drain_timeout_s`, set by `router.app.start`), then cancels them; the upstream pool
    closes last, in the app's lifespan.
    """
    router.draining = True
    busy = sum(r.in_flight for r in router.replicas)
    console.print(f"draining: {busy} request(s) in flight, up to {timeout_s:g}s", highlight=False)
    await runner.cleanup()
    left = sum(r.in_flight for r in router.replicas)
    console.print(f"drained ({left} request(s) cut)" if left else "drained", highlight=False)


def _run(cfg: RouterConfig, host: str, port: int, path: Path, reload_interval_s: float) -> None:
    import asyncio
    import gc
    import logging
    import os
    import signal

    from gpufleet.router.app import ROUTER_KEY, create_app, start

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        app = create_app(cfg, config_path=path, reload_interval_s=reload_interval_s)
        try:
            runner, bound = await start(app, host, port)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        router = app[ROUTER_KEY]
        # Before the start line: whoever reads it may signal at once.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():  # a second signal: do not wait for the streams
                console.print("second signal: stopping now", style="yellow")
                os._exit(1)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        if router.reloader is not None:
            loop.add_signal_handler(signal.SIGHUP, router.reloader.reload)
        # Everything allocated so far lives as long as the process: move it out of the
        # collector's sight so full collections (and their latency spikes) stay short.
        gc.collect()
        gc.freeze()
        plugins = f"plugins {', '.join(cfg.settings.plugins)}, " if cfg.settings.plugins else ""
        console.print(
            f"gpufleet router for fleet [bold]{cfg.fleet}[/]: policy {router.policy.name}, {plugins}"
            f"{_n(len(router.replicas), 'replica')}, {_n(len(router.replicas.by_model), 'model')}, listening on http://{host}:{bound}",
            highlight=False,
            soft_wrap=True,  # never wrap: scripts read the URL from this line
        )
        console.print(router.sessions.describe(), highlight=False)
        if router.admin_token is None:
            console.print("admin endpoints disabled (no admin token configured)", style="yellow")
        try:
            await stop.wait()
        finally:
            await _drain(router, runner, cfg.settings.drain_timeout_s)

    try:
        import uvloop  # the router extra installs it: about twice the proxy throughput per core
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


def _n(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def register(app: typer.Typer) -> None:
    """Add this noun's commands to the root app."""
    app.add_typer(router_app, name="router")
