"""The stack program every stack in `stacks/` runs (`program()`, the whole of each `__main__.py`),
and the reading of a stack's `gpufleet:*` config and secrets into `FleetArgs` it starts with.

Keys (namespace `gpufleet`):

| key                  | meaning                                                               |
|----------------------|-----------------------------------------------------------------------|
| fleet                | the declaration inline (an object, same shape as fleet.yaml)          |
| fleetFile            | or a path to a fleet.yaml, relative to the stack directory            |
| adminToken (secret)  | the router's admin bearer token; becomes a Kubernetes Secret          |
| hfToken (secret)     | optional Hugging Face token for gated models (HF_TOKEN in replicas)   |
| hfTokenSecret        | the Secret (key `token`) engines read HF_TOKEN from: an existing one, |
|                      | or with hfToken the name of the one created (default <fleet>-hf-token) |
| modelCacheStorageClass | a PersistentVolumeClaim per replica of this class for /cache        |
| modelCacheSize       | size of each model-cache claim (default 200Gi)                        |
| modelCacheHostPath   | or keep the model cache in this node directory (default: emptyDir)    |
| routerImage          | router image (default: images/router, tagged with the version)        |
| routerReplicas       | router pods (default 2, with a PodDisruptionBudget and anti-affinity) |
| routerServiceType    | ClusterIP (default), LoadBalancer or NodePort                         |
| autoscalerNamespace  | where cluster-autoscaler reads its priority expander (kube-system)    |
| placeholderImage     | the pause image of warm-capacity placeholders                         |
| installDevicePlugin  | EKS: run NVIDIA's device plugin DaemonSet (default true)              |
| controller           | install the warm-capacity / failover controller (default true)        |
| controllerImage      | controller image (default: images/controller, same tag)               |
| controllerAwsRoleArn | IAM role for IRSA (controller on EKS): node-group scaling             |
| controllerGcpServiceAccount | Google SA for Workload Identity (controller on GKE)            |
| controllerProviderNames | object POOL -> node group / instance group name                    |
| controllerKubeconfigSecret | Secret (key `config`) with a kubeconfig for every cluster       |
| controllerKubeContexts | object CLOUD -> context in that kubeconfig                          |
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pulumi

from gpufleet.infra import manifests
from gpufleet.infra.pulumi.fleet import Fleet, FleetArgs

__all__ = ["NAMESPACE", "SERVICE_TYPES", "program", "read"]

NAMESPACE = "gpufleet"
SERVICE_TYPES = ("ClusterIP", "LoadBalancer", "NodePort")


def _str_map(cfg: pulumi.Config, key: str) -> dict[str, str]:
    """An optional config object of string -> string (e.g. POOL -> node group name)."""
    value = cfg.get_object(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()
    ):
        raise pulumi.RunError(f"gpufleet:{key}: expected an object of names to non-empty strings, got {value!r}")
    return dict(value)


# ManifestOptions field -> its stack config key.
_ENGINE_KEYS = {
    "hf_token_secret": "hfTokenSecret",
    "model_cache_storage_class": "modelCacheStorageClass",
    "model_cache_size": "modelCacheSize",
    "model_cache_host_path": "modelCacheHostPath",
}


def _engine_options(cfg: pulumi.Config, options: manifests.ManifestOptions) -> manifests.ManifestOptions:
    """The engines' HF token Secret and model cache, checked as `gpufleet render manifests` checks them."""
    values = {name: cfg.get(key) or None for name, key in _ENGINE_KEYS.items()}
    options = dataclasses.replace(
        options,
        hf_token_secret=values["hf_token_secret"],
        model_cache_storage_class=values["model_cache_storage_class"],
        model_cache_size=values["model_cache_size"] or options.model_cache_size,
        model_cache_host_path=values["model_cache_host_path"],
    )
    problems = manifests.engine_option_problems(options, lambda name: f"{NAMESPACE}:{_ENGINE_KEYS[name]}")
    if problems:
        raise pulumi.RunError("; ".join(problems))
    return options


def read(base_dir: str | Path | None = None) -> FleetArgs:
    """The `FleetArgs` of the current stack's config; a config mistake is a `pulumi.RunError`."""
    cfg = pulumi.Config(NAMESPACE)
    defaults = manifests.ManifestOptions()
    service_type = cfg.get("routerServiceType") or defaults.router_service_type
    if service_type not in SERVICE_TYPES:
        raise pulumi.RunError(
            f"gpufleet:routerServiceType: {service_type!r} is not allowed; expected one of {', '.join(SERVICE_TYPES)}"
        )
    replicas = cfg.get_int("routerReplicas")
    if replicas is not None and replicas < 1:
        raise pulumi.RunError(f"gpufleet:routerReplicas: {replicas} must be at least 1")
    options = manifests.ManifestOptions(
        router_image=cfg.get("routerImage") or defaults.router_image,
        router_replicas=replicas or defaults.router_replicas,
        router_service_type=service_type,
        autoscaler_namespace=cfg.get("autoscalerNamespace") or defaults.autoscaler_namespace,
        placeholder_image=cfg.get("placeholderImage") or defaults.placeholder_image,
        install_device_plugin=defaults.install_device_plugin
        if cfg.get_bool("installDevicePlugin") is None
        else bool(cfg.get_bool("installDevicePlugin")),
    )
    controller = cfg.get_bool("controller")
    options = dataclasses.replace(
        options,
        controller=defaults.controller if controller is None else bool(controller),
        controller_image=cfg.get("controllerImage") or defaults.controller_image,
        controller_aws_role_arn=cfg.get("controllerAwsRoleArn") or None,
        controller_gcp_service_account=cfg.get("controllerGcpServiceAccount") or None,
        controller_provider_names=_str_map(cfg, "controllerProviderNames"),
        controller_kubeconfig_secret=cfg.get("controllerKubeconfigSecret") or None,
        controller_kube_contexts=_str_map(cfg, "controllerKubeContexts"),
    )
    options = _engine_options(cfg, options)
    return FleetArgs(
        admin_token=cfg.require_secret("adminToken"),
        fleet=cfg.get_object("fleet"),
        fleet_file=cfg.get("fleetFile"),
        hf_token=cfg.get_secret("hfToken"),
        options=options,
        base_dir=Path(base_dir) if base_dir is not None else Path.cwd(),
    )


def program(base_dir: str | Path | None = None) -> Fleet:
    """A gpufleet stack: read the config and secrets, build the Fleet, export its outputs."""
    fleet = Fleet("gpufleet", read(base_dir))
    pulumi.export("router_endpoint", fleet.router_endpoint)
    pulumi.export("pools", fleet.pools)
    pulumi.export("cost", fleet.cost)
    pulumi.export("clusters", fleet.clusters)
    return fleet
