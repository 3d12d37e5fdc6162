"""A stateful fake Kubernetes API server, for the REAL kubernetes Python client.

Serves nodes (list/get/patch), pods (list across namespaces and per namespace, get),
deployments (list/get) and their scale subresource (get/patch/put), and (k8s_workloads.py)
Services, StatefulSets with their scale subresource, and EndpointSlices with list and watch
(chunked events, 410 Gone after `expire_watches()`), with label selectors
(`k=v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`) and field selectors
(`status.phase`, `spec.nodeName`, `metadata.name`, `metadata.namespace`, with `=`, `==`, `!=`).

A tiny scheduler and deployment controller keep the state honest: a pod lands on a Ready,
schedulable node whose labels match its nodeSelector and which has enough free
`nvidia.com/gpu`; otherwise it stays Pending with an Unschedulable condition. A pod that does
not fit may preempt placeholder pods (label `app.kubernetes.io/component=placeholder`), as a negative
PriorityClass would let it. Scaling a Deployment creates or deletes its pods.

    with FakeKubernetes() as kube:
        kube.add_node("n1", labels={"gpufleet.io/pool": "aws-h100"}, gpus=8)
        api = kube.api_client()   # kubernetes.client.ApiClient pointed at the fake
"""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any

from tests.fakes._http import HttpError, JsonServer, Request
from tests.fakes.k8s_workloads import WorkloadsMixin

__all__ = ["GPU", "FakeKubernetes", "field_selector_matches", "label_selector_matches"]

GPU = "nvidia.com/gpu"
PLACEHOLDER_SELECTOR = {"app.kubernetes.io/component": "placeholder"}

_NS = r"/api/v1/namespaces/(?P<ns>[^/]+)"
_APPS_NS = r"/apis/apps/v1/namespaces/(?P<ns>[^/]+)"


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


_REQ = re.compile(r"^\s*(?P<key>[^\s!=,()]+)\s+(?P<op>in|notin)\s+\((?P<vals>[^)]*)\)\s*$")


