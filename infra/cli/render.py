"""`gpufleet render ...`: the plan rendered as the router's config (and, with the Pulumi part, as manifests)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gpufleet.infra import names
from gpufleet.infra.cli._common import (
    CatalogOpt,
    OutOpt,
    UserError,
    declaration_errors,
    group,
    output_option,
    user_errors,
    write_output,
)
from gpufleet.infra.cli.render_manifests import register_manifests

if TYPE_CHECKING:
    from gpufleet.infra.plan import ReplicaPlan

render_app = group("Render the plan for a backend: router config, manifests.")

DEFAULT_URL_TEMPLATE = f"http://{names.replica_host('{id}', '{deployment}', '{namespace}')}:{{port}}"

CONFIG_FORMATS = {"yaml": "what `router serve --config` reads", "json": "the same data as JSON"}


@render_app.command("router-config")
def router_config(
    file: Annotated[Path, typer.Argument(help="The fleet declaration.")],
    output: Annotated[str, output_option(CONFIG_FORMATS)] = "yaml",
    out: OutOpt = None,
    url_template: Annotated[
        str,
        typer.Option(
            "--url-template",
            show_default=False,
            help="Base URL of each replica; {id}, {deployment}, {pool}, {index}, {port}, {namespace} are filled "
            "in [default: the in-cluster Service, http://{id}.{deployment}.{namespace}.svc.cluster.local:{port}].",
        ),
    ] = DEFAULT_URL_TEMPLATE,
    catalog: CatalogOpt = None,
) -> None:
    """Write the router's config from the plan.

    Every replica of the plan with its URL, pool, priority and KV capacity, and the router's
    settings; to stdout, or to a file with --out.
    """
    import json

    import yaml

    from gpufleet.infra import plan as plan_mod
    from gpufleet.infra import router_config as router_config_mod

    with user_errors(*declaration_errors()):
        p = plan_mod.compile_file(file, catalog)
        if url_template == DEFAULT_URL_TEMPLATE and p.pools and all(pool.cloud == "local" for pool in p.pools):
            # In-cluster Service names do not resolve here, and a local replica's port is only
            # chosen when `gpufleet up` starts it (up renders the router's config itself).
            raise UserError(
                f"{file}: every pool is `cloud: local`, so there are no Service URLs to write and replica "
                "ports are chosen when `gpufleet up` starts them; run `gpufleet up` (it serves the router), "
                "or give --url-template for replicas you run yourself, e.g. 'http://127.0.0.1:{port}'"
            )
        ports = {d.name: d.port for d in p.deployments}

        def url(r: ReplicaPlan) -> str:
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
    data = cfg.model_dump(mode="json", by_alias=True)
    text = json.dumps(data, indent=2) + "\n" if output == "json" else yaml.safe_dump(data, sort_keys=False)
    write_output(
        text, out, f"{len(cfg.replicas)} replica{'' if len(cfg.replicas) == 1 else 's'}, policy {cfg.settings.policy}"
    )


register_manifests(render_app)


def register(app: typer.Typer) -> None:
    """Add the `render` group."""
    app.add_typer(render_app, name="render")
