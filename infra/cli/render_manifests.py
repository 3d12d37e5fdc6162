"""`gpufleet render manifests FILE [--out DIR]`: the plan's Kubernetes objects as YAML for GitOps.

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
    err_console,
    output_option,
    user_errors,
    write_output,
)

__all__ = ["register_manifests"]

MANIFEST_FORMATS = {"yaml": "multi-document YAML", "json": "a v1 List (kubectl apply -f reads both)"}


def register_manifests(render_app: typer.Typer) -> None:
    """Add the `manifests` command to the `render` group."""

    @render_app.command("manifests")
    def manifests_cmd(
        file: Annotated[Path, typer.Argument(help="The fleet declaration.")],
        out: Annotated[
            Path | None,
            typer.Option(
                "--out",
                metavar="<dir>",
                help="Write one file per cluster into this directory (needed when the fleet spans several "
                "clusters; otherwise the objects go to stdout).",
            ),
        ] = None,
        output: Annotated[str, output_option(MANIFEST_FORMATS)] = "yaml",
        catalog: CatalogOpt = None,
        router_image: Annotated[
            str | None, typer.Option(metavar="<image>", help="Router image (with gpufleet[router]).")
        ] = None,
        autoscaler_namespace: Annotated[
            str | None, typer.Option(metavar="<namespace>", help="Namespace of cluster-autoscaler [kube-system].")
        ] = None,
        router_service_type: Annotated[
            str | None,
            typer.Option(metavar="<type>", help="The router Service's type: ClusterIP, LoadBalancer or NodePort."),
        ] = None,
        controller: Annotated[
            bool, typer.Option(help="Include the warm-capacity / failover controller and its RBAC.")
        ] = True,
        controller_image: Annotated[
            str | None,
            typer.Option(metavar="<image>", help="Controller image (with gpufleet[router,kubernetes,aws,gcp])."),
        ] = None,
        hf_token_secret: Annotated[
            str | None,
            typer.Option(
                metavar="<secret>",
                help="Secret (key `token`) the engines read HF_TOKEN from, for gated models; its value is never "
                "written (kubectl create secret generic <secret> --from-literal=token=...).",
            ),
        ] = None,
        model_cache_storage_class: Annotated[
            str | None,
            typer.Option(
                metavar="<class>",
                help="Give each engine a PersistentVolumeClaim of this storage class "
                "for its model cache (default: an emptyDir, refetched by every new pod).",
            ),
        ] = None,
        model_cache_size: Annotated[
            str, typer.Option(metavar="<size>", help="Size of each model-cache claim.")
        ] = "200Gi",
        model_cache_host_path: Annotated[
            str | None,
            typer.Option(metavar="<dir>", help="Keep the model cache in this directory of the node (hostPath)."),
        ] = None,
    ) -> None:
        """Write the plan's Kubernetes objects, one file per cluster.

        Priority classes, placeholders, the expander ConfigMap, model StatefulSets and Services,
        the router, the controller and its RBAC: one multi-document YAML (or -o json, a v1 List)
        per cluster into --out DIR; a fleet on one cluster may go to stdout instead
        (`gpufleet render manifests fleet.yaml | kubectl apply -f -`).

        The router's admin-token Secret is not written (its value never lands in files): create
        it with `kubectl create secret generic <fleet>-router-admin --from-literal=token=...`.
        """
        import json

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
                hf_token_secret=hf_token_secret,
                model_cache_storage_class=model_cache_storage_class,
                model_cache_size=model_cache_size,
                model_cache_host_path=model_cache_host_path,
            )
            problems = manifests.engine_option_problems(options, lambda name: "--" + name.replace("_", "-"))
            if problems:
                raise UserError("; ".join(problems))
            per_cluster = manifests.all_objects(p, options)
            if not per_cluster:
                raise UserError(f"{file}: no pool runs on Kubernetes (local pools have no manifests)")
            if out is None and len(per_cluster) > 1:
                raise UserError(
                    f"{file}: the fleet spans {len(per_cluster)} clusters ({', '.join(per_cluster)}): "
                    "give --out DIR for one file per cluster"
                )
            if out is not None:
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
                if output == "json":
                    text = json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}, indent=2) + "\n"
                else:
                    header = f"# gpufleet manifests for fleet {p.fleet}, cluster {key}; generated from {file}\n"
                    text = header + manifests.dump_yaml(objs)
                target = None if out is None else out / f"{key}.{output}"
                if target is None:
                    write_output(text, None)
                else:
                    target.write_text(text)
                kinds: dict[str, int] = {}
                for o in objs:
                    kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
                table.add_row(
                    key, str(target or "stdout"), str(len(objs)), ", ".join(f"{k} {n}" for k, n in kinds.items())
                )
        # With the objects on stdout, the summary goes to stderr so that a pipe gets only YAML.
        shown = console if out is not None else err_console
        shown.print(table)
        shown.print(
            f"create the router's admin token Secret yourself: kubectl -n {p.namespace} create secret generic "
            f'{manifests.admin_secret_name(p)} --from-literal=token="$(openssl rand -hex 32)" '
            '--from-literal=session-key="$(openssl rand -hex 32)"',
            highlight=False,
            soft_wrap=True,
        )
