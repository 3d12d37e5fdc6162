"""The fake Kubernetes API server's workloads: Services, StatefulSets (with the scale
subresource), pod readiness, and the EndpointSlices an EndpointSlice controller derives from
them, with list and watch (chunked JSON events, as the real API server streams them).

State is kept the way the controllers would keep it:

- a StatefulSet owns pods `<name>-0 .. <name>-(replicas-1)`; scaling down deletes the highest
  ordinals first; a deleted pod is recreated under the same name (not ready);
- a pod is *ready* only when a test says so (`set_pod_ready`): kubelet's readiness probe;
- for every Service with a selector, the matching scheduled pods become endpoints, grouped into
  one slice per resolved port mapping (a named `targetPort` may resolve to different numbers on
  different pods: the real controller then makes one slice per mapping too). A slice carries the
  Service's labels plus `kubernetes.io/service-name`; each endpoint has `conditions.ready`, its
  pod as `targetRef`, and the pod's IP;
- every slice change is an event with a new resourceVersion; a watch from resourceVersion R gets
  every later event that matches its label selector, until `timeoutSeconds`. `expire_watches()`
  compacts the history: open watches end and a watch from an older version gets the API server's
  `ERROR` event with a 410 `Expired` Status.

Pod networking is explicit: `pod_network[pod name] = (ip, {port name: number})` overrides the
default (10.0.0.N and the template's ports), so tests can point an endpoint at a loopback server.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

from tests.fakes._http import HttpError, Request, Stream

__all__ = ["WorkloadsMixin"]

_APPS_NS = r"/apis/apps/v1/namespaces/(?P<ns>[^/]+)"
_DISC = r"/apis/discovery.k8s.io/v1"


def _gone(message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": "Expired", "code": 410}  # fmt: skip


class WorkloadsMixin:
    """Mixed into `FakeKubernetes` (which provides `lock`, `route`, `pods`, `_rv`, `_guard`, ...)."""

    lock: threading.RLock
    pods: dict[tuple[str, str], dict[str, Any]]
    _rv: Iterator[int]

    def _init_workloads(self) -> None:
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.statefulsets: dict[tuple[str, str], dict[str, Any]] = {}
        self.endpoint_slices: dict[tuple[str, str], dict[str, Any]] = {}
        self.pod_network: dict[str, tuple[str, dict[str, int]]] = {}
        self._ready: set[tuple[str, str]] = set()
        self._pod_ips: dict[tuple[str, str], str] = {}
        self._slice_events: list[tuple[int, str, dict[str, Any]]] = []
        self._history_floor = 0
        self._watch_generation = 0
        self._changed = threading.Condition(self.lock)
        self._ips = itertools.count(2)
        self.watch_requests: list[dict[str, str]] = []
        r = self.route  # type: ignore[attr-defined]
        r("GET", _DISC + r"/endpointslices", self._slices_handler)
        r("GET", _DISC + r"/namespaces/(?P<ns>[^/]+)/endpointslices", self._slices_handler)
        r("GET", _APPS_NS + r"/statefulsets", self._list_statefulsets)
        r("GET", _APPS_NS + r"/statefulsets/(?P<name>[^/]+)", self._get_statefulset)
        r("GET", _APPS_NS + r"/statefulsets/(?P<name>[^/]+)/scale", self._get_sts_scale)
        r("PATCH", _APPS_NS + r"/statefulsets/(?P<name>[^/]+)/scale", self._set_sts_scale)
        r("PUT", _APPS_NS + r"/statefulsets/(?P<name>[^/]+)/scale", self._set_sts_scale)

    # ------------------------------------------------------------------ scenario helpers

    def add_service(
        self, name: str, *, namespace: str, selector: dict[str, str], labels: dict[str, str], port: str | int = "http"
    ) -> dict[str, Any]:
        """A (headless) Service whose endpoints are the pods matching `selector`."""
        with self.lock:
            svc = {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
                "spec": {"clusterIP": "None", "selector": dict(selector),
                         "ports": [{"name": "http", "port": 8000, "targetPort": port}]},
            }  # fmt: skip
            self.services[(namespace, name)] = svc
            self.sync_endpoint_slices()
            return svc

    def add_statefulset(
        self,
        name: str,
        *,
        namespace: str,
        replicas: int,
        labels: dict[str, str],
        gpus_per_pod: int = 0,
        node_selector: dict[str, str] | None = None,
        ports: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        with self.lock:
            sts = {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": {"name": name, "namespace": namespace, "labels": dict(labels),
                             "resourceVersion": str(next(self._rv)), "generation": 1},
                "spec": {
                    "replicas": replicas,
                    "serviceName": name,
                    "selector": {"matchLabels": dict(labels)},
                    "template": {
                        "metadata": {"labels": dict(labels)},
                        "spec": {
                            "nodeSelector": dict(node_selector or {}),
                            "containers": [{
                                "name": "engine",
                                "image": "registry.k8s.io/pause:3.9",
                                "ports": [{"name": k, "containerPort": v} for k, v in (ports or {"http": 8000}).items()],
                                "resources": {"limits": {"nvidia.com/gpu": str(gpus_per_pod)}} if gpus_per_pod else {},
                            }],
                        },
                    },
                },
                "status": {},
            }  # fmt: skip
            self.statefulsets[(namespace, name)] = sts
            self._reconcile_sts(sts)
            return sts

    def set_pod_ready(self, namespace: str, name: str, ready: bool = True) -> None:
        """The pod's readiness probe passes (or fails)."""
        with self.lock:
            pod = self.pods[(namespace, name)]
            if ready:
                self._ready.add((namespace, name))
            else:
                self._ready.discard((namespace, name))
            self._set_ready_condition(pod)
            owner = _owner_of(pod)
            if owner and owner[0] == "StatefulSet" and (namespace, owner[1]) in self.statefulsets:
                self._reconcile_sts(self.statefulsets[(namespace, owner[1])])  # its readyReplicas
            self.sync_endpoint_slices()

    def expire_watches(self) -> None:
        """Compact the event history: open watches end, and resuming from an older version is a 410."""
        with self.lock:
            self._history_floor = next(self._rv)
            self._slice_events.clear()
            self._watch_generation += 1
            self._changed.notify_all()

    # ------------------------------------------------------------------ controllers

    def _set_ready_condition(self, pod: dict[str, Any]) -> None:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        conds = [c for c in pod["status"].get("conditions", []) if c.get("type") != "Ready"]
        conds.append({"type": "Ready", "status": "True" if key in self._ready else "False"})
        pod["status"]["conditions"] = conds

    def _sts_pod_name(self, sts: dict[str, Any], i: int) -> str:
        return f"{sts['metadata']['name']}-{i}"

    def _reconcile_sts(self, sts: dict[str, Any]) -> None:
        ns, name = sts["metadata"]["namespace"], sts["metadata"]["name"]
        want = int(sts["spec"]["replicas"])
        template = sts["spec"]["template"]
        container = template["spec"]["containers"][0]
        template_ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        owned = {p["metadata"]["name"] for p in self.pods.values()
                 if p["metadata"]["namespace"] == ns and _owner_of(p) == ("StatefulSet", name)}  # fmt: skip
        for pod_name in owned:
            if int(pod_name.rsplit("-", 1)[1]) >= want:
                self.pods.pop((ns, pod_name))
                self._ready.discard((ns, pod_name))
                self._pod_ips.pop((ns, pod_name), None)
        for i in range(want):
            pod_name = self._sts_pod_name(sts, i)
            if (ns, pod_name) in self.pods:
                continue
            pod = self.add_pod(  # type: ignore[attr-defined]
                pod_name,
                namespace=ns,
                labels=template["metadata"]["labels"],
                gpus=int((container.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0)),
                node_selector=template["spec"].get("nodeSelector"),
            )
            pod["metadata"]["ownerReferences"] = [
                {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name, "uid": name, "controller": True}
            ]
            ip, ports = self.pod_network.get(pod_name, (f"10.0.0.{next(self._ips)}", template_ports))
            self._pod_ips[(ns, pod_name)] = ip
            pod["spec"]["containers"][0]["ports"] = [{"name": k, "containerPort": v} for k, v in ports.items()]
            self._set_ready_condition(pod)
        pods = [
            p for p in self.pods.values() if p["metadata"]["namespace"] == ns and _owner_of(p) == ("StatefulSet", name)
        ]
        sts["status"] = {
            "replicas": len(pods),
            "readyReplicas": sum(1 for p in pods if (ns, p["metadata"]["name"]) in self._ready),
            "observedGeneration": sts["metadata"]["generation"],
        }
        self.sync_endpoint_slices()

    def recreate_owned(self, namespace: str, pod: dict[str, Any]) -> None:
        """After a pod of a StatefulSet was deleted: the controller makes it again."""
        owner = _owner_of(pod)
        self._ready.discard((namespace, pod["metadata"]["name"]))
        self._pod_ips.pop((namespace, pod["metadata"]["name"]), None)
        if owner and owner[0] == "StatefulSet" and (namespace, owner[1]) in self.statefulsets:
            self._reconcile_sts(self.statefulsets[(namespace, owner[1])])
        else:
            self.sync_endpoint_slices()

    def sync_endpoint_slices(self) -> None:
        """The EndpointSlice controller: derive every Service's slices; record what changed."""
        from tests.fakes.k8s_server import label_selector_matches

        with self.lock:
            want: dict[tuple[str, str], dict[str, Any]] = {}
            for (ns, svc_name), svc in self.services.items():
                selector = ",".join(f"{k}={v}" for k, v in svc["spec"]["selector"].items())
                target = svc["spec"]["ports"][0]["targetPort"]
                groups: dict[int, list[dict[str, Any]]] = {}
                for (pns, pname), pod in sorted(self.pods.items()):
                    ip = self._pod_ips.get((pns, pname))
                    if pns != ns or not pod["spec"].get("nodeName") or ip is None:
                        continue
                    pod["status"]["podIP"] = ip  # a scheduled pod has its IP
                    if not any(c.get("type") == "Ready" for c in pod["status"].get("conditions", [])):
                        self._set_ready_condition(pod)
                    if not label_selector_matches(selector, pod["metadata"]["labels"]):
                        continue
                    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0].get("ports", [])}
                    number = target if isinstance(target, int) else ports.get(target)
                    if number is None:
                        continue
                    ready = (ns, pname) in self._ready
                    groups.setdefault(number, []).append({
                        "addresses": [ip],
                        "conditions": {"ready": ready, "serving": ready, "terminating": False},
                        "targetRef": {"kind": "Pod", "name": pname, "namespace": ns},
                        "nodeName": pod["spec"]["nodeName"],
                    })  # fmt: skip
                for number, endpoints in groups.items():
                    suffix = hashlib.sha256(f"{svc_name}:{number}".encode()).hexdigest()[:5]
                    name = f"{svc_name}-{suffix}"
                    want[(ns, name)] = {
                        "apiVersion": "discovery.k8s.io/v1",
                        "kind": "EndpointSlice",
                        "metadata": {
                            "name": name,
                            "namespace": ns,
                            "labels": {**svc["metadata"]["labels"], "kubernetes.io/service-name": svc_name,
                                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                        },
                        "addressType": "IPv4",
                        "endpoints": endpoints,
                        "ports": [{"name": "http", "port": number, "protocol": "TCP"}],
                    }  # fmt: skip
            for key in list(self.endpoint_slices):
                if key not in want:
                    old = self.endpoint_slices.pop(key)
                    self._record("DELETED", old)
            for key, obj in want.items():
                old = self.endpoint_slices.get(key)
                if old is not None and _content(old) == _content(obj):
                    continue
                self.endpoint_slices[key] = obj
                self._record("ADDED" if old is None else "MODIFIED", obj)

    def _record(self, kind: str, obj: dict[str, Any]) -> None:
        rv = next(self._rv)
        obj["metadata"]["resourceVersion"] = str(rv)
        self._slice_events.append((rv, kind, copy.deepcopy(obj)))
        self._changed.notify_all()

    # ------------------------------------------------------------------ handlers

    def _slices_handler(self, req: Request) -> Any:
        from tests.fakes.k8s_server import label_selector_matches

        ns = req.match.groupdict().get("ns")
        self._guard(f"{_DISC}/namespaces/{ns}/endpointslices" if ns else f"{_DISC}/endpointslices")  # type: ignore[attr-defined]
        selector = req.query.get("labelSelector")

        def visible(obj: dict[str, Any]) -> bool:
            return (ns is None or obj["metadata"]["namespace"] == ns) and label_selector_matches(
                selector, obj["metadata"]["labels"]
            )

        if req.query.get("watch") not in ("true", "1"):
            return {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSliceList",
                "metadata": {"resourceVersion": str(next(self._rv))},
                "items": [copy.deepcopy(o) for o in self.endpoint_slices.values() if visible(o)],
            }
        self.watch_requests.append(dict(req.query))
        since = int(req.query.get("resourceVersion") or 0)
        timeout_s = float(req.query.get("timeoutSeconds") or 1800)
        if since and since < self._history_floor:
            # The real API server answers 200 and streams one ERROR event with a 410 Status.
            return Stream(iter([{"type": "ERROR", "object": _gone(f"too old resource version: {since}")}]))
        generation = self._watch_generation
        if not since:  # a watch without a version starts with the current objects as ADDED
            backlog = [
                {"type": "ADDED", "object": copy.deepcopy(o)} for o in self.endpoint_slices.values() if visible(o)
            ]
            since = max((rv for rv, _, _ in self._slice_events), default=self._history_floor)
        else:
            backlog = []

        def events() -> Iterator[dict[str, Any] | None]:
            yield from backlog
            cursor = since
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                with self.lock:
                    if generation != self._watch_generation:
                        return  # compacted: the server closes the watch
                    new = [e for e in self._slice_events if e[0] > cursor]
                    if not new:
                        self._changed.wait(0.05)
                        if generation != self._watch_generation:
                            return
                        new = [e for e in self._slice_events if e[0] > cursor]
                if not new:
                    yield None
                    continue
                for rv, kind, obj in new:
                    cursor = rv
                    if visible(obj):
                        yield {"type": kind, "object": obj}

        return Stream(events())

    def _sts(self, req: Request) -> dict[str, Any]:
        self._guard(f"/apis/apps/v1/namespaces/{req.match['ns']}/statefulsets")  # type: ignore[attr-defined]
        sts = self.statefulsets.get((req.match["ns"], req.match["name"]))
        if sts is None:
            raise HttpError(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                  "code": 404, "message": f'statefulsets.apps "{req.match["name"]}" not found'})  # fmt: skip
        return sts

    def _list_statefulsets(self, req: Request) -> dict[str, Any]:
        ns = req.match["ns"]
        self._guard(f"/apis/apps/v1/namespaces/{ns}/statefulsets")  # type: ignore[attr-defined]
        return {
            "apiVersion": "apps/v1",
            "kind": "StatefulSetList",
            "metadata": {"resourceVersion": str(next(self._rv))},
            "items": [copy.deepcopy(s) for (n, _), s in self.statefulsets.items() if n == ns],
        }

    def _get_statefulset(self, req: Request) -> dict[str, Any]:
        return copy.deepcopy(self._sts(req))

    def _sts_scale(self, sts: dict[str, Any]) -> dict[str, Any]:
        sel = ",".join(f"{k}={v}" for k, v in sts["spec"]["selector"]["matchLabels"].items())
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": sts["metadata"]["name"], "namespace": sts["metadata"]["namespace"],
                         "resourceVersion": sts["metadata"]["resourceVersion"]},
            "spec": {"replicas": sts["spec"]["replicas"]},
            "status": {"replicas": sts["status"].get("replicas", 0), "selector": sel},
        }  # fmt: skip

    def _get_sts_scale(self, req: Request) -> dict[str, Any]:
        return self._sts_scale(self._sts(req))

    def _set_sts_scale(self, req: Request) -> dict[str, Any]:
        sts = self._sts(req)
        body = req.body
        replicas: Any = None
        if isinstance(body, list):  # JSON patch
            for op in body:
                if op.get("path") == "/spec/replicas" and op.get("op") in ("replace", "add"):
                    replicas = op.get("value")
        elif isinstance(body, dict):  # merge patch, strategic merge patch or PUT of a Scale
            replicas = (body.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise HttpError(422, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid",
                                  "code": 422, "message": "spec.replicas: Invalid value: must be a non-negative integer"})  # fmt: skip
        sts["spec"]["replicas"] = replicas
        sts["metadata"]["resourceVersion"] = str(next(self._rv))
        sts["metadata"]["generation"] += 1
        self._reconcile_sts(sts)
        return self._sts_scale(sts)


def _owner_of(pod: dict[str, Any]) -> tuple[str, str] | None:
    refs = pod["metadata"].get("ownerReferences") or []
    return (refs[0]["kind"], refs[0]["name"]) if refs else None


def _content(obj: dict[str, Any]) -> str:
    body = {k: v for k, v in obj.items() if k != "metadata"}
    return json.dumps([body, obj["metadata"].get("labels")], sort_keys=True)
