"""`gpufleet init`: a fleet for one model that works at once, chosen from the catalog.

`choose(...)` is pure: every machine type of the allowed clouds (and each way of splitting its
GPUs into replicas) is an *offer*; an offer fits when one replica's GPUs hold the weights plus a
KV cache of `KV_HEADROOM` x the context (so full-context requests can run side by side, not one
at a time). The fitting offer with the cheapest node (the baseline is one replica) becomes the
preferred pool; the fallback pool is the cheapest other offer with the same GPUs per replica, preferring another cloud (when
the cloud was not fixed), then another GPU, then spot capacity of the same machine. `render`
turns the choice into the files: fleet.yaml and a Pulumi stack directory running the shared
stack program (`gpufleet.infra.pulumi.stack_config.program()`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

from gpufleet.infra import catalog as catalog_mod

__all__ = ["CLOUDS", "KV_HEADROOM", "Choice", "InitError", "Offer", "choose", "fleet_name", "offers", "render"]

CLOUDS = ("aws", "gcp", "kubernetes", "local")
KV_HEADROOM = 2.0  # KV cache per replica, in full-context sequences
GPU_MEMORY_UTILIZATION = 0.9  # the deployment default (spec.Deployment.gpu_memory_utilization)
REFERENCE_REGION = {"aws": "us-east-1", "gcp": "us-central1"}
MAX_NODES = 2  # per pool: room to grow and to fail over; edit freely


class InitError(Exception):
    """The scaffold cannot be made as asked (unknown model or GPU, nothing fits): one clear line."""


@dataclass(frozen=True)
class Offer:
    """One way to run replicas of the model: a machine type split into replicas of `gpus_per_replica`."""

    cloud: str  # the catalog cloud the price comes from (aws, gcp)
    machine: catalog_mod.MachineType
    gpus_per_replica: int
    kv_tokens: int  # KV-cache tokens of one replica
    capacity_type: str = "on_demand"

    @property
    def replicas_per_node(self) -> int:
        return self.machine.gpus // self.gpus_per_replica

    @property
    def node_usd_per_hour(self) -> float:
        m = self.machine
        if self.capacity_type == "spot":
            return m.spot_usd_per_hour if m.spot_usd_per_hour is not None else m.usd_per_hour
        return m.usd_per_hour

    @property
    def usd_per_replica_hour(self) -> float:
        return self.node_usd_per_hour / self.replicas_per_node

    def label(self) -> str:
        spot = " spot" if self.capacity_type == "spot" else ""
        return f"{self.machine.cloud} {self.machine.name}{spot} ({self.machine.gpus} x {self.machine.gpu})"


@dataclass(frozen=True)
class Choice:
    """What `init` picked and why."""

    model: catalog_mod.ModelInfo
    cloud: str  # the fleet's target: aws, gcp, kubernetes, local (or "aws+gcp" when both are used)
    max_model_len: int
    primary: Offer
    fallback: Offer
    considered: list[Offer] = field(default_factory=list)  # every fitting offer, cheapest first
    reasons: list[str] = field(default_factory=list)

    @property
    def pool_cloud(self) -> dict[str, str]:
        return {"primary": self._pool_cloud(self.primary), "fallback": self._pool_cloud(self.fallback)}

    def _pool_cloud(self, offer: Offer) -> str:
        return self.cloud if self.cloud in ("kubernetes", "local") else offer.machine.cloud


def fleet_name(model: str) -> str:
    """A DNS-label fleet name from a model id (`Qwen/Qwen3-8B` -> `qwen3-8b`)."""
    base = model.rsplit("/", 1)[-1].lower()
    base = re.sub(r"[^a-z0-9-]+", "-", base).strip("-")[:50].strip("-")
    return base or "fleet"


def _kv_tokens(model: catalog_mod.ModelInfo, gpu: catalog_mod.GpuModel, gpus: int) -> int:
    usable = gpus * gpu.memory_bytes * GPU_MEMORY_UTILIZATION
    return int((usable - model.weight_bytes) // model.kv_bytes_per_token)


def offers(
    catalog: catalog_mod.Catalog,
    model: catalog_mod.ModelInfo,
    clouds: tuple[str, ...],
    max_model_len: int,
    gpus_per_replica: int | None = None,
) -> list[Offer]:
    """Every fitting on-demand offer of `clouds`' machine types, cheapest node first.

    Each machine is split into replicas of the fewest GPUs that fit, or of exactly
    `gpus_per_replica` when given (a deployment has one size of replica on all its pools).
    """
    need = int(KV_HEADROOM * max_model_len)
    found: list[Offer] = []
    for (cloud, _), machine in sorted(catalog.machines.items()):
        if cloud not in clouds:
            continue
        gpu = catalog.gpu(machine.gpu)
        if gpu is None:
            continue
        for gpr in (1, 2, 4, 8) if gpus_per_replica is None else (gpus_per_replica,):
            if gpr > machine.gpus or machine.gpus % gpr:
                continue
            kv = _kv_tokens(model, gpu, gpr)
            if kv >= need:
                found.append(Offer(cloud, machine, gpr, kv))
                break
    return sorted(found, key=_rank)


def _rank(o: Offer) -> tuple[float, float, int, str]:
    # min_replicas is 1, so the baseline is one node: its price first, then the price per replica
    # when the deployment grows (an 8-GPU node is cheap per replica but dear for the first one).
    return (round(o.node_usd_per_hour, 6), round(o.usd_per_replica_hour, 6), o.gpus_per_replica, o.machine.name)


def _needs_message(model_name: str, catalog: catalog_mod.Catalog) -> str:
    known = ", ".join(sorted(catalog.models))
    return (
        f"model {model_name!r} is not in the catalog (known: {known}). `init` needs its weights size and KV "
        f"bytes per token: give --catalog FILE with a `models:` entry, e.g.\n"
        f"  models:\n    {model_name}: {{params_b: 8.0, layers: 32, kv_heads: 8, head_dim: 128, max_context: 32768}}\n"
        f"(params_b: parameters in billions, for the weights; layers x kv_heads x head_dim: the KV bytes per token; "
        f"from the model's config.json)"
    )


def choose(
    catalog: catalog_mod.Catalog,
    model_name: str,
    *,
    gpu: str | None = None,
    cloud: str | None = None,
    max_model_len: int | None = None,
) -> Choice:
    """Pick the preferred and the fallback pool for `model_name`; `InitError` says what is missing."""
    model = catalog.model(model_name)
    if model is None:
        raise InitError(_needs_message(model_name, catalog))
    if cloud is not None and cloud not in CLOUDS:
        raise InitError(f"--cloud {cloud!r} is not allowed; choose one of {', '.join(CLOUDS)}")
    if max_model_len is not None and not 16 <= max_model_len <= model.max_context:
        raise InitError(
            f"--max-model-len {max_model_len}: must be between 16 and {model_name}'s context {model.max_context}"
        )
    context = max_model_len or model.max_context
    # kubernetes and local pools name any catalog machine (the nodes' type, the simulated GPU).
    price_clouds = ("aws", "gcp") if cloud in (None, "kubernetes", "local") else (cloud,)
    everything = offers(catalog, model, price_clouds, context)
    gpu_key = None
    if gpu is not None:
        names = {g.lower(): g for g in catalog.gpus}
        gpu_key = names.get(gpu.lower())
        if gpu_key is None:
            raise InitError(f"--gpu {gpu!r} is not in the catalog; GPUs: {', '.join(sorted(catalog.gpus))}")
    pool = [o for o in everything if gpu_key is None or o.machine.gpu == gpu_key]
    if not pool:
        gib = model.weight_bytes / catalog_mod.GIB
        kv_gib = KV_HEADROOM * context * model.kv_bytes_per_token / catalog_mod.GIB
        what = (
            f"{gpu_key} machines of {', '.join(price_clouds)}" if gpu_key else f"machines of {', '.join(price_clouds)}"
        )
        hint = " (try without --gpu, or a smaller --max-model-len)" if gpu_key else " (try a smaller --max-model-len)"
        raise InitError(
            f"no {what} fit {model_name}: a replica needs {gib:.1f} GiB of weights + {kv_gib:.1f} GiB of KV cache "
            f"({KV_HEADROOM:g} x {context} tokens at {model.kv_bytes_per_token} bytes) at gpu_memory_utilization "
            f"{GPU_MEMORY_UTILIZATION}{hint}"
        )
    primary = pool[0]
    reasons = [
        f"{primary.label()}: the cheapest node{' with ' + gpu_key if gpu_key else ''} that fits, "
        f"${primary.node_usd_per_hour:.3f}/h ({_count(primary.gpus_per_replica, 'GPU')} per replica, "
        f"{_count(primary.replicas_per_node, 'replica')} per node); a replica's KV cache holds {primary.kv_tokens} tokens, "
        f"{primary.kv_tokens / context:.1f} x the {context}-token context"
    ]
    same_size = offers(catalog, model, price_clouds, context, primary.gpus_per_replica)
    same_size = [o for o in same_size if o.machine != primary.machine]
    fallback, why = _fallback(primary, same_size, cloud)
    reasons.append(
        f"{fallback.label()}: the fallback pool ({why}), ${fallback.node_usd_per_hour:.3f}/h per node"
        + (", one held warm" if fallback.capacity_type != "spot" else "; one node of the first pool held warm")
    )
    target = cloud or (primary.machine.cloud if fallback.machine.cloud == primary.machine.cloud else "aws+gcp")
    return Choice(model, target, context, primary, fallback, pool, reasons)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _fallback(primary: Offer, candidates: list[Offer], cloud: str | None) -> tuple[Offer, str]:
    """The fallback offer: another cloud, else another GPU, else the same machine on spot."""

    def cheapest_node(xs: list[Offer]) -> Offer:
        # a warm fallback node is paid all the time: rank by node price, then per replica
        return min(xs, key=lambda o: (o.node_usd_per_hour, o.usd_per_replica_hour, o.machine.name))

    other_cloud = [o for o in candidates if o.machine.cloud != primary.machine.cloud]
    if cloud is None and other_cloud:
        return cheapest_node(other_cloud), "another cloud: survives an outage or a capacity shortage of the first"
    # kubernetes and local pools may name any catalog machine; aws and gcp pools their own cloud's
    anywhere = cloud in ("kubernetes", "local")
    other_gpu = [
        o
        for o in candidates
        if (anywhere or o.machine.cloud == primary.machine.cloud) and o.machine.gpu != primary.machine.gpu
    ]
    where = cloud if anywhere else primary.machine.cloud
    if other_gpu:
        why = f"another GPU on {where}: a shortage of one GPU type leaves the other"
        return cheapest_node(other_gpu), why
    if cloud == "local":
        return primary, "the same machine: no other GPU fits"
    spot = Offer(primary.cloud, primary.machine, primary.gpus_per_replica, primary.kv_tokens, "spot")
    return spot, "the same machine on spot capacity: no other GPU of this cloud fits"


def _pool_name(offer: Offer, cloud: str) -> str:
    gpu = re.sub(r"[^a-z0-9]+", "-", offer.machine.gpu.lower()).strip("-")
    spot = "-spot" if offer.capacity_type == "spot" else ""
    return f"{cloud}-{gpu}{spot}"[:63]


def render(choice: Choice, name: str, *, catalog_files: list[str] | None = None) -> dict[str, str]:
    """The files of the scaffold, by path relative to the output directory."""
    clouds_used = choice.pool_cloud
    primary_name = _pool_name(choice.primary, clouds_used["primary"])
    fallback_name = _pool_name(choice.fallback, clouds_used["fallback"])
    if fallback_name == primary_name:
        fallback_name = (fallback_name[:60] + "-2").strip("-")
    clouds: dict[str, object] = {}
    for c in sorted(set(clouds_used.values())):
        if c == "aws":
            clouds["aws"] = {"region": REFERENCE_REGION["aws"], "cluster": f"{name}-eks"}
        elif c == "gcp":
            clouds["gcp"] = {"project": "my-gcp-project", "region": REFERENCE_REGION["gcp"], "cluster": f"{name}-gke"}
        elif c == "kubernetes":
            clouds["kubernetes"] = {"context": None}
        else:
            clouds["local"] = {"host": "127.0.0.1"}

    def pool(offer: Offer, pool_name: str, cloud: str, priority: int, min_nodes: int, warm: int) -> dict[str, object]:
        p: dict[str, object] = {"name": pool_name, "cloud": cloud}
        if cloud in ("aws", "gcp"):
            region = REFERENCE_REGION[cloud]
            p["region"] = (
                region if region in offer.machine.regions or not offer.machine.regions else offer.machine.regions[0]
            )
        p["instance_type"] = offer.machine.name
        if offer.capacity_type == "spot":
            p["capacity_type"] = "spot"
        p.update(priority=priority, min_nodes=min_nodes, max_nodes=MAX_NODES, warm_nodes=warm)
        return p

    primary = choice.primary
    fallback = choice.fallback
    per_node = {primary_name: primary.replicas_per_node, fallback_name: fallback.replicas_per_node}
    fleet: dict[str, object] = {"fleet": name}
    if catalog_files:
        fleet["catalog"] = list(catalog_files)
    fleet["clouds"] = {
        k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v) for k, v in clouds.items()
    }
    # The fallback pool holds one node warm, so losing the preferred pool spills at once; spot
    # capacity can be reclaimed just when it is needed, so a spot fallback leaves warmth to the first.
    warm_first = 1 if fallback.capacity_type == "spot" else 0
    fleet["nodepools"] = [
        pool(primary, primary_name, clouds_used["primary"], 100, 1, warm_first),
        pool(fallback, fallback_name, clouds_used["fallback"], 50, 0, 1 - warm_first),
    ]
    fleet["deployments"] = [
        {
            "name": name,
            "model": choice.model.name,
            "engine": "vllm",
            "gpus_per_replica": primary.gpus_per_replica,
            "min_replicas": 1,
            "max_replicas": MAX_NODES * (per_node[primary_name] + per_node[fallback_name]),
            "max_model_len": choice.max_model_len,
            "nodepools": [primary_name, fallback_name],
        }
    ]
    fleet["router"] = {"policy": "cache_aware", "prediction_cache": {"enabled": True, "ttl_s": 300}}
    header = [f"# Written by `gpufleet init --model {choice.model.name}`: edit freely, then `gpufleet plan` it."]
    header += [f"# - {r}" for r in choice.reasons]
    if "gcp" in clouds:
        header.append("# Set clouds.gcp.project (and the cluster names) to yours before `pulumi up`.")
    elif "aws" in clouds:
        header.append("# Set clouds.aws.cluster to your EKS cluster (or add create_cluster: true) before `pulumi up`.")
    files = {"fleet.yaml": "\n".join(header) + "\n" + yaml.safe_dump(fleet, sort_keys=False, width=120)}
    if set(clouds_used.values()) != {"local"}:
        files.update(_stack_files(name, choice))
    return files


def _stack_files(stack: str, choice: Choice) -> dict[str, str]:
    project = (
        "# A gpufleet stack written by `gpufleet init`. The project is named `gpufleet` so its config keys\n"
        "# are `gpufleet:*`. Pulumi runs __main__.py with the Python on PATH: install gpufleet[pulumi] there\n"
        "# (or add `virtualenv: venv` under options and `pip install -r requirements.txt` into it).\n"
        "name: gpufleet\n"
        f'description: "gpufleet serving {choice.model.name}"\n'
        "runtime:\n  name: python\n  options:\n    toolchain: pip\n"
        "config:\n  adminToken:\n    type: string\n    secret: true\n"
        "    description: bearer token of the router's admin endpoints (pulumi config set --secret adminToken ...)\n"
    )
    settings = (
        f"# Stack `{stack}`: the declaration lives in fleet.yaml next to this file.\n"
        '# Set the router\'s admin token once: pulumi config set --secret adminToken "$(openssl rand -hex 32)"\n'
        "config:\n  gpufleet:fleetFile: fleet.yaml\n  gpufleet:routerServiceType: ClusterIP\n"
    )
    main = (
        '"""A gpufleet stack: everything comes from the one declaration (fleet.yaml)."""\n\n'
        "from gpufleet.infra.pulumi import stack_config\n\nstack_config.program()\n"
    )
    return {
        "Pulumi.yaml": project,
        f"Pulumi.{stack}.yaml": settings,
        "__main__.py": main,
        "requirements.txt": "gpufleet[pulumi]\n",
    }
