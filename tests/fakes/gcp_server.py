"""A stateful fake of the Compute Engine v1 REST API, for the REAL google-cloud-compute client.

Serves zones, accelerator types and machine types per zone, regions with their quotas, zonal
managed instance groups (get, resize, listManagedInstances) and zone operations. State is
kept: `resize` changes the group's target size and adds CREATING instances, which become
RUNNING when the test calls `settle()` (a provisioning delay under the test's control).
Errors are injected per group with `fail_next_resize(...)`, either as an HTTP error (reason
such as `quotaExceeded`) or as a failed operation (code such as ZONE_RESOURCE_POOL_EXHAUSTED),
the two ways Compute Engine reports them.

    with FakeGcpServer.with_defaults() as fake:
        client = fake.client(compute_v1.RegionsClient)
        client.get(project=fake.project, region="us-central1")
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from tests.fakes._http import HttpError, JsonServer, Request

__all__ = ["FakeGcpServer", "Mig"]

_P = r"/compute/v1/projects/(?P<project>[^/]+)"
_Z = _P + r"/zones/(?P<zone>[^/]+)"
_IGM = _Z + r"/instanceGroupManagers/(?P<igm>[^/]+)"


@dataclass
class Mig:
    """One zonal managed instance group."""

    name: str
    zone: str
    machine_type: str
    target_size: int = 0
    instances: list[dict[str, Any]] = field(default_factory=list)
    fail_next: dict[str, Any] | None = None


class FakeGcpServer(JsonServer):
    """The fake. Mutate its dicts directly to set up a scenario; the client sees the change."""

    def __init__(self, project: str = "test-project") -> None:
        super().__init__()
        self.project = project
        self.zones: dict[str, str] = {}  # zone -> region
        self.accelerator_types: dict[str, list[dict[str, Any]]] = {}
        self.machine_types: dict[str, list[dict[str, Any]]] = {}
        self.region_quotas: dict[str, list[dict[str, Any]]] = {}
        self.migs: dict[tuple[str, str], Mig] = {}
        self.operations: dict[tuple[str, str], dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self.route("GET", _P + r"/zones", self._list_zones)
        self.route("GET", _P + r"/regions/(?P<region>[^/]+)", self._get_region)
        self.route("GET", _Z + r"/acceleratorTypes", self._list_accelerators)
        self.route("GET", _Z + r"/machineTypes", self._list_machine_types)
        self.route("GET", _IGM, self._get_mig)
        self.route("POST", _IGM + r"/resize", self._resize)
        self.route("POST", _IGM + r"/listManagedInstances", self._list_managed)
        self.route("GET", _Z + r"/operations/(?P<op>[^/]+)", self._get_operation)
        self.route("POST", _Z + r"/operations/(?P<op>[^/]+)/wait", self._get_operation)

    # ------------------------------------------------------------------ scenario helpers

    @classmethod
    def with_defaults(cls, project: str = "test-project") -> FakeGcpServer:
        """Two regions: us-central1 (H100 a3 + L4 g2 in -a, L4 only in -b) and europe-west4 (A100 a2)."""
        fake = cls(project)
        fake.add_zone(
            "us-central1-a",
            accelerators={"nvidia-h100-80gb": 8, "nvidia-l4": 8},
            machines={
                "a3-highgpu-8g": (208, 1_916_928, "nvidia-h100-80gb", 8),
                "g2-standard-48": (48, 196_608, "nvidia-l4", 4),
                "n2-standard-8": (8, 32_768, None, 0),
            },
        )
        fake.add_zone(
            "us-central1-b", accelerators={"nvidia-l4": 8}, machines={"g2-standard-48": (48, 196_608, "nvidia-l4", 4)}
        )
        fake.add_zone(
            "europe-west4-a",
            accelerators={"nvidia-tesla-a100": 16},
            machines={"a2-highgpu-8g": (96, 696_320, "nvidia-tesla-a100", 8)},
        )
        fake.set_quota("us-central1", "NVIDIA_H100_GPUS", limit=16, usage=8)
        fake.set_quota("us-central1", "PREEMPTIBLE_NVIDIA_H100_GPUS", limit=0, usage=0)
        fake.set_quota("us-central1", "NVIDIA_L4_GPUS", limit=32, usage=0)
        fake.set_quota("us-central1", "CPUS", limit=2400, usage=208)
        fake.set_quota("europe-west4", "NVIDIA_A100_GPUS", limit=8, usage=0)
        return fake

    def add_zone(
        self, zone: str, *, accelerators: dict[str, int], machines: dict[str, tuple[int, int, str | None, int]]
    ) -> None:
        """Add a zone; machines map name -> (vCPUs, memory MB, accelerator type or None, count)."""
        region = zone.rsplit("-", 1)[0]
        self.zones[zone] = region
        self.region_quotas.setdefault(region, [])
        base = f"https://www.googleapis.com/compute/v1/projects/{self.project}/zones/{zone}"
        self.accelerator_types[zone] = [
            {
                "kind": "compute#acceleratorType",
                "name": name,
                "zone": base,
                "maximumCardsPerInstance": n,
                "description": name.replace("nvidia-", "NVIDIA ").upper(),
                "selfLink": f"{base}/acceleratorTypes/{name}",
            }
            for name, n in accelerators.items()
        ]
        self.machine_types[zone] = [
            {
                "kind": "compute#machineType",
                "name": name,
                "zone": zone,
                "guestCpus": cpus,
                "memoryMb": mem,
                **({"accelerators": [{"guestAcceleratorType": acc, "guestAcceleratorCount": count}]} if acc else {}),
            }
            for name, (cpus, mem, acc, count) in machines.items()
        ]

    def set_quota(self, region: str, metric: str, *, limit: float, usage: float) -> None:
        quotas = [q for q in self.region_quotas.setdefault(region, []) if q["metric"] != metric]
        quotas.append({"metric": metric, "limit": limit, "usage": usage})
        self.region_quotas[region] = quotas

    def add_mig(self, zone: str, name: str, *, machine_type: str, size: int) -> Mig:
        mig = Mig(name=name, zone=zone, machine_type=machine_type)
        self.migs[(zone, name)] = mig
        self._set_size(mig, size)
        self.settle(zone, name)
        return mig

    def settle(self, zone: str, name: str) -> None:
        """Finish provisioning: every CREATING instance of the group becomes RUNNING."""
        with self.lock:
            for inst in self.migs[(zone, name)].instances:
                if inst["currentAction"] == "CREATING":
                    inst.update(currentAction="NONE", instanceStatus="RUNNING")

    def fail_next_resize(
        self,
        zone: str,
        name: str,
        *,
        http_status: int,
        reason: str,
        message: str = "injected",
        as_operation: bool = False,
    ) -> None:
        """Make the next resize of this group fail like Compute Engine does."""
        self.migs[(zone, name)].fail_next = {
            "status": http_status,
            "reason": reason,
            "message": message,
            "operation": as_operation,
        }

    # ------------------------------------------------------------------ handlers

    def _check_project(self, req: Request) -> None:
        if req.match["project"] != self.project:
            raise HttpError(403, _error(403, "forbidden", f"no access to project {req.match['project']}"))

    def _list_zones(self, req: Request) -> dict[str, Any]:
        self._check_project(req)
        link = f"https://www.googleapis.com/compute/v1/projects/{self.project}"
        return {
            "kind": "compute#zoneList",
            "items": [
                {"kind": "compute#zone", "name": z, "status": "UP", "region": f"{link}/regions/{r}"}
                for z, r in sorted(self.zones.items())
            ],
        }

    def _get_region(self, req: Request) -> dict[str, Any]:
        self._check_project(req)
        region = req.match["region"]
        if region not in self.region_quotas:
            raise HttpError(404, _error(404, "notFound", f"The resource 'regions/{region}' was not found"))
        return {
            "kind": "compute#region",
            "name": region,
            "status": "UP",
            "quotas": self.region_quotas[region],
            "zones": [z for z, r in sorted(self.zones.items()) if r == region],
        }

    def _zone(self, req: Request) -> str:
        self._check_project(req)
        zone = req.match["zone"]
        if zone not in self.zones:
            raise HttpError(404, _error(404, "notFound", f"The resource 'zones/{zone}' was not found"))
        return zone

    def _list_accelerators(self, req: Request) -> dict[str, Any]:
        return {"kind": "compute#acceleratorTypeList", "items": self.accelerator_types[self._zone(req)]}

    def _list_machine_types(self, req: Request) -> dict[str, Any]:
        return {"kind": "compute#machineTypeList", "items": self.machine_types[self._zone(req)]}

    def _mig(self, req: Request) -> Mig:
        zone = self._zone(req)
        mig = self.migs.get((zone, req.match["igm"]))
        if mig is None:
            raise HttpError(
                404, _error(404, "notFound", f"The resource 'instanceGroupManagers/{req.match['igm']}' was not found")
            )
        return mig

    def _get_mig(self, req: Request) -> dict[str, Any]:
        mig = self._mig(req)
        creating = sum(1 for i in mig.instances if i["currentAction"] == "CREATING")
        return {
            "kind": "compute#instanceGroupManager",
            "name": mig.name,
            "zone": mig.zone,
            "targetSize": mig.target_size,
            "baseInstanceName": mig.name,
            "instanceTemplate": f"global/instanceTemplates/{mig.name}-{mig.machine_type}",
            "currentActions": {"creating": creating, "none": len(mig.instances) - creating, "deleting": 0},
            "status": {"isStable": creating == 0},
        }

    def _set_size(self, mig: Mig, size: int) -> None:
        while len(mig.instances) < size:
            n = next(self._ids)
            mig.instances.append(
                {
                    "instance": f"zones/{mig.zone}/instances/{mig.name}-{n:04d}",
                    "currentAction": "CREATING",
                    "instanceStatus": "PROVISIONING",
                }
            )
        del mig.instances[size:]
        mig.target_size = size

    def _resize(self, req: Request) -> dict[str, Any]:
        mig = self._mig(req)
        size = int(req.query.get("size", "-1"))
        if size < 0:
            raise HttpError(400, _error(400, "invalid", "Invalid value for field 'size'"))
        op_name = f"operation-{next(self._ids)}"
        op: dict[str, Any] = {
            "kind": "compute#operation",
            "name": op_name,
            "operationType": "compute.instanceGroupManagers.resize",
            "zone": mig.zone,
            "targetLink": mig.name,
            "status": "DONE",
            "progress": 100,
        }
        failure, mig.fail_next = mig.fail_next, None
        if failure and not failure["operation"]:
            raise HttpError(failure["status"], _error(failure["status"], failure["reason"], failure["message"]))
        if failure:
            op.update(
                httpErrorStatusCode=failure["status"],
                httpErrorMessage=failure["message"],
                error={"errors": [{"code": failure["reason"], "message": failure["message"]}]},
            )
        else:
            self._set_size(mig, size)
        self.operations[(mig.zone, op_name)] = op
        return op

    def _list_managed(self, req: Request) -> dict[str, Any]:
        return {"managedInstances": [dict(i) for i in self._mig(req).instances]}

    def _get_operation(self, req: Request) -> dict[str, Any]:
        op = self.operations.get((self._zone(req), req.match["op"]))
        if op is None:
            raise HttpError(404, _error(404, "notFound", f"operation {req.match['op']} not found"))
        return op

    # ------------------------------------------------------------------ clients

    def client(self, client_class: Any) -> Any:
        """A REAL google-cloud-compute client of `client_class`, talking REST to this fake."""
        from google.auth.credentials import AnonymousCredentials

        transport_class = client_class.get_transport_class("rest")
        transport = transport_class(
            host=f"127.0.0.1:{self.port}", credentials=AnonymousCredentials(), url_scheme="http"
        )
        return client_class(transport=transport)


def _error(status: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"reason": reason, "message": message, "domain": "global"}],
        }
    }
