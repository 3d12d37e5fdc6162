"""`gpufleet init`: write a fleet for one model that validates, plans and previews unchanged."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from gpufleet.infra.cli._common import CatalogOpt, UserError, console, declaration_errors, err_console, user_errors


def register(app: typer.Typer) -> None:
    """Add `gpufleet init`."""

    @app.command("init")
    def init(
        model: Annotated[str, typer.Option("--model", help="The model to serve, as named in the catalog.")],
        gpu: Annotated[
            str | None, typer.Option("--gpu", help="The GPU of the preferred pool (default: the cheapest that fits).")
        ] = None,
        cloud: Annotated[
            str | None,
            typer.Option(
                "--cloud",
                help="aws, gcp, kubernetes (an existing cluster) or local (default: the cheapest of aws and gcp).",
                autocompletion=lambda incomplete: [
                    c for c in ("aws", "gcp", "kubernetes", "local") if c.startswith(incomplete)
                ],
            ),
        ] = None,
        out: Annotated[Path, typer.Option("--out", metavar="<dir>", help="The directory to write.")] = Path("."),
        name: Annotated[
            str | None, typer.Option("--name", help="Fleet and stack name (default: from the model).")
        ] = None,
        max_model_len: Annotated[
            int | None, typer.Option("--max-model-len", help="Context to serve (default: the model's).")
        ] = None,
        force: Annotated[bool, typer.Option("--force", help="Overwrite files that exist.")] = False,
        catalog: CatalogOpt = None,
    ) -> None:
        """Write a fleet for one model, and its Pulumi stack.

        Machine types come from the catalog: a replica's GPUs must hold the weights and a KV cache
        of twice the context. The cheapest fitting offer is the preferred pool; a fallback pool on
        another cloud or GPU has one warm node. `gpufleet validate`, `plan` and `preview` accept
        the result unchanged.
        """
        from gpufleet.infra import catalog as catalog_mod
        from gpufleet.infra import plan as plan_mod
        from gpufleet.infra import scaffold

        with user_errors(scaffold.InitError, *declaration_errors()):
            cat = catalog_mod.load(catalog or [])
            choice = scaffold.choose(cat, model, gpu=gpu, cloud=cloud, max_model_len=max_model_len)
            fleet_name = name or scaffold.fleet_name(model)
            out.mkdir(parents=True, exist_ok=True)
            rel = [os.path.relpath(Path(c).resolve(), out.resolve()) for c in catalog or []]
            files = scaffold.render(choice, fleet_name, catalog_files=rel)
            existing = [p for p in files if (out / p).exists()]
            if existing and not force:
                raise UserError(f"{out}: {', '.join(existing)} exist; give --force to overwrite")
            from gpufleet.infra import spec

            # Nothing is written unless the result compiles: the promise is that it works at once.
            fleet, smap = spec.load_text(files["fleet.yaml"], str(out / "fleet.yaml"), out)
            compiled = plan_mod.compile_fleet(fleet, smap, cat)
        for path, text in files.items():
            (out / path).write_text(text)
        _show(choice, compiled, out, files)

    def _show(choice: object, compiled: object, out: Path, files: dict[str, str]) -> None:
        from rich.table import Table

        from gpufleet.infra import scaffold

        assert isinstance(choice, scaffold.Choice)
        table = Table(
            title=f"offers that fit {choice.model.name} ({choice.max_model_len}-token context)", title_justify="left"
        )
        for col in ("offer", "GPUs/replica", "KV tokens", "$/h per replica"):
            table.add_column(col, justify="left" if col == "offer" else "right", no_wrap=True)
        for o in choice.considered[:6]:
            table.add_row(o.label(), str(o.gpus_per_replica), f"{o.kv_tokens:,}", f"{o.usd_per_replica_hour:.3f}")
        console.print(table)
        for r in choice.reasons:
            console.print(f"picked {r}", highlight=False, soft_wrap=True)
        cost = getattr(compiled, "cost", None)
        if cost is not None:
            console.print(
                f"baseline + warm: ${cost.baseline_usd_per_month + cost.warm_usd_per_month:,.2f}/month",
                highlight=False,
            )
        for path in files:
            err_console.print(f"wrote {out / path}", highlight=False)
        fleet_file = out / "fleet.yaml"
        if "Pulumi.yaml" in files:
            console.print(
                f"next: gpufleet validate {fleet_file} && gpufleet plan {fleet_file} && gpufleet preview {out}",
                highlight=False,
                soft_wrap=True,
            )
        else:
            console.print(f"next: gpufleet validate {fleet_file} && gpufleet up {fleet_file}", highlight=False)
