"""Kubernetes adapter over the kubernetes client: per-pool GPU use and placeholder scaling.

A pool's nodes carry the label `gpufleet.io/pool=<pool>`. Its placeholders are pods labelled
`app.kubernetes.io/component=placeholder` and `gpufleet.io/pool=<pool>`, owned by the
Deployment `warm-<pool>` in the fleet's namespace; each requests a whole node's GPUs, so one
placeholder holds one warm node. The labels and names come from `gpufleet.infra.names`, the
rules `gpufleet.infra.manifests` renders the placeholders with (for manifests and the Pulumi
components).

A serving pod that is Pending counts against the pool it was planned on: its
`gpufleet.io/pool` label (the plan's pool), else its nodeSelector, else the first pool of its
required node affinity.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from gpufleet.infra import names
from gpufleet.infra.names import GPU_RESOURCE, LABEL_COMPONENT, LABEL_POOL, PLACEHOLDER_COMPONENT
from gpufleet.provider_adapters import base, errors
from gpufleet.provider_adapters.base import PoolRef, PoolState, PoolUtilisation, ProviderAdapter, ReplicaSetState

__all__ = ["KubernetesAdapter"]


def _gpus(pod: Any) -> int:
    """GPUs a pod asks for: requests, else limits (the device plugin sets requests = limits)."""
    total = 0
    for container in pod.spec.containers or []:
        res = container.resources
        if res is None:
            continue
        value = (res.requests or {}).get(GPU_RESOURCE) or (res.limits or {}).get(GPU_RESOURCE) or 0
        total += int(value)
    return total


def _planned_pool(pod: Any) -> str | None:
    """The pool a pod was planned on (see module docstring)."""
    label = (pod.metadata.labels or {}).get(LABEL_POOL)
    if label:
        return str(label)
    selector = (pod.spec.node_selector or {}).get(LABEL_POOL)
    if selector:
        return str(selector)
    affinity = pod.spec.affinity.node_affinity if pod.spec.affinity else None
    required = affinity.required_during_scheduling_ignored_during_execution if affinity else None
    for term in (required.node_selector_terms or []) if required else []:
        for expr in term.match_expressions or []:
            if expr.key == LABEL_POOL and expr.operator == "In" and expr.values:
                return str(expr.values[0])
    return None


def _is_ready(node: Any) -> bool:
    conditions = node.status.conditions or [] if node.status else []
    ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
    return ready and not (node.spec and node.spec.unschedulable)


class KubernetesAdapter(ProviderAdapter):
    """kubernetes-client facade for one cluster.

    Pass an `api_client` (tests do); otherwise the in-cluster config is tried first (the
    controller runs as a pod) and then the kubeconfig (`kubeconfig`, `context`).
    """

    cloud: ClassVar[base.CloudName] = "kubernetes"

    def __init__(
        self,
        api_client: Any = None,
        *,
        namespace: str = "gpufleet-system",
        kubeconfig: str | None = None,
        context: str | None = None,
    ) -> None:
        k8s = base.lazy_import("kubernetes", cloud="kubernetes")
        if api_client is None:
            api_client = self._connect(k8s, kubeconfig, context)
        self._core = k8s.client.CoreV1Api(api_client)
        self._apps = k8s.client.AppsV1Api(api_client)
        self._discovery = k8s.client.DiscoveryV1Api(api_client)
        self._api_exception = k8s.client.exceptions.ApiException
        urllib3 = base.lazy_import("urllib3", cloud="kubernetes")  # the kubernetes client's transport
        self._connection_errors = (OSError, urllib3.exceptions.HTTPError)
        self.namespace = namespace

    @staticmethod
    def _connect(k8s: Any, kubeconfig: str | None, context: str | None) -> Any:
        """In-cluster config when running as a pod (and no kubeconfig/context was asked for), else kubeconfig."""
        if kubeconfig is None and context is None:
            try:
                k8s.config.load_incluster_config()
                return k8s.client.ApiClient()
            except k8s.config.ConfigException:
                pass
        try:
            return k8s.config.new_client_from_config(config_file=kubeconfig, context=context)
        except (k8s.config.ConfigException, OSError) as exc:
            raise errors.AdapterError(
                f"no usable Kubernetes config: {exc}", cloud="kubernetes", code="NoKubeconfig", blocks="cloud"
            ) from None

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Map ApiException (status + Status.reason) and connection failures to typed errors."""
        try:
            yield
        except self._api_exception as exc:
            reason, message = str(exc.reason or ""), str(exc.reason or "")
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                body = json.loads(exc.body or "{}")
                reason, message = body.get("reason") or reason, body.get("message") or message
            raise errors.map_error("kubernetes", reason, message, http_status=exc.status) from None
        except self._connection_errors as exc:
            raise errors.AdapterError(
                f"cannot reach the Kubernetes API: {exc}", cloud="kubernetes", code="Unreachable", blocks="cloud"
            ) from None

    # ------------------------------------------------------------------ reads

    def utilisation(self, pool: str) -> PoolUtilisation:
        """Nodes, GPUs (allocatable / used by serving pods / held by placeholders), pending GPU pods."""
        return self.utilisations([pool])[pool]

    def utilisations(self, pools: list[str]) -> dict[str, PoolUtilisation]:
        """`utilisation` of several pools from ONE node list and ONE pod list (a controller round)."""
        now = time.time()
        with self._errors():
            selector = f"{LABEL_POOL} in ({','.join(pools)})"
            nodes = self._core.list_node(label_selector=selector).items
            pods = self._core.list_pod_for_all_namespaces(
                field_selector="status.phase!=Succeeded,status.phase!=Failed"
            ).items
        pool_of_node = {n.metadata.name: (n.metadata.labels or {}).get(LABEL_POOL) for n in nodes}
        out = {}
        for pool in pools:
            mine = [n for n in nodes if pool_of_node[n.metadata.name] == pool]
            ready = [n for n in mine if _is_ready(n)]
            out[pool] = {
                "nodes": len(mine),
                "ready_nodes": len(ready),
                "gpus_allocatable": sum(int((n.status.allocatable or {}).get(GPU_RESOURCE, 0)) for n in ready),
                "gpus_requested": 0,
                "gpus_placeholder": 0,
                "pending_gpu_pods": 0,
                "pending_gpus": 0,
                "placeholders_running": 0,
            }
        for pod in pods:
            gpus = _gpus(pod)
            labels = pod.metadata.labels or {}
            on = pool_of_node.get(pod.spec.node_name or "")
            if labels.get(LABEL_COMPONENT) == PLACEHOLDER_COMPONENT:
                if on in out and labels.get(LABEL_POOL) == on and pod.status.phase == "Running":
                    out[on]["placeholders_running"] += 1
                    out[on]["gpus_placeholder"] += gpus
            elif on in out and gpus:
                out[on]["gpus_requested"] += gpus
            elif not pod.spec.node_name and gpus and _planned_pool(pod) in out:
                counts = out[_planned_pool(pod)]  # type: ignore[index]
                counts["pending_gpu_pods"] += 1
                counts["pending_gpus"] += gpus
        return {
            pool: PoolUtilisation(
                pool=pool, placeholders_desired=self.placeholder_count(pool), observed_at_s=now, **counts
            )
            for pool, counts in out.items()
        }

    def placeholder_count(self, pool: str) -> int | None:
        """Replicas of the pool's placeholder Deployment, or None when it does not exist."""
        try:
            with self._errors():
                scale = self._apps.read_namespaced_deployment_scale(names.placeholder_name(pool), self.namespace)
        except errors.NotFound:
            return None
        return int(scale.spec.replicas or 0)

    def pool_state(self, ref: PoolRef) -> PoolState:
        """Node counts as the cluster sees them; bounds belong to the cluster's autoscaler (None)."""
        with self._errors():
            nodes = self._core.list_node(label_selector=f"{LABEL_POOL}={ref.name}").items
        return PoolState(ref=ref, desired_nodes=len(nodes), ready_nodes=sum(1 for n in nodes if _is_ready(n)))

    def replica_set(self, name: str) -> ReplicaSetState | None:
        """A StatefulSet of replicas (`get`, so RBAC can name it) and its Pending pods; None if absent."""
        try:
            with self._errors():
                sts = self._apps.read_namespaced_stateful_set(name, self.namespace)
        except errors.NotFound:
            return None
        with self._errors():
            pods = self._core.list_namespaced_pod(self.namespace, field_selector="status.phase=Pending").items
        pending = tuple(
            sorted(
                p.metadata.name
                for p in pods
                if any(o.kind == "StatefulSet" and o.name == name for o in (p.metadata.owner_references or []))
            )
        )
        status = sts.status
        return ReplicaSetState(
            name=name,
            replicas=int(sts.spec.replicas or 0),
            ready=int((status.ready_replicas if status else 0) or 0),
            pending_pods=pending,
        )

    def service_endpoints(self, service: str, port_name: str) -> dict[str, tuple[str, int]]:
        """The ready endpoints of a Service in the namespace, from its EndpointSlices
        (`discovery.k8s.io/v1`, `list` by the `kubernetes.io/service-name` label): pod name (or
        address) -> (address, number of the port named `port_name`). An endpoint whose
        `conditions.ready` is unset counts as ready, as the API documents."""
        with self._errors():
            slices = self._discovery.list_namespaced_endpoint_slice(
                self.namespace, label_selector=f"kubernetes.io/service-name={service}"
            ).items
        out: dict[str, tuple[str, int]] = {}
        for sl in slices:
            port = next((p.port for p in sl.ports or () if p.name == port_name and p.port), None)
            if port is None:
                continue
            for ep in sl.endpoints or ():
                if not ep.addresses or (ep.conditions is not None and ep.conditions.ready is False):
                    continue
                name = ep.target_ref.name if ep.target_ref is not None and ep.target_ref.name else ep.addresses[0]
                out[name] = (ep.addresses[0], int(port))
        return out

    # ------------------------------------------------------------------ acts

    def scale_replica_set(self, name: str, replicas: int) -> None:
        """Set a StatefulSet's replicas through its `scale` subresource."""
        if replicas < 0:
            raise errors.InvalidRequest("replicas must be >= 0", cloud="kubernetes", code="Invalid")
        with self._errors():
            self._apps.patch_namespaced_stateful_set_scale(name, self.namespace, {"spec": {"replicas": replicas}})

    def scale_placeholders(self, pool: str, replicas: int) -> int:
        """Set the placeholder Deployment's replicas; returns the previous count."""
        if replicas < 0:
            raise errors.InvalidRequest("placeholder replicas must be >= 0", cloud="kubernetes", code="Invalid")
        previous = self.placeholder_count(pool)
        if previous is None:
            raise errors.NotFound(
                f"placeholder Deployment {self.namespace}/{names.placeholder_name(pool)} does not exist",
                cloud="kubernetes",
                code="NotFound",
            )
        with self._errors():
            self._apps.patch_namespaced_deployment_scale(
                names.placeholder_name(pool), self.namespace, {"spec": {"replicas": replicas}}
            )
        return previous
