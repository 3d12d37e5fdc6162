"""The `gpufleet` command line, assembled from one module per noun.

Each noun module exposes `register(app)`, which adds its commands (or a sub-group made with
`_common.group`) to the root app. Heavy dependencies (Pulumi, cloud SDKs, aiohttp) are imported
inside commands, so `gpufleet -h` and the router image stay light. The conventions every command
follows (`-o/--output FORMAT`, `--out PATH`, progress on stderr) are in `_common` and docs/cli.md.

Domain errors become one clear line and exit code 1; set GPUFLEET_DEBUG=1 to see the
full traceback.
"""

from __future__ import annotations

from typing import Annotated

import typer

from gpufleet.infra.cli import (
    bench,
    catalog,
    controller,
    discover,
    fleet,
    init,
    preview,
    render,
    replica_sim,
    router,
    skills,
    up,
)
from gpufleet.infra.cli._common import group


def version() -> str:
    """The installed distribution's version."""
    from importlib import metadata

    try:
        return metadata.version("gpufleet")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"gpufleet {version()}")
        raise typer.Exit()


app = group(name="gpufleet", add_completion=True)


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version and exit."),
    ] = False,
) -> None:
    """Declarative multi-cloud GPU fleets for LLM serving, with a KV-cache-aware router.

    Every command takes -h. Output: -o/--output FORMAT (table, json, ...); --out PATH writes it to
    a file. Progress and warnings go to stderr. Shell completion: --install-completion.
    """


for _module in (init, fleet, render, preview, up, router, replica_sim, discover, catalog, controller, bench, skills):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="gpufleet")
