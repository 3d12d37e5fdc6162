"""Kubernetes discovery: the ready endpoints of the fleet's (deployment, pool) Services join the router.

The router watches `discovery.k8s.io/v1` EndpointSlices in one namespace through the official
kubernetes client, selected by `discovery.kubernetes.label_selector`:

    list (resourceVersion R)  ->  watch from R  ->  ... watch from the last version seen
          ^                            |
          +---- 410 Gone: re-list -----+     any other error: back off (doubling, capped), watch again

Each slice carries its Service's labels. The deployment and pool labels (`infra/names.py`) name a
`DiscoveryTarget` of the rendered config, and everything the router needs to know about the
replica (model, pool, priority, KV capacity, context length, concurrency) comes from that target,
i.e. from the plan, never from the pod. A slice whose labels name no target is ignored and counted
(`gpufleet_router_discovery_ignored_endpoints{reason}`), as is an endpoint without the target's
port or whose id another source owns. Per Service the ready endpoints of all its slices are one
membership source, `kubernetes:<namespace>/<service>`: ready endpoints join, not-ready and
deleted ones leave (`ReplicaSet.replace`, so the replicas that stay keep their state).

A replica's id is its pod's name (`targetRef`), which for a StatefulSet is the plan's replica id;
its URL is `<scheme>://<address>:<port>`. The client is synchronous: the watch runs in one
thread, and every membership change is handed to the router's event loop.

The other router replicas (`discovery.peers.kubernetes`, `router.peers`) are the ready endpoints
of the router's own Service's slices (`list_peer_urls`, listed every `refresh_s`; the same read
as the controller's of the router pods, `infra/controller/router_load.py`).
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpufleet.router.config import DiscoveryTarget, KubernetesDiscovery, PeerDiscovery, ReplicaConfig
from gpufleet.router.upstream.request import url_host

if TYPE_CHECKING:
    import asyncio

    from gpufleet.router.metrics import RouterMetrics
    from gpufleet.router.replicas import ReplicaSet

__all__ = [
    "SERVICE_NAME_LABEL",
    "EndpointSliceWatcher",
    "SliceView",
    "discovery_api",
    "list_peer_urls",
    "peer_urls",
    "read_slice",
    "source_name",
]

log = logging.getLogger("gpufleet.router.discovery")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
"""Set by the EndpointSlice controller on every slice: the Service it belongs to."""

IGNORE_REASONS = ("unknown_labels", "no_port", "no_address", "id_conflict")


def source_name(namespace: str, service: str) -> str:
    """The membership source of one Service's endpoints."""
    return f"kubernetes:{namespace}/{service}"


@dataclass(slots=True)
class SliceView:
    """What one EndpointSlice contributes: its Service and the ready replicas it lists."""

    service: str
    replicas: list[ReplicaConfig] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)
    """Endpoints left out, by reason (IGNORE_REASONS)."""


def _port_of(obj: Mapping[str, Any], want: str | int) -> int | None:
    for p in obj.get("ports") or ():
        if (isinstance(want, int) and p.get("port") == want) or (isinstance(want, str) and p.get("name") == want):
            port = p.get("port")
            return int(port) if isinstance(port, int) else None
    return None


