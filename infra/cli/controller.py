"""`gpufleet controller ...`: the warm-capacity / failover controller."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from gpufleet.infra import names
from gpufleet.infra.cli._common import UserError, console, group, user_errors
from gpufleet.infra.controller.decision import ControllerSettings

# Help text shows the settings model's defaults: one source of truth for them.
_D = {name: f.default for name, f in ControllerSettings.model_fields.items()}

controller_app = group("Keep the next pool warm before traffic spills over.")


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values or []:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise UserError(f"{flag} {value!r}: expected KEY=VALUE")
        out[key] = rest
    return out


def load_plan(path: Path) -> dict[str, Any]:
    """A plan JSON (`gpufleet plan FILE -o json`), or a fleet YAML compiled on the spot."""
    if path.suffix in (".yaml", ".yml"):
        from gpufleet.infra import plan as plan_mod

        return plan_mod.compile_file(path).to_json_dict()
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != "gpufleet.plan/v1":
        raise UserError(
            f"{path}: schema: expected 'gpufleet.plan/v1' (write it with `gpufleet plan FILE -o json --out plan.json`)"
        )
    return data


def build_controller(
    plan: dict[str, Any],
    *,
    settings: Any,
    dry_run: bool,
    kubeconfig: str | None,
    kube_contexts: dict[str, str],
    provider_names: dict[str, str],
    node_scaling: bool,
    router_metrics: str | None,
    autoscale: bool = True,
    router_service: str | None = None,
    router_port_name: str = "http",
    router_timeout_s: float = 2.0,
    ttft_window_s: float | None = None,
) -> Any:
    """Wire adapters for every pool of the plan into a `Controller`."""
    from gpufleet.infra.controller import decision, runtime
    from gpufleet.provider_adapters import base
    from gpufleet.provider_adapters import kubernetes as kube_adapter

    try:
        facts = decision.FleetFacts.from_plan(plan)
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"plan: {exc}") from None
    namespace = str(plan.get("namespace") or "gpufleet")
    pools = {p["name"]: p for p in plan["pools"]}
    unknown = sorted(set(provider_names) - set(pools))
    if unknown:
        raise UserError(f"--provider-name: no pool named {', '.join(unknown)} in the plan")
    clusters: dict[str | None, Any] = {}

    def kube_for(cloud: str) -> Any:
        context = kube_contexts.get(cloud)
        if context not in clusters:
            clusters[context] = kube_adapter.KubernetesAdapter(
                namespace=namespace, kubeconfig=kubeconfig, context=context
            )
        return clusters[context]

    kube = {name: kube_for(p["cloud"]) for name, p in pools.items()}
    nodes: dict[str, runtime.NodeBinding] = {}
    clouds = plan.get("clouds") or {}
    if node_scaling:
        for name, p in pools.items():
            if p["cloud"] == "aws" and clouds.get("aws"):
                from gpufleet.provider_adapters import aws

                ref = base.PoolRef(
                    cloud="aws",
                    name=name,
                    region=p.get("region") or clouds["aws"]["region"],
                    cluster=clouds["aws"]["cluster"],
                    provider_name=provider_names.get(name) or names.node_group_name(str(plan.get("fleet", "")), name),
                )
                nodes[name] = runtime.NodeBinding(aws.AwsAdapter(default_region=ref.region), ref)
            elif p["cloud"] == "gcp" and clouds.get("gcp") and name in provider_names:
                # GKE names a node pool's instance group gke-<cluster>-<pool>-<hash>-grp: it must be given.
                from gpufleet.provider_adapters import gcp

                ref = base.PoolRef(
                    cloud="gcp",
                    name=name,
                    region=p.get("region") or clouds["gcp"]["region"],
                    zone=(p.get("zones") or [None])[0],
                    provider_name=provider_names[name],
                )
                nodes[name] = runtime.NodeBinding(gcp.GcpAdapter(clouds["gcp"]["project"]), ref)
    metrics = runtime.ControllerMetrics()
    auto_settings = _autoscale_settings(ttft_window_s)
    reader = None
    if router_metrics and router_service:
        raise UserError("--router-metrics and --router-service: give one (a fixed URL, or the pods of a Service)")
    if router_metrics or router_service:
        from gpufleet.infra.controller import router_load

        if router_service:
            # The router runs in the cluster of the highest-priority pool (infra/manifests/_k8s.py).
            home = max(plan["pools"], key=lambda p: int(p.get("priority", 0)))
            routers = router_load.service_routers(kube_for(home["cloud"]), router_service, port_name=router_port_name)
        else:
            routers = router_load.static_router(str(router_metrics))
        reader = router_load.RouterLoadReader(
            routers, timeout_s=router_timeout_s, window_s=auto_settings.ttft_window_s, metrics=metrics
        )
    observer = runtime.Observer(
        facts, kube, nodes, router_load=reader, replica_slots=runtime.replica_slots_from_plan(plan)
    )
    scaler = None
    if autoscale:
        scaler = _build_scaler(plan, kube, reader, dry_run=dry_run, metrics=metrics, settings=auto_settings)
    return runtime.Controller(facts, settings, observer, dry_run=dry_run, metrics=metrics, scaler=scaler)


def _autoscale_settings(ttft_window_s: float | None) -> Any:
    from pydantic import ValidationError

    from gpufleet.infra.controller import autoscale

    try:
        return autoscale.AutoscaleSettings(**({} if ttft_window_s is None else {"ttft_window_s": ttft_window_s}))
    except ValidationError as exc:
        raise UserError(f"--ttft-window-s: {exc.errors()[0]['msg']}") from None


def _build_scaler(plan: dict[str, Any], kube: dict[str, Any], reader: Any, **kw: Any) -> Any:
    """The replica autoscaler over the plan's Kubernetes pools (StatefulSets through `scale`).

    It uses the routers' read the warm-capacity round of the same reconcile made (`reader.last`)."""
    from gpufleet.infra.controller import autoscale, router_load, scaler

    try:
        facts = scaler.facts_from_plan_json(plan)
    except (KeyError, ValueError, TypeError) as exc:
        # A partial plan still drives the warm capacity; say once why replicas are not scaled.
        console.print(f"[yellow]replica autoscaling off[/]: the plan lacks deployments' {exc!s}", highlight=False)
        return None
    k8s = {
        name: k for name, k in kube.items() if next(p for p in plan["pools"] if p["name"] == name)["cloud"] != "local"
    }

    def load(now: float) -> dict[str, autoscale.LoadSample]:
        return router_load.samples(facts, reader.last if reader is not None else None)

    return scaler.ReplicaScaler(facts, k8s, load=load, **kw)


