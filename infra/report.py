"""Plans for people and for CI: rich tables, a pull-request comment, and plan-to-plan diffs.

`diff(old, new)` compares a plan against an earlier `gpufleet plan -o json` output,
the way Infracost's `diff` compares Terraform plans: per pool, what changes in node counts
and in money, and the total monthly change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from rich.console import Group, JustifyMethod, OverflowMethod
from rich.table import Table
from rich.text import Text

from gpufleet.infra.plan import HOURS_PER_MONTH, PLAN_SCHEMA, Plan

__all__ = ["PlanDiff", "PoolDiff", "diff", "markdown", "monthly_committed", "tables"]


class PlanFormatError(ValueError):
    """An earlier plan given to --compare is not a gpufleet JSON plan."""


@dataclass(frozen=True)
class PoolDiff:
    name: str
    status: str  # added | removed | changed | unchanged
    old_nodes: tuple[int, int, int] | None  # baseline, warm, max
    new_nodes: tuple[int, int, int] | None
    old_usd_per_month: float  # baseline + warm
    new_usd_per_month: float
    fields: tuple[str, ...] = ()  # what changed, `field old -> new`

    @property
    def delta_usd_per_month(self) -> float:
        return round(self.new_usd_per_month - self.old_usd_per_month, 2)


# The declared and compiled fields a change of which `--compare` names.
_POOL_FIELDS = (
    "cloud",
    "region",
    "zones",
    "instance_type",
    "gpu",
    "gpus_per_node",
    "capacity_type",
    "priority",
    "min_nodes",
    "baseline_nodes",
    "warm_nodes",
    "max_nodes",
    "usd_per_node_hour",
    "labels",
    "taints",
)
_DEPLOYMENT_FIELDS = (
    "model",
    "engine",
    "image",
    "gpus_per_replica",
    "min_replicas",
    "max_replicas",
    "max_model_len",
    "max_concurrent_requests",
    "gpu_memory_utilization",
    "engine_args",
    "failover",
    "kv_cache_tokens_per_replica",
    "replicas_if_top_pool_lost",
)


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def _changed(old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    return [f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys if k in new and old.get(k) != new.get(k)]


@dataclass(frozen=True)
class PlanDiff:
    old_usd_per_month: float
    new_usd_per_month: float
    pools: list[PoolDiff] = field(default_factory=list)
    deployments: list[tuple[str, str]] = field(default_factory=list)  # (name, what changed)

    @property
    def delta_usd_per_month(self) -> float:
        return round(self.new_usd_per_month - self.old_usd_per_month, 2)

    @property
    def delta_percent(self) -> float | None:
        if self.old_usd_per_month == 0:
            return None
        return 100.0 * self.delta_usd_per_month / self.old_usd_per_month


def monthly_committed(plan: Plan) -> float:
    """Baseline plus warm capacity per month: what the fleet costs while idle."""
    return round(plan.cost.baseline_usd_per_month + plan.cost.warm_usd_per_month, 2)


def _pool_nodes(p: Mapping[str, Any]) -> tuple[int, int, int]:
    return (int(p.get("baseline_nodes", p["min_nodes"])), int(p["warm_nodes"]), int(p["max_nodes"]))


def _pool_month(p: Mapping[str, Any]) -> float:
    base, warm, _ = _pool_nodes(p)
    return round((base + warm) * float(p["usd_per_node_hour"]) * HOURS_PER_MONTH, 2)


def diff(old: Mapping[str, Any], new: Plan) -> PlanDiff:
    """Compare `new` with an earlier plan's JSON form."""
    if not isinstance(old, Mapping) or old.get("schema") != PLAN_SCHEMA:
        found = old.get("schema") if isinstance(old, Mapping) else type(old).__name__
        raise PlanFormatError(f"not a gpufleet plan: expected schema {PLAN_SCHEMA!r}, found {found!r}")
    try:
        old_pools = {p["name"]: p for p in old["pools"]}
        old_deps = {d["name"]: d for d in old["deployments"]}
        old_total = round(float(old["cost"]["baseline_usd_per_month"]) + float(old["cost"]["warm_usd_per_month"]), 2)
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanFormatError(f"malformed plan JSON: missing or bad field {exc}") from None
    new_json = new.to_json_dict()
    pools: list[PoolDiff] = []
    for p in new_json["pools"]:
        o = old_pools.get(p["name"])
        if o is None:
            pools.append(PoolDiff(p["name"], "added", None, _pool_nodes(p), 0.0, _pool_month(p)))
            continue
        fields = _changed(o, p, _POOL_FIELDS)
        pools.append(
            PoolDiff(
                p["name"],
                "changed" if fields else "unchanged",
                _pool_nodes(o),
                _pool_nodes(p),
                _pool_month(o),
                _pool_month(p),
                tuple(fields),
            )
        )
    for name, o in old_pools.items():
        if name not in {p["name"] for p in new_json["pools"]}:
            pools.append(PoolDiff(name, "removed", _pool_nodes(o), None, _pool_month(o), 0.0))
    deps: list[tuple[str, str]] = []
    for d in new_json["deployments"]:
        o = old_deps.get(d["name"])
        if o is None:
            deps.append((d["name"], "added"))
            continue
        changes = _changed(o, d, _DEPLOYMENT_FIELDS)
        if o.get("placement") != d.get("placement"):
            changes.append(f"placement {_placement_text(o.get('placement'))} -> {_placement_text(d.get('placement'))}")
        if changes:
            deps.append((d["name"], "; ".join(changes)))
    for name in old_deps:
        if name not in {d["name"] for d in new_json["deployments"]}:
            deps.append((name, "removed"))
    return PlanDiff(old_total, monthly_committed(new), pools, deps)


