"""The fleet declaration: pydantic models, a line-aware YAML loader and whole-file validation.

`load_file(path)` and `load_dict(data, origin)` return a `Fleet` whose cross-references
and catalog facts have been checked, or raise `FleetError` listing every problem of the
declaration at once, each with the file, the line and the field:

    fleet.yaml:23: nodepools[1].max_nodes: 2 is below min_nodes 3

Checks that need the catalog or the placement (weights fit the GPUs, min_replicas fit the
pools) run in `infra.plan.compile_fleet`, which reports through the same `FleetError`.

Here: the models (the `router:` section is `gpufleet.router.config.RouterSettings`) and the
loading, which maps pydantic's errors to file:line:field (`_pydantic_issue`, `_allowed_fields`).
`issues` holds the error types and the source map, `checks` the cross-field checks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gpufleet.infra.spec import checks
from gpufleet.infra.spec.issues import FleetError, FleetIssue, SourceMap, field_path
from gpufleet.router.config import RouterSettings

__all__ = [
    "AUTOSCALING_SIGNALS",
    "DEFAULT_IN_FLIGHT_SHARE",
    "Autoscaling",
    "AwsCloud",
    "Clouds",
    "Deployment",
    "Fleet",
    "FleetError",
    "FleetIssue",
    "GcpCloud",
    "Karpenter",
    "KubernetesCloud",
    "KvOffload",
    "LocalCloud",
    "Nodepool",
    "SourceMap",
    "Taint",
    "default_autoscaling",
    "load_dict",
    "load_file",
    "load_text",
]

CloudName = Literal["aws", "gcp", "kubernetes", "local"]
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_HINT = "lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters"

DEFAULT_IMAGES = {
    "vllm": "vllm/vllm-openai:v0.11.0",
    "sglang": "lmsysorg/sglang:v0.5.4",
}


# ---------------------------------------------------------------------------------------
# Models


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


WarmCapacityMode = Literal["placeholders", "capacity_buffer"]
_WARM_CAPACITY_HELP = (
    "how declared warm nodes are held: placeholders (pause pods with a negative PriorityClass) or "
    "capacity_buffer (autoscaling.x-k8s.io CapacityBuffer objects, for autoscalers that implement them)"
)


class Karpenter(_Strict):
    """The cluster provisions nodes with Karpenter: one karpenter.sh/v1 NodePool per gpufleet pool."""

    node_class: str = Field("default", description="the NodeClass every NodePool references")
    node_class_kind: str = "EC2NodeClass"
    node_class_group: str = "karpenter.k8s.aws"
    consolidate_after: str = Field("10m", pattern=r"^(([0-9]+(s|m|h))+|Never)$")


class AwsCloud(_Strict):
    region: str
    cluster: str = Field(description="EKS cluster name (existing, or created when create_cluster)")
    create_cluster: bool = False
    subnet_ids: list[str] = []
    node_role_arn: str | None = Field(None, description="IAM role for node groups; created when omitted")
    kubernetes_version: str | None = None
    warm_capacity: WarmCapacityMode = Field("placeholders", description=_WARM_CAPACITY_HELP)
    karpenter: Karpenter | None = Field(None, description="render Karpenter NodePools, weight from pool priority")


class GcpCloud(_Strict):
    project: str
    region: str
    cluster: str = Field(description="GKE cluster name (existing, or created when create_cluster)")
    create_cluster: bool = False
    network: str | None = None
    service_account: str | None = None
    warm_capacity: WarmCapacityMode = Field("placeholders", description=_WARM_CAPACITY_HELP)


class KubernetesCloud(_Strict):
    context: str | None = Field(None, description="kubeconfig context of the existing cluster")
    kubeconfig: str | None = Field(None, description="path to a kubeconfig; default: the usual lookup")
    warm_capacity: WarmCapacityMode = Field("placeholders", description=_WARM_CAPACITY_HELP)
    karpenter: Karpenter | None = Field(None, description="render Karpenter NodePools, weight from pool priority")


class LocalCloud(_Strict):
    host: Literal["127.0.0.1", "localhost", "::1"] = "127.0.0.1"
    base_port: int = Field(0, ge=0, le=65535, description="first port for replicas; 0 picks free ports")


class Clouds(_Strict):
    aws: AwsCloud | None = None
    gcp: GcpCloud | None = None
    kubernetes: KubernetesCloud | None = None
    local: LocalCloud | None = None


class Taint(_Strict):
    key: str
    value: str = ""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"


def _dns_label(value: str) -> str:
    if not _DNS_LABEL.match(value):
        raise ValueError(f"{value!r} is not a valid name: use {_DNS_HINT}")
    return value


class Nodepool(_Strict):
    name: str
    cloud: CloudName
    region: str | None = Field(None, description="default: the cloud's region")
    zones: list[str] = []
    instance_type: str = Field(description="AWS instance type, GCP machine type, or for local a catalog machine")
    gpus_per_node: int | None = Field(None, ge=1, description="default: from the catalog")
    gpu: str | None = Field(None, description="GPU model; default: from the catalog")
    capacity_type: Literal["on_demand", "spot"] = "on_demand"
    priority: int = 0
    min_nodes: int = Field(0, ge=0)
    max_nodes: int = Field(ge=1)
    warm_nodes: int = Field(0, ge=0)
    usd_per_node_hour: float | None = Field(None, ge=0, description="override the catalog price")
    labels: dict[str, str] = {}
    taints: list[Taint] = []
    engine_command: list[str] | None = Field(
        None, description="local only: run this engine command instead of a simulated replica"
    )

    _name = field_validator("name")(_dns_label)


AUTOSCALING_SIGNALS = ("in_flight", "queued_prefill_tokens", "ttft_p90_s")
"""The load signals a deployment may scale on (the router's, per replica or over a window)."""


class Autoscaling(_Strict):
    """How a deployment scales between min_replicas and max_replicas (`infra.controller.autoscale`)."""

    signal: Literal["in_flight", "queued_prefill_tokens", "ttft_p90_s"] = Field(
        description="in_flight: requests in flight per replica; queued_prefill_tokens: prompt tokens "
        "waiting for prefill per replica; ttft_p90_s: the deployment's p90 time to first token"
    )
    target: float = Field(gt=0, description="the signal's value per replica (seconds for ttft_p90_s) to hold")
    scale_up_delay_s: float = Field(30.0, ge=0, description="the signal must ask for more replicas this long")
    scale_down_delay_s: float = Field(300.0, ge=0, description="the signal must ask for fewer replicas this long")
    tolerance: float = Field(0.1, ge=0, lt=1, description="no change while signal / target is within 1 +- tolerance")
    pending_timeout_s: float = Field(
        300.0, gt=0, description="a replica Pending longer than this marks its pool full: scale-up moves on"
    )


DEFAULT_IN_FLIGHT_SHARE = 0.8
"""A deployment that may grow (max_replicas > min_replicas) and declares no `autoscaling:` scales
on `in_flight` with this share of `max_concurrent_requests` per replica as its target (HPA's
default target is 80 % CPU utilization)."""


def default_autoscaling(max_concurrent_requests: int) -> Autoscaling:
    """The autoscaling of a deployment that declares none but may grow (`DEFAULT_IN_FLIGHT_SHARE`)."""
    target = max(1, int(max_concurrent_requests * DEFAULT_IN_FLIGHT_SHARE))
    return Autoscaling(signal="in_flight", target=target)


class KvOffload(_Strict):
    """A second (CPU) and third (local disk) KV-cache tier per replica (docs/fleet-reference.md)."""

    cpu_gib: float = Field(0, ge=0, description="host-memory KV tier per replica, GiB (all its GPUs together)")
    disk_gib: float = Field(0, ge=0, description="local-disk KV tier per replica, GiB (lmcache, hicache)")
    backend: Literal["native", "lmcache", "hicache"] | None = Field(
        None, description="vLLM: native (default) or lmcache; SGLang: hicache (default)"
    )


class Deployment(_Strict):
    name: str
    model: str
    engine: Literal["vllm", "sglang"] = "vllm"
    image: str | None = Field(None, description="default: the engine's pinned image")
    gpus_per_replica: int = Field(1, ge=1)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(ge=1)
    max_model_len: int | None = Field(None, ge=16, description="default: the model's context, within KV capacity")
    nodepools: list[str] | None = Field(None, description="default: every pool a replica fits, by priority")
    engine_args: list[str] = []
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_concurrent_requests: int = Field(256, ge=1, description="engine's --max-num-seqs / --max-running-requests")
    port: int = Field(8000, ge=1, le=65535)
    kv_offload: KvOffload | None = Field(None, description="CPU (and disk) KV tiers; default: GPU only")
    autoscaling: Autoscaling | None = Field(
        None,
        description="none: with max_replicas > min_replicas, in_flight at 80% of max_concurrent_requests "
        "per replica (`resolved_autoscaling`); with max_replicas = min_replicas it stays there",
    )

    _name = field_validator("name")(_dns_label)

    @property
    def offload_backend(self) -> str | None:
        """The KV offload backend in effect, None without a tier."""
        if self.kv_offload is None:
            return None
        return self.kv_offload.backend or ("native" if self.engine == "vllm" else "hicache")

    @property
    def resolved_autoscaling(self) -> Autoscaling | None:
        """The autoscaling in effect: the declared one, else the default when the deployment may
        grow (max_replicas > min_replicas), else none (it stays at min_replicas)."""
        if self.autoscaling is not None:
            return self.autoscaling
        if self.max_replicas > self.min_replicas:
            return default_autoscaling(self.max_concurrent_requests)
        return None

    @property
    def resolved_image(self) -> str:
        return self.image or DEFAULT_IMAGES[self.engine]


class Fleet(_Strict):
    fleet: str
    namespace: str = Field("gpufleet", description="Kubernetes namespace for the fleet's workloads")
    catalog: list[str] = Field([], description="user catalog files, relative to the declaration")
    clouds: Clouds = Clouds()
    nodepools: list[Nodepool] = Field(min_length=1)
    deployments: list[Deployment] = Field(min_length=1)
    router: RouterSettings = Field(default_factory=RouterSettings)

    _fleet = field_validator("fleet", "namespace")(_dns_label)


# ---------------------------------------------------------------------------------------
# Loading


def _compose_lines(text: str, origin: str) -> tuple[Any, SourceMap, list[FleetIssue]]:
    """Parse YAML keeping, for every value, the line it stands on."""
    smap = SourceMap(origin)
    issues: list[FleetIssue] = []
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise FleetError([FleetIssue(origin, line, "", f"not valid YAML: {problem}")]) from None

    def walk(node: yaml.Node, loc: tuple[Any, ...]) -> None:
        smap.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key == "<<":
                    continue
                line = key_node.start_mark.line + 1
                if key in seen:
                    issues.append(
                        FleetIssue(origin, line, field_path(loc + (key,)), f"duplicate key (first at line {seen[key]})")
                    )
                seen[key] = line
                smap.lines.setdefault(loc + (key,), line)
                walk(value_node, loc + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, loc + (i,))

    if root is not None:
        walk(root, ())
    return data, smap, issues


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _allowed_fields(loc: Sequence[Any]) -> list[str] | None:
    """The field names allowed at the mapping that contains `loc`'s last part."""
    model: Any = Fleet
    keyed = False
    for part in loc[:-1]:
        if isinstance(part, int) or keyed:
            keyed = False  # a list index, or a key of a mapping of models (router.profiles.NAME)
            continue
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            return None
        ann = info.annotation
        keyed = getattr(ann, "__origin__", None) is dict
        model = None
        for candidate in (ann, *getattr(ann, "__args__", ())):
            for inner in (candidate, *getattr(candidate, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    model = inner
        if model is None:
            return None
    return sorted(getattr(model, "model_fields", {}))


def _pydantic_issue(err: Mapping[str, Any], smap: SourceMap) -> FleetIssue:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    kind = err["type"]
    found = err.get("input")
    if kind == "missing":
        msg = "is required but missing"
    elif kind == "extra_forbidden":
        allowed = _allowed_fields(loc)
        msg = "unknown field" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    elif kind == "literal_error":
        msg = f"{_describe(found)} is not allowed; expected {err['ctx']['expected']}"
    elif kind in ("value_error", "assertion_error"):
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
    else:
        msg = f"{err['msg'][0].lower()}{err['msg'][1:]} (found {_describe(found)})"
    return smap.issue(loc, msg)


def load_text(text: str, origin: str = "fleet.yaml", base_dir: Path | None = None) -> tuple[Fleet, SourceMap]:
    """Parse and validate a declaration given as YAML text."""
    data, smap, issues = _compose_lines(text, origin)
    return _validate(data, smap, issues, base_dir)


def load_file(path: str | Path) -> tuple[Fleet, SourceMap]:
    """Parse and validate a declaration file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise FleetError([FleetIssue(str(path), None, "", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise FleetError([FleetIssue(str(path), None, "", "not a UTF-8 text file")]) from None
    return load_text(text, str(path), path.parent)


def load_dict(data: Any, origin: str = "<config>", base_dir: Path | None = None) -> tuple[Fleet, SourceMap]:
    """Validate a declaration given as plain data (e.g. Pulumi stack config `gpufleet:fleet`)."""
    return _validate(data, SourceMap(origin), [], base_dir)


def _validate(data: Any, smap: SourceMap, issues: list[FleetIssue], base_dir: Path | None) -> tuple[Fleet, SourceMap]:
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise FleetError(
            [
                *issues,
                FleetIssue(
                    smap.file,
                    smap.line(()) or 1,
                    "",
                    f"expected a mapping with `fleet`, `nodepools`, `deployments`; found {kind}",
                ),
            ]
        )
    try:
        fleet = Fleet.model_validate(data)
    except ValidationError as exc:
        issues.extend(_pydantic_issue(e, smap) for e in exc.errors(include_url=False))
        # Report the cross-field problems of the parts that did parse too: all at once.
        raw_pools = data.get("nodepools")
        names = [p.get("name") for p in raw_pools if isinstance(p, dict)] if isinstance(raw_pools, list) else []
        issues.extend(checks.cross_check(*_parse_parts(data), smap, {n for n in names if isinstance(n, str)}))
        raise FleetError(sorted(issues, key=lambda i: (i.line or 0, i.field))) from None
    issues.extend(
        checks.cross_check(list(enumerate(fleet.nodepools)), list(enumerate(fleet.deployments)), fleet.clouds, smap)
    )
    issues.extend(checks.data_parallel_issues(fleet.deployments, fleet.router, smap))
    kv_files, kv_issues = checks.local_tokenizer_files(fleet.nodepools, fleet.router, smap, base_dir or Path.cwd())
    issues.extend(kv_issues)
    if issues:
        raise FleetError(sorted(issues, key=lambda i: (i.line or 0, i.field)))
    if base_dir is not None and fleet.catalog:
        fleet = fleet.model_copy(update={"catalog": [str((base_dir / p).resolve()) for p in fleet.catalog]})
    if kv_files:  # the local runtime's processes run elsewhere than here: absolute paths
        kv = fleet.router.kv_events.model_copy(update=kv_files)
        fleet = fleet.model_copy(update={"router": fleet.router.model_copy(update={"kv_events": kv})})
    return fleet, smap


def _parse_parts(
    data: dict[str, Any],
) -> tuple[list[tuple[int, Nodepool]], list[tuple[int, Deployment]], Clouds | None]:
    """The pools, deployments and clouds that validate on their own, with their indexes."""

    def parts(key: str, model: type[BaseModel]) -> list[tuple[int, Any]]:
        items = data.get(key)
        out = []
        for i, item in enumerate(items if isinstance(items, list) else []):
            if not isinstance(item, dict):
                continue
            # The fields that fail are reported already: drop them and check the rest.
            item = {k: v for k, v in item.items() if k in model.model_fields}
            for _ in range(len(item) + 1):
                try:
                    out.append((i, model.model_validate(item)))
                    break
                except ValidationError as exc:
                    bad = {e["loc"][0] for e in exc.errors() if e["loc"] and e["loc"][0] in item}
                    if not bad:
                        break
                    item = {k: v for k, v in item.items() if k not in bad}
        return out

    try:
        clouds: Clouds | None = Clouds.model_validate(data.get("clouds") or {})
    except ValidationError:
        clouds = None
    return parts("nodepools", Nodepool), parts("deployments", Deployment), clouds