def _print_round(controller: Any, decision: Any) -> None:
    from rich.table import Table

    verb = "would" if controller.dry_run else "did"
    table = Table(title=f"controller round: {len(decision.actions)} action(s) ({verb})", title_justify="left")
    for col in ("pool", "pressure", "warm target", "action", "change", "reason", "outcome"):
        table.add_column(col)
    for pool in controller.facts.pools:
        pressure = decision.pressure.get(pool)
        rows = [(a, o) for a, o in controller.applied if a.pool == pool] or [(None, None)]
        for action, outcome in rows:
            table.add_row(
                pool,
                "-" if pressure is None else f"{pressure:.0%}",
                str(decision.warm_targets.get(pool, "-")),
                action.kind if action else "",
                f"{action.current} -> {action.target}" if action else "",
                action.reason if action else "",
                outcome or "",
            )
    console.print(table)
    for pool, why in decision.notes:
        console.print(f"[yellow]{pool}[/]: no action: {why}", highlight=False)
    for pool, why in controller.observer.errors:
        console.print(f"[red]{pool}[/]: not observed: {why}", highlight=False)


@controller_app.command("run")
def run(
    config: Annotated[
        Path,
        typer.Option("--config", "-c", metavar="<file>", help="plan JSON (gpufleet plan FILE -o json) or fleet YAML"),
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would be done; change nothing")] = False,
    once: Annotated[bool, typer.Option("--once", help="one reconcile round, then exit")] = False,
    interval_s: Annotated[float | None, typer.Option(help=f"seconds between rounds [{_D['interval_s']:g}]")] = None,
    high_water: Annotated[
        float | None, typer.Option(help=f"pressure that warms the next pool [{_D['high_water']:g}]")
    ] = None,
    low_water: Annotated[
        float | None, typer.Option(help=f"pressure at which extra warmth decays [{_D['low_water']:g}]")
    ] = None,
    cool_down_s: Annotated[
        float | None, typer.Option(help=f"seconds below low water per decay step [{_D['cool_down_s']:g}]")
    ] = None,
    lead_s: Annotated[
        float | None, typer.Option(help=f"look-ahead along the demand's rise, seconds; 0: off [{_D['lead_s']:g}]")
    ] = None,
    kubeconfig: Annotated[
        str | None, typer.Option(metavar="<path>", help="kubeconfig path (default: in-cluster, then ~/.kube/config)")
    ] = None,
    kube_context: Annotated[
        list[str] | None,
        typer.Option(metavar="<cloud=context>", help="the cluster holding a cloud's pools (repeatable)"),
    ] = None,
    provider_name: Annotated[
        list[str] | None,
        typer.Option(metavar="<pool=name>", help="EKS node group / GCE instance group behind a pool (repeatable)"),
    ] = None,
    node_scaling: Annotated[bool, typer.Option(help="also raise node counts through the AWS/GCP adapters")] = True,
    autoscale: Annotated[
        bool, typer.Option(help="scale replicas per (deployment, pool) StatefulSet by pool priority")
    ] = True,
    router_metrics: Annotated[
        str | None, typer.Option(metavar="<url>", help="one router's /metrics URL, for replica load")
    ] = None,
    router_service: Annotated[
        str | None,
        typer.Option(
            metavar="<service>",
            help="read every pod of this router Service (its EndpointSlices in the plan's namespace) and add up",
        ),
    ] = None,
    router_port_name: Annotated[str, typer.Option(help="the router Service's port name")] = "http",
    router_timeout_s: Annotated[
        float, typer.Option(min=0.1, help="bound on each router pod's /metrics read, seconds")
    ] = 2.0,
    ttft_window_s: Annotated[float | None, typer.Option(help="ttft_p90_s: the window of the p90, seconds [60]")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="serve the controller's Prometheus metrics on this port")
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="address for --metrics-port")] = "127.0.0.1",
) -> None:
    """Keep the next-priority pool warm before traffic spills over.

    Watches pool utilisation (and the routers' replica load) every round and warms, or lets
    cool, the pools next in priority; scales each deployment's replicas by pool priority.
    """
    import logging
    import signal
    import threading

    from pydantic import ValidationError

    from gpufleet.provider_adapters import errors

    with user_errors(errors.AdapterError):
        overrides = {
            k: v
            for k, v in {
                "interval_s": interval_s,
                "high_water": high_water,
                "low_water": low_water,
                "cool_down_s": cool_down_s,
                "lead_s": lead_s,
            }.items()
            if v is not None
        }
        try:
            settings = ControllerSettings(**overrides)
        except ValidationError as exc:
            raise UserError(
                "; ".join(f"--{'-'.join(str(x) for x in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors())
            ) from None
        plan = load_plan(config)
        controller = build_controller(
            plan,
            settings=settings,
            dry_run=dry_run,
            kubeconfig=kubeconfig,
            kube_contexts=_pairs(kube_context, "--kube-context"),
            provider_names=_pairs(provider_name, "--provider-name"),
            node_scaling=node_scaling,
            router_metrics=router_metrics,
            autoscale=autoscale,
            router_service=router_service,
            router_port_name=router_port_name,
            router_timeout_s=router_timeout_s,
            ttft_window_s=ttft_window_s,
        )
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(metrics_port, addr=metrics_host, registry=controller.metrics.registry)
        stop = threading.Event()
        if not once:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
        controller.run(stop, once=once, on_round=lambda decision: _print_round(controller, decision))


def register(app: typer.Typer) -> None:
    """Add this noun's commands to the root app."""
    app.add_typer(controller_app, name="controller")
