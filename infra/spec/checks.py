"""The checks of a declaration that need more than one field but no catalog: names, references,
bounds. They run on the parts that parsed, so one run reports every problem."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpufleet.infra.spec.issues import FleetIssue, SourceMap
from gpufleet.router.kvevents import ranks

if TYPE_CHECKING:
    from gpufleet.infra.spec import Clouds, Deployment, Nodepool
    from gpufleet.router.config import RouterSettings

__all__ = [
    "OFFLOAD_BACKENDS",
    "cross_check",
    "data_parallel_issues",
    "duplicate_names",
    "local_tokenizer_files",
    "offload_issues",
]

# What each engine can offload to, and which of its backends have a disk tier.
OFFLOAD_BACKENDS = {"vllm": ("native", "lmcache"), "sglang": ("hicache",)}
_DISK_BACKENDS = ("lmcache", "hicache")


def duplicate_names(section: str, items: list[tuple[int, Any]], smap: SourceMap) -> list[FleetIssue]:
    """A name used again in `section` is an error at the later use."""
    first: dict[str, int] = {}
    issues = []
    for i, item in items:
        if item.name in first:
            issues.append(
                smap.issue((section, i, "name"), f"{item.name!r} is already the name of {section}[{first[item.name]}]")
            )
        first.setdefault(item.name, i)
    return issues


def cross_check(
    pools: list[tuple[int, Nodepool]],
    deployments: list[tuple[int, Deployment]],
    clouds: Clouds | None,
    smap: SourceMap,
    declared_pools: set[str] | None = None,
) -> list[FleetIssue]:
    """Checks that need more than one field but no catalog: names, references, bounds.

    Works on the parts that parsed (with their indexes), so that a declaration with a type
    error still gets its other problems reported in the same run. `clouds` is None when the
    clouds section itself is invalid (its errors are reported already).
    """
    issues: list[FleetIssue] = []
    if declared_pools is None:
        declared_pools = {p.name for _, p in pools}
    issues.extend(duplicate_names("nodepools", pools, smap))
    for i, pool in pools:
        loc = ("nodepools", i)
        if pool.max_nodes < pool.min_nodes:
            issues.append(smap.issue(loc + ("max_nodes",), f"{pool.max_nodes} is below min_nodes {pool.min_nodes}"))
        elif pool.warm_nodes > pool.max_nodes - pool.min_nodes:
            issues.append(
                smap.issue(
                    loc + ("warm_nodes",),
                    f"{pool.warm_nodes} does not fit: at most max_nodes - min_nodes = {pool.max_nodes - pool.min_nodes}",
                )
            )
        if pool.cloud in ("aws", "gcp"):
            if clouds is None:
                continue
            cloud_cfg = getattr(clouds, pool.cloud)
            if cloud_cfg is None:
                issues.append(smap.issue(loc + ("cloud",), f"{pool.cloud!r} is not configured under `clouds:`"))
            region = pool.region or (cloud_cfg.region if cloud_cfg else None)
            for z, zone in enumerate(pool.zones):
                if region and not zone.startswith(region):
                    issues.append(smap.issue(loc + ("zones", z), f"zone {zone!r} is not in region {region!r}"))
        elif pool.cloud == "kubernetes" and clouds is not None and clouds.kubernetes is None:
            issues.append(smap.issue(loc + ("cloud",), "'kubernetes' is not configured under `clouds:`"))
        if pool.engine_command is not None and pool.cloud != "local":
            issues.append(
                smap.issue(
                    loc + ("engine_command",), f"only `local` pools run an engine command; this pool is {pool.cloud}"
                )
            )
    issues.extend(duplicate_names("deployments", deployments, smap))
    for i, dep in deployments:
        loc = ("deployments", i)
        if dep.max_replicas < dep.min_replicas:
            issues.append(
                smap.issue(loc + ("max_replicas",), f"{dep.max_replicas} is below min_replicas {dep.min_replicas}")
            )
        for j, ref in enumerate(dep.nodepools or []):
            if ref not in declared_pools:
                issues.append(
                    smap.issue(
                        loc + ("nodepools", j),
                        f"{ref!r} is not a declared nodepool; declared: {', '.join(sorted(declared_pools)) or 'none'}",
                    )
                )
        if dep.nodepools is not None and len(set(dep.nodepools)) != len(dep.nodepools):
            issues.append(smap.issue(loc + ("nodepools",), "lists a pool more than once"))
        auto = dep.autoscaling
        if auto is not None and auto.signal == "in_flight" and auto.target > dep.max_concurrent_requests:
            issues.append(
                smap.issue(
                    loc + ("autoscaling", "target"),
                    f"{auto.target:g} requests in flight per replica can never be reached: a replica runs at most "
                    f"max_concurrent_requests = {dep.max_concurrent_requests}",
                )
            )
        issues.extend(offload_issues(i, dep, smap))
    return issues


def offload_issues(i: int, dep: Deployment, smap: SourceMap) -> list[FleetIssue]:
    """The engine supports the declared KV offload backend, and the tier has a size it can use."""
    off = dep.kv_offload
    if off is None:
        return []
    loc = ("deployments", i, "kv_offload")
    backend = dep.offload_backend
    allowed = OFFLOAD_BACKENDS[dep.engine]
    if backend not in allowed:
        return [
            smap.issue(
                loc + ("backend",),
                f"{backend!r} is not a KV offload backend of {dep.engine}; allowed: {', '.join(allowed)}",
            )
        ]
    issues = []
    if off.disk_gib and backend not in _DISK_BACKENDS:
        issues.append(
            smap.issue(
                loc + ("disk_gib",),
                f"backend {backend!r} offloads to CPU memory only; a disk tier needs {' or '.join(_DISK_BACKENDS)}",
            )
        )
    if off.cpu_gib <= 0:
        # Every backend stages through host memory: native and hicache size their CPU pool from it.
        issues.append(smap.issue(loc + ("cpu_gib",), "must be above 0: every offload backend has a CPU tier"))
    return issues


def data_parallel_issues(deployments: list[Deployment], router: RouterSettings, smap: SourceMap) -> list[FleetIssue]:
    """vLLM with `--data-parallel-size N` binds every rank's KV-event sockets on the ports + rank:
    with precise mode on, the events and replay port ranges must not overlap."""
    ke = router.kv_events
    if not ke.enabled:
        return []
    issues = []
    replay = f"tcp://*:{ke.replay_port}" if ke.replay_port is not None else None
    for i, dep in enumerate(deployments):
        n = ranks.engine_data_parallel_size(dep.engine_args) if dep.engine == "vllm" else 1
        problem = ranks.port_collision(f"tcp://*:{ke.port}", replay, n) if n > 1 else None
        if problem:
            issues.append(
                smap.issue(
                    ("deployments", i, "engine_args"),
                    f"--data-parallel-size {n} with router.kv_events: {problem} "
                    f"(router.kv_events.port {ke.port}, replay_port {ke.replay_port})",
                )
            )
    return issues


def local_tokenizer_files(
    pools: list[Nodepool], router: RouterSettings, smap: SourceMap, base_dir: Path
) -> tuple[dict[str, str], list[FleetIssue]]:
    """Precise mode on a local fleet (every pool `cloud: local`): `router.kv_events.tokenizer` and
    `chat_template` are files of this machine, a relative path is the declaration's directory's.
    Returns the resolved paths (field -> absolute path) and a problem for each one missing. On a
    cluster the paths are the router container's, so nothing is checked here."""
    ke = router.kv_events
    if not ke.enabled or not pools or any(p.cloud != "local" for p in pools):
        return {}, []
    resolved: dict[str, str] = {}
    issues = []
    for name, value in (("tokenizer", ke.tokenizer), ("chat_template", ke.chat_template)):
        if value is None:
            continue
        path = (base_dir / Path(value).expanduser()).resolve()
        loc = ("router", "kv_events", name)
        if name == "tokenizer" and path.is_dir() and not (path / "tokenizer.json").is_file():
            issues.append(smap.issue(loc, f"{path} has no tokenizer.json (give the file or its directory)"))
        elif not path.exists():
            issues.append(smap.issue(loc, f"{path}: no such file (a relative path is the declaration's directory's)"))
        resolved[name] = str(path)
    return resolved, issues
