"""`gpufleet render ...`: the plan rendered as the router's config (and, with the Pulumi part, as manifests)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gpufleet.infra import names
from gpufleet.infra.cli._common import (
    CatalogOpt,
    UserError,
    console,
    declaration_errors,
    user_errors,
)
from gpufleet.infra.cli.render_manifests import register_manifests

render_app = typer.Typer(help="Render the compiled plan for a backend.", no_args_is_help=True)


@render_app.command("router-config")
def router_config(
    file: Annotated[Path, typer.Argument(help="The fleet declaration.")],
    out: Annotated[Path, typer.Argument(help="Where to write the router config (YAML).")],
    url_template: Annotated[
        str,
        typer.Option(
            "--url-template",
            help="Base URL of each replica; {id}, {deployment}, {pool}, {index}, {port}, {namespace} are filled in.",
        ),
    ] = f"http://{names.replica_host('{id}', '{deployment}', '{namespace}')}:{{port}}",
    catalog: CatalogOpt = None,
) -> None:
    """Write the router's typed config (every replica, its pool, priority and KV capacity; the policy)."""
    import yaml

    from gpufleet.infra import plan as plan_mod
    from gpufleet.infra import router_config as router_config_mod

    with user_errors(*declaration_errors()):
        p = plan_mod.compile_file(file, catalog)
        ports = {d.name: d.port for d in p.deployments}

        def url(r) -> str:
            try:
                return url_template.format(
                    id=r.id,
                    deployment=r.deployment,
                    pool=r.pool,
                    index=r.index,
                    port=ports[r.deployment],
                    namespace=p.namespace,
                )
            except (KeyError, IndexError) as exc:
                raise UserError(f"--url-template: unknown placeholder {exc}") from None

        cfg = router_config_mod.render(p, url)
    out.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
    console.print(f"wrote {out}: {len(cfg.replicas)} replicas, policy {cfg.settings.policy}", highlight=False)


register_manifests(render_app)


def register(app: typer.Typer) -> None:
    """Add the `render` group."""
    app.add_typer(render_app, name="render")