def _placement_text(placement: Iterable[Mapping[str, Any]] | None) -> str:
    """A JSON plan's placement list as `pool:replicas, ...`."""
    return ", ".join(f"{x['pool']}:{x['replicas']}" for x in placement or [])


def _usd(x: float) -> str:
    return f"${x:,.2f}"


def _signed_usd(x: float) -> str:
    return ("+" if x > 0 else "-" if x < 0 else "±") + f"${abs(x):,.2f}"


_TIER_COLUMNS = (
    "deployment",
    "pool",
    "backend",
    "GPU KV tokens",
    "CPU KV tokens",
    "CPU hit (link)",
    "disk KV tokens",
    "disk hit",
    "host mem GiB",
    "tier $/mo",
)


def kv_tier_rows(plan: Plan) -> list[tuple[str, ...]]:
    """Per deployment and pool: each tier's tokens per replica, the rate a hit moves at, its cost."""
    rows: list[tuple[str, ...]] = []
    for d in plan.deployments:
        for pp in d.pools:
            t = pp.kv_tiers
            if t is None:
                continue
            disk = f"{t.disk_medium} {t.disk_hit_gb_per_s:g} GB/s" if t.disk_medium else "-"
            rows.append(
                (
                    d.name,
                    pp.pool,
                    t.backend,
                    f"{pp.kv_cache_tokens_per_replica:,}",
                    f"{t.cpu_kv_tokens:,}",
                    f"PCIe Gen{t.pcie_gen} {t.cpu_hit_gb_per_s:g} GB/s",
                    f"{t.disk_kv_tokens:,}",
                    disk,
                    f"{t.host_memory_gib:g}",
                    _usd(t.usd_per_hour * HOURS_PER_MONTH),
                )
            )
    return rows


class _ColumnStyle(TypedDict, total=False):
    """The keyword arguments of rich's `Table.add_column` that `tables` shares between columns."""

    no_wrap: bool
    overflow: OverflowMethod


