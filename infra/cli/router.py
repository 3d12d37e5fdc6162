"""`gpufleet router ...`: run the KV-cache-aware router from a rendered router config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gpufleet.infra.cli._common import UserError, console, group, user_errors

if TYPE_CHECKING:
    from gpufleet.router.config import RouterConfig

router_app = group("The KV-cache-aware OpenAI-compatible router.")


@router_app.command("serve")
def serve(
    config: Annotated[
        Path, typer.Option("--config", "-c", metavar="<file>", help="router config (gpufleet render router-config)")
    ],
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 inside a container)")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="port to listen on [default: settings.port of the config]")] = None,
) -> None:
    """Serve the OpenAI-compatible router described by a router config file.

    The config's `settings.plugins` (and the `gpufleet.router.plugins` entry points) are imported
    while it is read, so its policy may name the plugins they register.
    """
    # Import inside the command: the router image has only the `router` extra, and
    # `gpufleet --help` must not pay for aiohttp.
    from gpufleet.router import errors, loader
    from gpufleet.router.policies import registry

    with user_errors(errors.ConfigError, registry.PluginError):
        cfg = loader.load_router_config(config)
        if not cfg.replicas:
            raise UserError(f"{config}: replicas: the config lists no replica to route to")
        listen_port = port if port is not None else cfg.settings.port
        if not 0 <= listen_port <= 65535:
            raise UserError(f"--port {listen_port}: must be between 0 and 65535")
        _run(cfg, host, listen_port)


def _run(cfg: RouterConfig, host: str, port: int) -> None:
    import asyncio
    import gc
    import logging
    import signal

    from gpufleet.router.app import ROUTER_KEY, create_app, start

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        app = create_app(cfg)
        try:
            runner, bound = await start(app, host, port)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        router = app[ROUTER_KEY]
        # Everything allocated so far lives as long as the process: move it out of the
        # collector's sight so full collections (and their latency spikes) stay short.
        gc.collect()
        gc.freeze()
        plugins = f"plugins {', '.join(cfg.settings.plugins)}, " if cfg.settings.plugins else ""
        console.print(
            f"gpufleet router for fleet [bold]{cfg.fleet}[/]: policy {router.policy.name}, {plugins}"
            f"{len(router.replicas)} replicas, {len(router.replicas.by_model)} models, listening on http://{host}:{bound}",
            highlight=False,
            soft_wrap=True,  # never wrap: scripts read the URL from this line
        )
        console.print(router.sessions.describe(), highlight=False)
        if router.admin_token is None:
            console.print("admin endpoints disabled (no admin token configured)", style="yellow")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    try:
        import uvloop  # the router extra installs it: about twice the proxy throughput per core
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


def register(app: typer.Typer) -> None:
    """Add this noun's commands to the root app."""
    app.add_typer(router_app, name="router")
