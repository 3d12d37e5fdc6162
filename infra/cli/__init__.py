"""The `gpufleet` command line, assembled from one module per noun.

Each noun module exposes `register(app)`, which adds its commands (or a sub-group) to the
root app. Heavy dependencies (Pulumi, cloud SDKs, aiohttp) are imported inside commands,
so `gpufleet --help` and the router image stay light.

Domain errors become one clear line and exit code 1; set GPUFLEET_DEBUG=1 to see the
full traceback.
"""

from __future__ import annotations

import typer

from gpufleet.infra.cli import bench, catalog, controller, discover, fleet, preview, render, replica_sim, router, up

app = typer.Typer(
    name="gpufleet",
    help="Declarative multi-cloud GPU fleets for LLM serving, with a KV-cache-aware router.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (fleet, render, preview, up, router, replica_sim, discover, catalog, controller, bench):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