def tables(plan: Plan, change: PlanDiff | None = None) -> Group:
    """The plan as rich tables: pools, deployments, cost, warnings."""
    # Two narrower tables per subject rather than one wide one, so that at 80 columns nothing that
    # must be read whole (a dollar amount, a model or pool name) is cut: those cells never wrap;
    # the other cells and the headers wrap.
    whole: _ColumnStyle = {"no_wrap": True, "overflow": "fold"}
    part: _ColumnStyle = {"overflow": "fold"}
    pools = Table(title=f"Fleet {plan.fleet}: nodepools", title_justify="left")
    columns: list[tuple[str, JustifyMethod, bool]] = [
        ("pool", "left", True),
        ("cloud", "left", False),
        ("region", "left", False),
        ("machine", "left", True),
        ("GPUs/node", "right", False),
        ("prio", "right", False),
        ("nodes min / base / warm / max", "right", False),
    ]
    for col, just, keep in columns:
        pools.add_column(col, justify=just, **(whole if keep else part))
    money = Table(title="nodepool cost", title_justify="left")
    money.add_column("pool", **whole)
    for col in ("$/node-h", "baseline $/mo", "warm $/mo", "peak $/mo", *(("change $/mo",) if change else ())):
        money.add_column(col, justify="right", **whole)
    by_name = {d.name: d for d in change.pools} if change else {}
    for p in sorted(plan.pools, key=lambda p: -p.priority):
        pools.add_row(
            p.name,
            p.cloud,
            p.region or "-",
            p.instance_type + (" (spot)" if p.capacity_type == "spot" else ""),
            f"{p.gpus_per_node}x {p.gpu}",
            str(p.priority),
            f"{p.min_nodes}/{p.baseline_nodes}/{p.warm_nodes}/{p.max_nodes}",
        )
        row = [
            p.name,
            f"{p.usd_per_node_hour:,.2f}",
            _usd(p.baseline_usd_per_hour * HOURS_PER_MONTH),
            _usd(p.warm_usd_per_hour * HOURS_PER_MONTH),
            _usd(p.peak_usd_per_hour * HOURS_PER_MONTH),
        ]
        if change:
            d = by_name.get(p.name)
            row.append("new" if d and d.status == "added" else _signed_usd(d.delta_usd_per_month) if d else "")
        money.add_row(*row)
    if change:
        for d in change.pools:
            if d.status == "removed":
                money.add_row(Text(d.name, style="strike"), *[""] * 4, _signed_usd(d.delta_usd_per_month))

    deps = Table(title="deployments", title_justify="left")
    for col, keep in (
        ("deployment", True),
        ("model", True),
        ("engine", False),
        ("GPUs per replica", False),
        ("replicas min / max", False),
        ("scaling", False),
    ):
        deps.add_column(col, **(whole if keep else part))
    routes = Table(title="deployments: placement and failover", title_justify="left")
    for col in ("deployment", "baseline placement", "failover order", "KV tokens per replica", "if top pool lost"):
        routes.add_column(col, **(whole if col in ("deployment", "KV tokens per replica") else part))
    for dep in plan.deployments:
        deps.add_row(
            dep.name,
            dep.model,
            dep.engine,
            str(dep.gpus_per_replica),
            f"{dep.min_replicas}/{dep.max_replicas}",
            dep.scaling_summary(),
        )
        routes.add_row(
            dep.name,
            ", ".join(f"{x.pool}: {x.replicas}" for x in dep.placement) or "-",
            " > ".join(dep.failover),
            f"{dep.kv_cache_tokens_per_replica:,}",
            str(dep.replicas_if_top_pool_lost),
        )

    tier_rows = kv_tier_rows(plan)
    tier_table = None
    if tier_rows:
        tier_table = Table(title="KV tiers per replica (kv_offload)", title_justify="left")
        for col in _TIER_COLUMNS:
            tier_table.add_column(col, justify="left" if col in ("deployment", "pool", "backend") else "right")
        for r in tier_rows:
            tier_table.add_row(*r)

    cost = Table(title="cost", title_justify="left")
    cost.add_column("")
    cost.add_column("per hour", justify="right", **whole)
    cost.add_column(f"per month ({HOURS_PER_MONTH} h)", justify="right", **whole)
    c = plan.cost
    cost.add_row("baseline (min nodes)", _usd(c.baseline_usd_per_hour), _usd(c.baseline_usd_per_month))
    cost.add_row("warm (held ready)", _usd(c.warm_usd_per_hour), _usd(c.warm_usd_per_month))
    cost.add_row(
        "baseline + warm",
        _usd(c.baseline_usd_per_hour + c.warm_usd_per_hour),
        Text(_usd(monthly_committed(plan)), style="bold"),
    )
    cost.add_row("peak (max nodes)", _usd(c.peak_usd_per_hour), _usd(c.peak_usd_per_month))

    parts: list[Any] = [pools, money, deps, routes, *([tier_table] if tier_table else []), cost]
    if change:
        pct = change.delta_percent
        parts.append(
            Text(
                f"Monthly baseline + warm: {_usd(change.old_usd_per_month)} -> {_usd(change.new_usd_per_month)} "
                f"({_signed_usd(change.delta_usd_per_month)}{f', {pct:+.1f}%' if pct is not None else ''})",
                style="bold",
            )
        )
        for pd in change.pools:
            if pd.fields:
                parts.append(Text(f"  pool {pd.name}: {'; '.join(pd.fields)}"))
        for name, what in change.deployments:
            parts.append(Text(f"  deployment {name}: {what}"))
    if plan.warnings:
        parts.append(Text("warnings:", style="bold yellow"))
        parts.extend(Text(f"  - {w.subject}: {w.message} [{w.code}]", style="yellow") for w in plan.warnings)
    return Group(*parts)


