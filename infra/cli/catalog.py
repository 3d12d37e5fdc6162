"""`gpufleet catalog ...`: refresh a user catalog file from the live cloud APIs."""

from __future__ import annotations

import enum
import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from gpufleet.infra.cli._common import UserError, console, group, user_errors

catalog_app = group("The machine and price catalog.")


class Cloud(str, enum.Enum):
    aws = "aws"
    gcp = "gcp"


@catalog_app.command("refresh")
def refresh(
    cloud: Annotated[Cloud, typer.Option(help="cloud to read")],
    out: Annotated[
        Path | None,
        typer.Option(metavar="<path>", help="user catalog file to (re)write [default: catalog-<cloud>.yaml]"),
    ] = None,
    region: Annotated[
        list[str] | None,
        typer.Option(metavar="<region>", help="region to read (repeatable) [default: the bundled catalog's]"),
    ] = None,
    project: Annotated[str | None, typer.Option(help="GCP project [default: GOOGLE_CLOUD_PROJECT]")] = None,
) -> None:
    """Rewrite a user catalog file from the live APIs.

    The same format as the bundled catalog: GPU facts, regions and spot prices. Use it with
    `gpufleet plan FILE --catalog FILE`.
    """
    from gpufleet.infra import catalog as catalog_mod
    from gpufleet.infra.cli import discover as discover_cli
    from gpufleet.provider_adapters import discovery, errors

    with user_errors(errors.AdapterError, catalog_mod.CatalogError):
        reference = catalog_mod.bundled()
        target = out or Path(f"catalog-{cloud.value}.yaml")
        if not target.parent.is_dir():
            raise UserError(f"--out {target}: directory {target.parent} does not exist")
        regions = list(region or discovery.regions_of(reference, cloud.value))
        adapter = discovery.connect(cloud.value, project=project)
        notes: list[str] = []
        found = discover_cli.walk(adapter, regions, None, notes)
        skipped: list[str] = []
        ref_region = {"aws": "us-east-1", "gcp": "us-central1"}[cloud.value]
        document = discovery.catalog_document(
            cloud.value, found, reference, reference_region=ref_region, skipped=skipped
        )
        if not document["machines"]:
            raise UserError(f"no priced GPU machine found in {', '.join(regions)}; {target} left unchanged")
        text = discovery.dump(document)
        # Validate with the catalog's own loader before replacing the user's file.
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=target.parent, delete=False) as tmp:
            tmp.write(text)
        try:
            catalog_mod.load([tmp.name])
            os.replace(tmp.name, target)
        finally:
            if os.path.exists(tmp.name):
                os.unlink(tmp.name)
        console.print(
            f"wrote {target}: {len(document['machines'])} {cloud.value} machines from {len(regions)} region(s)",
            highlight=False,
        )
        for line in [*notes, *skipped]:
            console.print(f"[yellow]note:[/] {line}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add this noun's commands to the root app."""
    app.add_typer(catalog_app, name="catalog")