def _split_selector(selector: str) -> list[str]:
    """Split on commas that are not inside `( ... )`."""
    parts, depth, cur = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def label_selector_matches(selector: str | None, labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics over one object's labels."""
    for term in _split_selector(selector or ""):
        set_based = _REQ.match(term)
        if set_based:
            values = {v.strip() for v in set_based["vals"].split(",") if v.strip()}
            has = labels.get(set_based["key"]) in values
            if has != (set_based["op"] == "in"):
                return False
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for key in path.split("."):
        value = (value or {}).get(key)
    return "" if value is None else str(value)


def field_selector_matches(selector: str | None, obj: dict[str, Any]) -> bool:
    for term in _split_selector(selector or ""):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if _field(obj, key.strip()) == value.strip():
                return False
        else:
            key, value = term.replace("==", "=").split("=", 1)
            if _field(obj, key.strip()) != value.strip():
                return False
    return True


def pod_gpus(pod: dict[str, Any]) -> int:
    total = 0
    for c in pod["spec"].get("containers", []):
        res = c.get("resources") or {}
        total += int((res.get("requests") or {}).get(GPU) or (res.get("limits") or {}).get(GPU) or 0)
    return total


class FakeKubernetes(WorkloadsMixin, JsonServer):
    """The fake API server and its objects. Helpers mutate state the way controllers would."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.deployments: dict[tuple[str, str], dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self._rv = itertools.count(1)
        self.route("GET", r"/api/v1/nodes", self._list_nodes)
        self.route("GET", r"/api/v1/nodes/(?P<name>[^/]+)", self._get_node)
        self.route("PATCH", r"/api/v1/nodes/(?P<name>[^/]+)", self._patch_node)
        self.route("GET", r"/api/v1/pods", self._list_pods)
        self.route("GET", _NS + r"/pods", self._list_pods)
        self.route("GET", _NS + r"/pods/(?P<name>[^/]+)", self._get_pod)
        self.route("GET", r"/apis/apps/v1/deployments", self._list_deployments)
        self.route("GET", _APPS_NS + r"/deployments", self._list_deployments)
        self.route("GET", _APPS_NS + r"/deployments/(?P<name>[^/]+)", self._get_deployment)
        self.route("GET", _APPS_NS + r"/deployments/(?P<name>[^/]+)/scale", self._get_scale)
        self.route("PATCH", _APPS_NS + r"/deployments/(?P<name>[^/]+)/scale", self._set_scale)
        self.route("PUT", _APPS_NS + r"/deployments/(?P<name>[^/]+)/scale", self._set_scale)
        self.forbidden: set[str] = set()  # path prefixes answering 403, to test RBAC errors
        self._init_workloads()  # Services, StatefulSets, EndpointSlices (k8s_workloads.py)

    # ------------------------------------------------------------------ scenario helpers

    def add_node(
        self, name: str, *, labels: dict[str, str], gpus: int, ready: bool = True, unschedulable: bool = False
    ) -> dict[str, Any]:
        with self.lock:
            node = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": dict(labels), "resourceVersion": str(next(self._rv))},
                "spec": {"unschedulable": unschedulable},
                "status": {
                    "capacity": {GPU: str(gpus), "cpu": "192", "memory": "2Ti"},
                    "allocatable": {GPU: str(gpus), "cpu": "190", "memory": "1900Gi"},
                    "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                },
            }
            self.nodes[name] = node
            self.schedule_pending()
            return node

    def set_node_ready(self, name: str, ready: bool) -> None:
        with self.lock:
            self.nodes[name]["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
            self.schedule_pending()

    def add_pod(
        self,
        name: str,
        *,
        namespace: str = "default",
        labels: dict[str, str] | None = None,
        gpus: int = 0,
        node_selector: dict[str, str] | None = None,
        phase: str | None = None,
        owner: str | None = None,
        affinity: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create a pod and schedule it (unless `phase` forces a state)."""
        with self.lock:
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": dict(labels or {}),
                    "resourceVersion": str(next(self._rv)),
                    **(
                        {
                            "ownerReferences": [
                                {
                                    "apiVersion": "apps/v1",
                                    "kind": "Deployment",
                                    "name": owner,
                                    "uid": owner,
                                    "controller": True,
                                }
                            ]
                        }
                        if owner
                        else {}
                    ),
                },
                "spec": {
                    "nodeSelector": dict(node_selector or {}),
                    **({"affinity": affinity} if affinity else {}),
                    "containers": [
                        {
                            "name": "main",
                            "image": "registry.k8s.io/pause:3.9",
                            "resources": {"requests": {GPU: str(gpus)}, "limits": {GPU: str(gpus)}} if gpus else {},
                        }
                    ],
                },
                "status": {"phase": phase or "Pending"},
            }
            if _is_placeholder(pod):
                pod["spec"]["priorityClassName"] = "placeholder"
            self.pods[(namespace, name)] = pod
            if phase is None:
                self._schedule(pod)
            return pod

    def delete_pod(self, namespace: str, name: str) -> None:
        with self.lock:
            pod = self.pods.pop((namespace, name))
            owner = _owner(pod)
            if owner and (namespace, owner) in self.deployments:
                self._reconcile(self.deployments[(namespace, owner)])
            self.recreate_owned(namespace, pod)
            self.schedule_pending()

    def add_deployment(
        self,
        name: str,
        *,
        namespace: str,
        replicas: int,
        labels: dict[str, str],
        gpus_per_pod: int,
        node_selector: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        with self.lock:
            dep = {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": dict(labels),
                    "resourceVersion": str(next(self._rv)),
                },
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": dict(labels)},
                    "template": {
                        "metadata": {"labels": dict(labels)},
                        "spec": {
                            "nodeSelector": dict(node_selector or {}),
                            "containers": [
                                {
                                    "name": "main",
                                    "image": "registry.k8s.io/pause:3.9",
                                    "resources": {"limits": {GPU: str(gpus_per_pod)}},
                                }
                            ],
                        },
                    },
                },
                "status": {},
            }
            self.deployments[(namespace, name)] = dep
            self._reconcile(dep)
            return dep

    def gpus_free(self, node: str) -> int:
        used = sum(
            pod_gpus(p)
            for p in self.pods.values()
            if p["spec"].get("nodeName") == node and p["status"]["phase"] in ("Pending", "Running")
        )
        return int(self.nodes[node]["status"]["allocatable"].get(GPU, "0")) - used

    # ------------------------------------------------------------------ scheduler / controllers

    def _fits(self, pod: dict[str, Any], node: dict[str, Any]) -> bool:
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
        labels = node["metadata"]["labels"]
        selector = pod["spec"].get("nodeSelector") or {}
        return (
            ready
            and not node["spec"].get("unschedulable")
            and selector.items() <= labels.items()
            and _affinity_allows(pod, labels)
        )

    def _schedule(self, pod: dict[str, Any]) -> bool:
        need = pod_gpus(pod)
        candidates = [n for n in sorted(self.nodes) if self._fits(pod, self.nodes[n])]
        for name in candidates:
            if self.gpus_free(name) >= need:
                self._bind(pod, name)
                return True
        if not _is_placeholder(pod):
            # Preemption: placeholders have the lowest priority, so a real pod evicts them.
            for name in candidates:
                victims = [p for p in self.pods.values() if p["spec"].get("nodeName") == name and _is_placeholder(p)]
                freed = 0
                chosen = []
                for victim in victims:
                    if self.gpus_free(name) + freed >= need:
                        break
                    chosen.append(victim)
                    freed += pod_gpus(victim)
                if self.gpus_free(name) + freed >= need and chosen:
                    for victim in chosen:
                        self.pods.pop((victim["metadata"]["namespace"], victim["metadata"]["name"]))
                    self._bind(pod, name)
                    for victim in chosen:  # their Deployment recreates them; they wait Pending
                        owner = _owner(victim)
                        if owner and (victim["metadata"]["namespace"], owner) in self.deployments:
                            self._reconcile(self.deployments[(victim["metadata"]["namespace"], owner)])
                    return True
        pod["status"] = {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": f"0/{len(self.nodes)} nodes are available: Insufficient {GPU}.",
                }
            ],
        }
        return False

    def _bind(self, pod: dict[str, Any], node: str) -> None:
        pod["spec"]["nodeName"] = node
        pod["status"] = {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}]}

    def schedule_pending(self) -> None:
        """Try every Pending pod again (real pods before placeholders, as priority would)."""
        with self.lock:
            pending = [
                p for p in self.pods.values() if p["status"]["phase"] == "Pending" and not p["spec"].get("nodeName")
            ]
            for pod in sorted(pending, key=_is_placeholder):
                self._schedule(pod)
            self.sync_endpoint_slices()

    def _reconcile(self, dep: dict[str, Any]) -> None:
        ns, name = dep["metadata"]["namespace"], dep["metadata"]["name"]
        owned = [p for p in self.pods.values() if p["metadata"]["namespace"] == ns and _owner(p) == name]
        want = int(dep["spec"]["replicas"])
        # Scale-down removes pending pods first, as the ReplicaSet controller does.
        owned.sort(key=lambda p: (p["status"]["phase"] != "Pending",))
        for pod in owned[: max(0, len(owned) - want)]:
            self.pods.pop((ns, pod["metadata"]["name"]))
        template = dep["spec"]["template"]
        for _ in range(max(0, want - len(owned))):
            self.add_pod(
                f"{name}-{next(self._ids):05d}",
                namespace=ns,
                labels=template["metadata"]["labels"],
                gpus=pod_gpus({"spec": template["spec"]}),
                node_selector=template["spec"].get("nodeSelector"),
                owner=name,
            )
        running = [p for p in self.pods.values() if p["metadata"]["namespace"] == ns and _owner(p) == name]
        dep["status"] = {
            "replicas": len(running),
            "readyReplicas": sum(1 for p in running if p["status"]["phase"] == "Running"),
        }
        self.schedule_pending()

    # ------------------------------------------------------------------ handlers

    def _guard(self, path: str) -> None:
        if any(path.startswith(prefix) for prefix in self.forbidden):
            raise HttpError(403, _status(403, "Forbidden", f"forbidden: cannot access {path}"))

    def _list(self, kind: str, items: list[dict[str, Any]], req: Request) -> dict[str, Any]:
        items = [
            i
            for i in items
            if label_selector_matches(req.query.get("labelSelector"), i["metadata"]["labels"])
            and field_selector_matches(req.query.get("fieldSelector"), i)
        ]
        return {
            "apiVersion": "v1" if kind != "DeploymentList" else "apps/v1",
            "kind": kind,
            "metadata": {"resourceVersion": str(next(self._rv))},
            "items": copy.deepcopy(items),
        }

    def _list_nodes(self, req: Request) -> dict[str, Any]:
        self._guard("/api/v1/nodes")
        return self._list("NodeList", list(self.nodes.values()), req)

    def _node(self, req: Request) -> dict[str, Any]:
        self._guard("/api/v1/nodes")
        node = self.nodes.get(req.match["name"])
        if node is None:
            raise HttpError(404, _status(404, "NotFound", f'nodes "{req.match["name"]}" not found'))
        return node

    def _get_node(self, req: Request) -> dict[str, Any]:
        return copy.deepcopy(self._node(req))

    def _patch_node(self, req: Request) -> dict[str, Any]:
        node = self._node(req)
        body = req.body or {}
        if isinstance(body, dict):
            node["metadata"]["labels"].update((body.get("metadata") or {}).get("labels") or {})
            if "spec" in body and "unschedulable" in body["spec"]:
                node["spec"]["unschedulable"] = bool(body["spec"]["unschedulable"])
        self.schedule_pending()
        return copy.deepcopy(node)

    def _list_pods(self, req: Request) -> dict[str, Any]:
        ns = req.match.groupdict().get("ns")
        self._guard(f"/api/v1/namespaces/{ns}/pods" if ns else "/api/v1/pods")
        return self._list("PodList", [p for k, p in self.pods.items() if ns is None or k[0] == ns], req)

    def _get_pod(self, req: Request) -> dict[str, Any]:
        pod = self.pods.get((req.match["ns"], req.match["name"]))
        if pod is None:
            raise HttpError(404, _status(404, "NotFound", f'pods "{req.match["name"]}" not found'))
        return copy.deepcopy(pod)

    def _list_deployments(self, req: Request) -> dict[str, Any]:
        ns = req.match.groupdict().get("ns")
        return self._list("DeploymentList", [d for k, d in self.deployments.items() if ns is None or k[0] == ns], req)

    def _deployment(self, req: Request) -> dict[str, Any]:
        self._guard(f"/apis/apps/v1/namespaces/{req.match['ns']}/deployments")
        dep = self.deployments.get((req.match["ns"], req.match["name"]))
        if dep is None:
            raise HttpError(404, _status(404, "NotFound", f'deployments.apps "{req.match["name"]}" not found'))
        return dep

    def _get_deployment(self, req: Request) -> dict[str, Any]:
        return copy.deepcopy(self._deployment(req))

    def _scale_of(self, dep: dict[str, Any]) -> dict[str, Any]:
        sel = ",".join(f"{k}={v}" for k, v in dep["spec"]["selector"]["matchLabels"].items())
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                "name": dep["metadata"]["name"],
                "namespace": dep["metadata"]["namespace"],
                "resourceVersion": dep["metadata"]["resourceVersion"],
            },
            "spec": {"replicas": dep["spec"]["replicas"]},
            "status": {"replicas": dep["status"].get("replicas", 0), "selector": sel},
        }

    def _get_scale(self, req: Request) -> dict[str, Any]:
        return self._scale_of(self._deployment(req))

    def _set_scale(self, req: Request) -> dict[str, Any]:
        dep = self._deployment(req)
        body = req.body
        replicas: Any = None
        if isinstance(body, list):  # JSON patch
            for op in body:
                if op.get("path") == "/spec/replicas" and op.get("op") in ("replace", "add"):
                    replicas = op.get("value")
        elif isinstance(body, dict):
            replicas = (body.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise HttpError(
                422, _status(422, "Invalid", "spec.replicas: Invalid value: must be a non-negative integer")
            )
        dep["spec"]["replicas"] = replicas
        dep["metadata"]["resourceVersion"] = str(next(self._rv))
        self._reconcile(dep)
        return self._scale_of(dep)

    # ------------------------------------------------------------------ clients

    def api_client(self) -> Any:
        """A REAL `kubernetes.client.ApiClient` pointed at this fake over loopback HTTP."""
        from kubernetes import client

        config = client.Configuration()
        config.host = self.url
        return client.ApiClient(config)


def _owner(pod: dict[str, Any]) -> str | None:
    refs = pod["metadata"].get("ownerReferences") or []
    return refs[0]["name"] if refs else None


def _affinity_allows(pod: dict[str, Any], labels: dict[str, str]) -> bool:
    """Required node affinity: any term matches when all its expressions do."""
    required = ((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms") or []
    if not terms:
        return True

    def holds(expr: dict[str, Any]) -> bool:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        return {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]

    return any(all(holds(e) for e in term.get("matchExpressions") or []) for term in terms)


def _is_placeholder(pod: dict[str, Any]) -> bool:
    return PLACEHOLDER_SELECTOR.items() <= (pod["metadata"].get("labels") or {}).items()