def _mermaid_cost(plan: Plan) -> list[str]:
    """Cost by pool (baseline + warm per month) as a mermaid pie chart, which GitHub renders."""
    slices = [(p.name, round((p.baseline_usd_per_hour + p.warm_usd_per_hour) * HOURS_PER_MONTH, 2)) for p in plan.pools]
    slices = [(name, usd) for name, usd in slices if usd > 0]
    if not slices:
        return []
    lines = ["", "```mermaid", "pie showData", "    title Monthly cost by pool, baseline + warm (USD)"]
    lines += [f'    "{name}" : {usd:.2f}' for name, usd in sorted(slices, key=lambda x: -x[1])]
    return [*lines, "```"]


def markdown(plan: Plan, change: PlanDiff | None = None) -> str:
    """A pull-request comment: the monthly total and its change, then per pool."""
    total = monthly_committed(plan)
    lines = [f"### gpufleet plan: `{plan.fleet}`", ""]
    if change:
        pct = change.delta_percent
        verb = (
            "increase"
            if change.delta_usd_per_month > 0
            else "decrease"
            if change.delta_usd_per_month < 0
            else "not change"
        )
        amount = (
            ""
            if verb == "not change"
            else f" by **{_usd(abs(change.delta_usd_per_month))}"
            + (f" ({pct:+.1f}%)" if pct is not None else "")
            + "**"
        )
        lines.append(
            f"Monthly cost (baseline + warm) will {verb}{amount}: {_usd(change.old_usd_per_month)} -> **{_usd(total)}**."
        )
    else:
        lines.append(
            f"Monthly cost (baseline + warm): **{_usd(total)}** (peak at max nodes: {_usd(plan.cost.peak_usd_per_month)})."
        )
    lines += [
        "",
        "| Pool | Cloud | Machine | Priority | Nodes base/warm/max | $/node-h | Baseline + warm $/mo | Peak $/mo |"
        + (" Change $/mo |" if change else ""),
        "|---|---|---|---:|---:|---:|---:|---:|" + ("---:|" if change else ""),
    ]
    by_name = {d.name: d for d in change.pools} if change else {}
    for p in sorted(plan.pools, key=lambda p: -p.priority):
        month = (p.baseline_usd_per_hour + p.warm_usd_per_hour) * HOURS_PER_MONTH
        row = f"| {p.name} | {p.cloud} {p.region or ''} | {p.instance_type}{' (spot)' if p.capacity_type == 'spot' else ''} | {p.priority} | {p.baseline_nodes}/{p.warm_nodes}/{p.max_nodes} | {p.usd_per_node_hour:,.2f} | {_usd(month)} | {_usd(p.peak_usd_per_hour * HOURS_PER_MONTH)} |"
        if change:
            d = by_name.get(p.name)
            row += f" {'new' if d and d.status == 'added' else _signed_usd(d.delta_usd_per_month) if d else ''} |"
        lines.append(row)
    if change:
        for d in change.pools:
            if d.status == "removed":
                lines.append(f"| ~~{d.name}~~ | | | | removed | | | | {_signed_usd(d.delta_usd_per_month)} |")
    lines += [
        "",
        "| Deployment | Model | Replicas min/max | Scaling | Placement | Failover | KV tokens/replica |",
        "|---|---|---:|---|---|---|---:|",
    ]
    for dep in plan.deployments:
        lines.append(
            f"| {dep.name} | {dep.model} | {dep.min_replicas}/{dep.max_replicas} | {dep.scaling_summary()} | {', '.join(f'{x.pool}: {x.replicas}' for x in dep.placement)} | {' > '.join(dep.failover)} | {dep.kv_cache_tokens_per_replica:,} |"
        )
    lines += _mermaid_cost(plan)
    tier_rows = kv_tier_rows(plan)
    if tier_rows:
        lines += ["", "| " + " | ".join(_TIER_COLUMNS) + " |", "|---|---|---|" + "---:|" * (len(_TIER_COLUMNS) - 3)]
        lines += ["| " + " | ".join(r) + " |" for r in tier_rows]
    if change and any(pd.fields for pd in change.pools):
        lines += ["", "**Pool changes**", ""] + [
            f"- `{pd.name}`: {'; '.join(pd.fields)}" for pd in change.pools if pd.fields
        ]
    if change and change.deployments:
        lines += ["", "**Deployment changes**", ""] + [f"- `{n}`: {w}" for n, w in change.deployments]
    if plan.warnings:
        lines += ["", "<details><summary>Warnings (" + str(len(plan.warnings)) + ")</summary>", ""]
        lines += [f"- **{w.subject}**: {w.message} (`{w.code}`)" for w in plan.warnings]
        lines += ["", "</details>"]
    lines += ["", f"<sub>Prices: gpufleet catalog as of {plan.catalog_as_of}, {HOURS_PER_MONTH} h/month.</sub>", ""]
    return "\n".join(lines)
