"""`gpufleet discover`: which GPU machines the live clouds offer where, at what price, with what quota."""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any

import typer

from gpufleet.infra.cli._common import OutOpt, UserError, emit, legacy_format, output_option, progress, user_errors


class Cloud(str, enum.Enum):
    aws = "aws"
    gcp = "gcp"


DISCOVER_FORMATS = {"table": "for people", "json": "for tools: {cloud, machines, notes}"}


def walk(adapter: Any, regions: list[str], gpu: str | None, notes: list[str]) -> list[Any]:
    """Run discovery with a progress display (on stderr, so JSON on stdout stays clean)."""
    from gpufleet.provider_adapters import discovery

    with progress() as bar:
        task = bar.add_task("regions", total=len(regions))
        return discovery.discover(
            adapter,
            regions,
            gpu=gpu,
            notes=notes,
            on_zone=lambda zone: bar.update(task, description=f"zone {zone}"),
            on_region=lambda region: bar.update(task, advance=1, description=f"region {region}"),
        )


def register(app: typer.Typer) -> None:
    """Add this noun's commands to the root app."""

    @app.command("discover")
    def discover(
        cloud: Annotated[Cloud, typer.Option(help="cloud to ask")],
        region: Annotated[
            list[str],
            typer.Option(metavar="<region>", help="region to walk (repeatable); `all`: every region of the account"),
        ],
        gpu: Annotated[str | None, typer.Option(help="only this GPU model, e.g. H100, L4, A100-80GB")] = None,
        output: Annotated[str, output_option(DISCOVER_FORMATS)] = "table",
        out: OutOpt = None,
        project: Annotated[str | None, typer.Option(help="GCP project [default: GOOGLE_CLOUD_PROJECT]")] = None,
        format_old: Annotated[str | None, typer.Option("--format", "-f", hidden=True)] = None,
    ) -> None:
        """Show GPU machines offered per region and zone: price, quota.

        Which machine types are offered in which regions and zones, at what spot price, and how
        many more of each the free quota allows.
        """
        from gpufleet.infra import catalog as catalog_mod
        from gpufleet.provider_adapters import discovery, errors

        output = legacy_format(format_old, "-f/--format", DISCOVER_FORMATS, output)
        with user_errors(errors.AdapterError):
            adapter = discovery.connect(cloud.value, project=project)
            regions = adapter.regions() if region == ["all"] else region
            notes: list[str] = []
            found = walk(adapter, regions, gpu, notes)
            if not found and output == "table":
                raise UserError(f"no GPU machine{' with ' + gpu if gpu else ''} offered in {', '.join(regions)}")

            def show(target: Any) -> None:
                target.print(_table(cloud.value, found, catalog_mod.load()))
                for note in notes:
                    target.print(f"[yellow]note:[/] {note}", highlight=False)

            data = {"cloud": cloud.value, "machines": [m.as_json() for m in found], "notes": notes}
            emit(show, json.dumps(data, indent=2) + "\n" if output == "json" else None, out)


def _table(cloud: str, found: list[Any], catalog: Any) -> Any:
    from rich.table import Table

    table = Table(title=f"GPU machines on {cloud}", title_justify="left")
    for col, justify in (
        ("region", "left"),
        ("machine", "left"),
        ("GPUs", "left"),
        ("vCPU", "right"),
        ("RAM GiB", "right"),
        ("zones", "left"),
        ("on-demand $/h", "right"),
        ("spot $/h (live)", "right"),
        ("quota headroom", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for item in found:
        o = item.offering
        known = catalog.machine(cloud, o.machine_type)
        table.add_row(
            o.region,
            o.machine_type,
            f"{o.gpu_count}x {o.gpu_model} {o.gpu_memory_gib:g}GiB",
            str(o.vcpus),
            f"{o.ram_gib:g}",
            ", ".join(z.removeprefix(o.region) or z for z in o.zones),
            f"{known.usd_per_hour:.2f} (catalog)" if known else "-",
            "-" if item.spot_usd_per_h is None else f"{item.spot_usd_per_h:.4g}",
            "-" if item.quota_headroom_nodes is None else f"{item.quota_headroom_nodes} nodes",
        )
    return table