def read_slice(
    obj: Mapping[str, Any], targets: Mapping[tuple[str, str], DiscoveryTarget], settings: KubernetesDiscovery
) -> SliceView:
    """The ready replicas of one EndpointSlice (a dict as the API server sends it). Pure."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    service = str(labels.get(SERVICE_NAME_LABEL) or (obj.get("metadata") or {}).get("name") or "")
    endpoints = obj.get("endpoints") or []
    view = SliceView(service)
    target = targets.get((str(labels.get(settings.deployment_label)), str(labels.get(settings.pool_label))))
    if target is None:
        if endpoints:
            view.ignored["unknown_labels"] = len(endpoints)
        return view
    port = _port_of(obj, target.port)
    for ep in endpoints:
        conditions = ep.get("conditions") or {}
        # The API: a nil `ready` is unknown and is to be read as ready; terminating ones are not.
        if conditions.get("ready") is False:
            continue
        if port is None:
            view.ignored["no_port"] = view.ignored.get("no_port", 0) + 1
            continue
        addresses = ep.get("addresses") or []
        if not addresses:
            view.ignored["no_address"] = view.ignored.get("no_address", 0) + 1
            continue
        address = str(addresses[0])
        host = url_host(address)
        ref = ep.get("targetRef") or {}
        rid = str(ref.get("name") or ep.get("hostname") or f"{service}-{address}-{port}")
        view.replicas.append(
            ReplicaConfig(
                id=rid,
                url=f"{target.scheme}://{host}:{port}",
                deployment=target.deployment,
                model=target.model,
                pool=target.pool,
                priority=target.priority,
                kv_capacity_tokens=target.kv_capacity_tokens,
                max_model_len=target.max_model_len,
                max_concurrent_requests=target.max_concurrent_requests,
                prefill_tokens_per_s=target.prefill_tokens_per_s,
                decode_tokens_per_s=target.decode_tokens_per_s,
                data_parallel_size=target.data_parallel_size,
                max_batched_tokens=target.max_batched_tokens,
            )
        )
    return view


def peer_urls(obj: Mapping[str, Any], settings: PeerDiscovery) -> list[str]:
    """The base URLs of the ready endpoints of one of the router Service's EndpointSlices (a dict
    as the API server sends it): the router replicas (`router.peers`). Pure."""
    port = _port_of(obj, settings.port)
    if port is None:
        return []
    urls = []
    for ep in obj.get("endpoints") or []:
        addresses = ep.get("addresses") or []
        if (ep.get("conditions") or {}).get("ready") is not False and addresses:
            urls.append(f"{settings.scheme}://{url_host(str(addresses[0]))}:{port}")
    return urls


def discovery_api(api_client: Any, kubeconfig: str | None) -> tuple[Any, Any]:
    """(`DiscoveryV1Api`, its `ApiClient`): `api_client` if given, else one from `kubeconfig`, else
    from the in-cluster service account."""
    from kubernetes import client, config

    if api_client is None:
        if kubeconfig:
            api_client = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        else:
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            api_client = client.ApiClient(cfg)
    return client.DiscoveryV1Api(api_client), api_client


def list_peer_urls(api: Any, settings: PeerDiscovery, timeout_s: float = 5.0) -> list[str]:
    """One list of the router Service's EndpointSlices (`api`: a `DiscoveryV1Api`): every ready
    router replica's base URL, this router's own included. Blocking: run it in a thread."""
    resp = api.list_namespaced_endpoint_slice(
        settings.namespace,
        label_selector=f"{SERVICE_NAME_LABEL}={settings.service}",
        _preload_content=False,
        _request_timeout=timeout_s,
    )
    try:
        body = json.loads(resp.data)
    finally:
        resp.release_conn()
    items = body.get("items") if isinstance(body, dict) else None
    return sorted({u for obj in items or () if isinstance(obj, dict) for u in peer_urls(obj, settings)})


def _api_exception() -> type[Exception]:
    from kubernetes.client.exceptions import ApiException

    return ApiException


class EndpointSliceWatcher:
    """List, then watch, the fleet's EndpointSlices in a thread; apply them on the router's loop."""

    def __init__(
        self,
        settings: KubernetesDiscovery,
        replicas: ReplicaSet,
        metrics: RouterMetrics,
        *,
        api_client: Any = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.replicas = replicas
        self.metrics = metrics
        self.targets = {(t.deployment, t.pool): t for t in settings.targets}
        self._api_client = api_client
        self._slices: dict[str, SliceView] = {}  # by slice name
        self._services: set[str] = set()  # services whose source is non-empty on the loop side
        self._conflicts: dict[str, int] = {}  # per service, endpoints whose id another source owns
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: Any = None
        self.synced = threading.Event()
        """Set once the first list has been applied."""
        self.resource_version: str | None = None

    # -- lifecycle (on the loop) ----------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the watch thread; membership changes are applied on `loop`."""
        self._loop = loop
        for t in self.settings.targets:
            self.replicas.declare_model(t.model, top_priority=t.priority, max_model_len=t.max_model_len)
        self._thread = threading.Thread(target=self._run, name="k8s-discovery", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop watching (the thread is a daemon: a stuck read never holds the process)."""
        self._stop.set()
        w = self._watch
        if w is not None:
            w.stop()
            resp = getattr(w, "_resp", None)
            if resp is not None:
                try:
                    resp.shutdown()  # urllib3 >= 2.3: unblocks the read in the other thread
                except Exception:  # older urllib3, or already closed: the daemon thread ends on its own
                    pass
        if self._thread is not None:
            self._thread.join(timeout_s)

    # -- the thread -----------------------------------------------------------------------
    def _api(self) -> Any:
        api, self._api_client = discovery_api(self._api_client, self.settings.kubeconfig)
        return api

    def _run(self) -> None:
        from kubernetes import watch

        ApiException = _api_exception()
        s = self.settings
        backoff = s.backoff_initial_s
        try:
            api = self._api()
        except Exception as exc:  # no in-cluster credentials, unreadable kubeconfig
            log.error("kubernetes discovery cannot start: %s", exc)
            self.metrics.discovery_errors.labels("config").inc()
            return
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list(api)
                    backoff = s.backoff_initial_s
                self._watch = watch.Watch()  # type: ignore[no-untyped-call]
                for event in self._watch.stream(
                    api.list_namespaced_endpoint_slice,
                    s.namespace,
                    label_selector=s.label_selector,
                    resource_version=self.resource_version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=s.watch_timeout_s,
                    _request_timeout=s.watch_timeout_s + 30,
                ):
                    self._event(event["type"], event["raw_object"])
                    backoff = s.backoff_initial_s
                    if self._stop.is_set():
                        break
            except ApiException as exc:
                if self._stop.is_set():
                    break
                status = getattr(exc, "status", None)
                if status == 410:
                    log.info(
                        "kubernetes discovery: resourceVersion %s is gone (410): re-listing", self.resource_version
                    )
                    self.metrics.discovery_relists.labels("gone").inc()
                    self.resource_version = None
                    continue
                log.warning(
                    "kubernetes discovery: API error %s %s; retrying in %.1fs",
                    status,
                    getattr(exc, "reason", ""),
                    backoff,
                )
                self.metrics.discovery_errors.labels(str(status)).inc()
                backoff = self._back_off(backoff)
            except Exception as exc:  # connection refused, reset, a read timeout, a bad body
                if self._stop.is_set():
                    break
                log.warning("kubernetes discovery: %s: %s; retrying in %.1fs", type(exc).__name__, exc, backoff)
                self.metrics.discovery_errors.labels("connection").inc()
                backoff = self._back_off(backoff)
            finally:
                self._watch = None

    def _back_off(self, backoff: float) -> float:
        self._sleep(backoff * random.uniform(0.8, 1.2))
        return min(backoff * 2, self.settings.backoff_max_s)

    def _list(self, api: Any) -> None:
        resp = api.list_namespaced_endpoint_slice(
            self.settings.namespace, label_selector=self.settings.label_selector, _preload_content=False
        )
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        items = body.get("items") or []
        self._slices = {
            str(obj["metadata"]["name"]): read_slice(obj, self.targets, self.settings)
            for obj in items
            if isinstance(obj, dict) and obj.get("metadata", {}).get("name")
        }
        self.resource_version = str((body.get("metadata") or {}).get("resourceVersion") or "") or None
        self.metrics.discovery_relists.labels("list").inc()
        self._publish(None, first=True)

    def _event(self, kind: str, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        rv = meta.get("resourceVersion")
        if rv:
            self.resource_version = str(rv)
        if kind == "BOOKMARK":
            return
        name = str(meta.get("name") or "")
        self.metrics.discovery_events.labels(kind.lower()).inc()
        old = self._slices.get(name)
        if kind == "DELETED":
            self._slices.pop(name, None)
        elif kind in ("ADDED", "MODIFIED"):
            self._slices[name] = read_slice(obj, self.targets, self.settings)
        else:
            return
        changed = {v.service for v in (old, self._slices.get(name)) if v is not None}
        self._publish(changed)

    def _publish(self, services: Iterable[str] | None, *, first: bool = False) -> None:
        """Hand the memberships of `services` (None: all) to the loop."""
        by_service: dict[str, list[ReplicaConfig]] = {}
        ignored = dict.fromkeys(IGNORE_REASONS, 0)
        for view in self._slices.values():
            by_service.setdefault(view.service, []).extend(view.replicas)
            for reason, n in view.ignored.items():
                ignored[reason] += n
        wanted = set(by_service) if services is None else set(services)
        updates = {svc: by_service.get(svc, []) for svc in wanted}
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._apply, updates, ignored, services is None, first)
        except RuntimeError:  # the loop closed meanwhile: the router is stopping
            pass

    # -- on the loop ----------------------------------------------------------------------
    def _apply(self, updates: dict[str, list[ReplicaConfig]], ignored: dict[str, int], full: bool, first: bool) -> None:
        ns = self.settings.namespace
        if full:  # a (re-)list: services that are gone since leave too
            for svc in self._services - set(updates):
                updates[svc] = []
        for svc, configs in updates.items():
            conflicts = 0
            source = source_name(ns, svc)
            keep: list[ReplicaConfig] = []
            seen: set[str] = set()
            for c in configs:
                owner = self.replicas.source_of(c.id)
                if (owner is not None and owner != source) or c.id in seen:
                    conflicts += 1
                    continue
                seen.add(c.id)
                keep.append(c)
            try:
                self.replicas.replace(keep, source=source)
            except Exception as exc:  # a URL the upstream client cannot use, say
                log.error("kubernetes discovery: %s refused: %s", source, exc)
                continue
            self._conflicts[svc] = conflicts
            if keep:
                self._services.add(svc)
            else:
                self._services.discard(svc)
        ignored["id_conflict"] = sum(self._conflicts.values())
        for reason, n in ignored.items():
            self.metrics.discovery_ignored.labels(reason).set(n)
        if first and not self.synced.is_set():
            log.info(
                "kubernetes discovery: %d replicas from %d services in %s",
                sum(len(v) for v in updates.values()),
                len(self._services),
                ns,
            )
            self.synced.set()
