"""`CacheAwareRouter`: the router config rendered from the plan, the admin-token Secret made
from a Pulumi secret, and `gpufleet router serve` with its ServiceAccount and Service."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

import pulumi

from gpufleet.infra import manifests, names
from gpufleet.infra.plan import Plan
from gpufleet.infra.pulumi._kube import apply_object

__all__ = ["CacheAwareRouter", "CacheAwareRouterArgs"]


@dataclass
class CacheAwareRouterArgs:
    plan: Plan
    admin_token: pulumi.Input[str]
    options: manifests.ManifestOptions = field(default_factory=manifests.ManifestOptions)


class CacheAwareRouter(pulumi.ComponentResource):
    """The KV-cache-aware router in front of the fleet's replicas."""

    endpoint: pulumi.Output[str]
    config: pulumi.Output[dict[str, Any]]

    def __init__(self, name: str, args: CacheAwareRouterArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpufleet:router:CacheAwareRouter", name, None, opts)
        plan = args.plan
        child = pulumi.ResourceOptions(parent=self)
        cfg = manifests.router_config(plan, args.options)
        secret = apply_object(
            f"{name}-admin-token",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": manifests.admin_secret_name(plan),
                    "namespace": plan.namespace,
                    "labels": {"app.kubernetes.io/managed-by": "gpufleet", names.LABEL_FLEET: plan.fleet},
                },
                "type": "Opaque",
                # Output.secret keeps the token encrypted in the state and out of previews.
                "stringData": {
                    manifests.ADMIN_TOKEN_KEY: pulumi.Output.secret(args.admin_token),
                    # The routers' shared session-token key, derived from the admin token (one
                    # secret to manage; the admin token is the stronger credential anyway).
                    manifests.SESSION_KEY_KEY: pulumi.Output.secret(
                        pulumi.Output.from_input(args.admin_token).apply(_session_key)
                    ),
                },
            },
            child,
        )
        objs = manifests.router_objects(plan, args.options)
        resources: dict[str, pulumi.CustomResource] = {}
        for obj in objs:
            kind = obj["kind"].lower()
            deps = [secret, *resources.values()] if obj["kind"] == "Deployment" else []
            resources[kind + obj["metadata"]["name"]] = apply_object(
                f"{name}-{kind}", obj, pulumi.ResourceOptions(parent=self, depends_on=deps)
            )
        service = next(o for o in objs if o["kind"] == "Service")
        svc_res = resources["service" + service["metadata"]["name"]]
        in_cluster = f"http://{names.service_host(service['metadata']['name'], plan.namespace)}:{cfg.settings.port}"
        if args.options.router_service_type == "LoadBalancer":
            self.endpoint = svc_res.status.apply(lambda st: _lb_url(st, cfg.settings.port) or in_cluster)  # type: ignore[attr-defined]
        else:
            self.endpoint = pulumi.Output.from_input(in_cluster)
        self.config = pulumi.Output.from_input(cfg.model_dump(mode="json", by_alias=True))
        self.register_outputs({"endpoint": self.endpoint, "config": self.config})


def _session_key(admin_token: str) -> str:
    """The session-token signing key for the routers: HMAC-SHA256 of a fixed label under the admin token."""
    return hmac.new(admin_token.encode(), b"gpufleet-session-key/v1", hashlib.sha256).hexdigest()


def _lb_url(status: object, port: int) -> str | None:
    """The load balancer's address from a Service status, once the cloud has assigned one."""
    lb = getattr(status, "load_balancer", None)
    ingress = getattr(lb, "ingress", None) or []
    first = ingress[0] if ingress else None
    host = (getattr(first, "hostname", None) or getattr(first, "ip", None)) if first is not None else None
    return f"http://{host}:{port}" if host else None
