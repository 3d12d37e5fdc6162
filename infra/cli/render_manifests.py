"""`gpufleet render manifests FILE --out DIR`: the plan's Kubernetes objects as YAML for GitOps.

The lead's `infra/cli/render.py` calls `register_manifests(render_app)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gpufleet.infra.cli._common import (
    CatalogOpt,
    UserError,
    console,
    declaration_errors,
    user_errors,
)

__all__ = ["register_manifests"]


def register_manifests(render_app: typer.Typer) -> None:
    """Add the `manifests` command to the `render` group."""

    @render_app.command("manifests")
    def manifests_cmd(
        file: Annotated[Path, typer.Argument(help="The fleet declaration.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write one YAML file per cluster into.")],
        catalog: CatalogOpt = None,
        router_image: Annotated[str | None, typer.Option(help="Router image (with gpufleet[router]).")] = None,
        autoscaler_namespace: Annotated[
            str | None, typer.Option(help="Namespace of cluster-autoscaler [kube-system].")
        ] = None,
        router_service_type: Annotated[str | None, typer.Option(help="ClusterIP, LoadBalancer or NodePort.")] = None,
        controller: Annotated[
            bool, typer.Option(help="Include the warm-capacity / failover controller and its RBAC.")
        ] = True,
        controller_image: Annotated[
            str | None, typer.Option(help="Controller image (with gpufleet[router,kubernetes,aws,gcp]).")
        ] = None,
    ) -> None:
        """Write the Kubernetes objects of the plan (priority classes, placeholders, expander
        ConfigMap, model StatefulSets and Services, the router, the controller and its RBAC), one
        multi-document YAML per cluster.

        The router's admin-token Secret is not written (its value never lands in files): create
        it with `kubectl create secret generic <fleet>-router-admin --from-literal=token=...`.
        """
        from rich.table import Table

        from gpufleet.infra import manifests
        from gpufleet.infra import plan as plan_mod

        with user_errors(*declaration_errors()):
            p = plan_mod.compile_file(file, catalog)
            defaults = manifests.ManifestOptions()
            if router_service_type is not None and router_service_type not in ("ClusterIP", "LoadBalancer", "NodePort"):
                raise UserError(
                    f"--router-service-type {router_service_type!r}: expected ClusterIP, LoadBalancer or NodePort"
                )
            options = manifests.ManifestOptions(
                router_image=router_image or defaults.router_image,
                autoscaler_namespace=autoscaler_namespace or defaults.autoscaler_namespace,
                router_service_type=router_service_type or defaults.router_service_type,
                controller=controller,
                controller_image=controller_image or defaults.controller_image,
            )
            per_cluster = manifests.all_objects(p, options)
            if not per_cluster:
                raise UserError(f"{file}: no pool runs on Kubernetes (local pools have no manifests)")
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"--out {out}: cannot create the directory: {exc.strerror}") from None
            table = Table(title=f"Manifests of fleet {p.fleet}", title_justify="left")
            table.add_column("cluster")
            table.add_column("file")
            table.add_column("objects", justify="right")
            table.add_column("kinds")
            for key, objs in per_cluster.items():
                target = out / f"{key}.yaml"
                header = f"# gpufleet manifests for fleet {p.fleet}, cluster {key}; generated from {file}\n"
                target.write_text(header + manifests.dump_yaml(objs))
                kinds: dict[str, int] = {}
                for o in objs:
                    kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
                table.add_row(key, str(target), str(len(objs)), ", ".join(f"{k} {n}" for k, n in kinds.items()))
        console.print(table)
        console.print(
            f"create the router's admin token Secret yourself: kubectl -n {p.namespace} create secret generic "
            f'{manifests.admin_secret_name(p)} --from-literal=token="$(openssl rand -hex 32)"',
            highlight=False,
            soft_wrap=True,
        )
