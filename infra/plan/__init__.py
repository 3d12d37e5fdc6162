"""The compiled plan: a pure function from a fleet declaration (and the catalog) to data.

Every backend reads the Plan: Pulumi components, Kubernetes manifests, the router config,
the local runtime, the controller and `gpufleet plan`. None of them recomputes placement.

`compile_file(path)` and `compile_data(data, origin)` load and validate a declaration and
compile it; every caller that starts from a declaration uses one of them. `compile_fleet` is
the compiler itself, in named stages:

1. `pools.pool_machines`: each pool's GPUs and price, from the catalog.
2. `placement.deployment_fits`: each deployment's usable pools (its failover order) and KV
   capacity per replica on each.
3. `placement.place`: the baseline placement, deployment by deployment, first-fit on nodes.
4. `assembly.pool_plans`, `assembly.deployment_plans`: the records and the warnings.
5. `cost.fleet_cost`: baseline, warm and peak cost.

Stages 1 to 3 collect every problem of the declaration; any problem raises `spec.FleetError`
listing them all before stage 4 runs.

Estimates from first principles (documented in docs/plan.md):
- KV-cache tokens per replica = (GPUs x GPU memory x gpu_memory_utilization - weights)
  / KV bytes per token.
- prefill tokens/s per replica = GPUs x dense bf16 FLOP/s x PREFILL_MFU / (2 x params).
- decode tokens/s of one sequence = GPUs x memory bandwidth x DECODE_BW_EFFICIENCY / weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gpufleet.infra import catalog as catalog_mod
from gpufleet.infra import spec
from gpufleet.infra.plan import assembly, cost, model, placement, pools
from gpufleet.infra.plan.model import *  # noqa: F403 - the records, listed in model.__all__
from gpufleet.infra.plan.model import Plan

__all__ = ["compile_data", "compile_file", "compile_fleet"]
__all__ += model.__all__


def compile_file(path: str | Path, extra_catalogs: Iterable[str | Path] | None = None) -> Plan:
    """Load, validate and compile a declaration file, with its catalog files and `extra_catalogs`."""
    fleet, smap = spec.load_file(path)
    return _compile_loaded(fleet, smap, extra_catalogs)


def compile_data(
    data: Any,
    origin: str = "<config>",
    base_dir: Path | None = None,
    extra_catalogs: Iterable[str | Path] | None = None,
) -> Plan:
    """Validate and compile a declaration given as plain data (e.g. Pulumi stack config
    `gpufleet:fleet`); `origin` names it in errors, `base_dir` anchors its catalog files."""
    fleet, smap = spec.load_dict(data, origin, base_dir)
    return _compile_loaded(fleet, smap, extra_catalogs)


def _compile_loaded(fleet: spec.Fleet, smap: spec.SourceMap, extra_catalogs: Iterable[str | Path] | None) -> Plan:
    return compile_fleet(fleet, smap, catalog_mod.load([*fleet.catalog, *(extra_catalogs or ())]))


def compile_fleet(
    fleet: spec.Fleet,
    smap: spec.SourceMap | None = None,
    catalog: catalog_mod.Catalog | None = None,
) -> Plan:
    """Compile a validated fleet into a Plan, or raise `spec.FleetError` with every problem."""
    smap = smap if smap is not None else spec.SourceMap("<fleet>")
    catalog = catalog if catalog is not None else catalog_mod.load(fleet.catalog)
    issues: list[spec.FleetIssue] = []
    machines = pools.pool_machines(fleet, catalog, smap, issues)
    fits = placement.deployment_fits(fleet, catalog, machines, smap, issues)
    packing = placement.place(fleet, machines, fits, smap, issues)
    if issues:
        raise spec.FleetError(sorted(issues, key=lambda x: (x.line or 0, x.field)))
    pool_plans, pool_warnings = assembly.pool_plans(fleet, machines, fits, packing)
    deployment_plans, deployment_warnings = assembly.deployment_plans(fleet, machines, fits, packing)
    return Plan(
        fleet=fleet.fleet,
        namespace=fleet.namespace,
        source=smap.file,
        catalog_as_of=catalog.as_of,
        clouds=fleet.clouds,
        router=fleet.router,
        pools=pool_plans,
        deployments=deployment_plans,
        cost=cost.fleet_cost(pool_plans),
        warnings=[*pool_warnings, *deployment_warnings],
    )
