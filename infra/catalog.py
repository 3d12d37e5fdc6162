"""Facts about GPU machines and models: bundled data files, extendable by the user's own.

The catalog answers planning questions (what GPU does this machine type carry, what does
it cost per hour, which regions offer it, how many KV bytes does a token of this model
take) quickly and without credentials. Acting on clouds lives in provider_adapters.

A user catalog file has the same shape as the bundled ones and may hold any of the
sections `gpus`, `machines` (with `cloud`), `models`; its entries override bundled ones
with the same key.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "Catalog",
    "CatalogError",
    "GpuModel",
    "HostLink",
    "MachineType",
    "NetworkDisk",
    "ModelInfo",
    "bundled",
    "load",
    "machine_family",
]

GIB = 1024**3
Cloud = Literal["aws", "gcp"]


class CatalogError(Exception):
    """A catalog file is missing or malformed."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuModel(_Frozen):
    name: str
    memory_gib: float = Field(gt=0)
    bf16_tflops: float = Field(gt=0, description="dense BF16 tensor peak")
    memory_bandwidth_gbps: float = Field(gt=0)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)


class MachineType(_Frozen):
    cloud: Cloud
    name: str
    gpu: str
    gpus: int = Field(ge=1)
    vcpus: int = Field(ge=1)
    ram_gib: float = Field(gt=0)
    usd_per_hour: float = Field(ge=0, description="on-demand, reference region")
    spot_usd_per_hour: float | None = Field(None, ge=0, description="spot estimate, reference region")
    regions: tuple[str, ...] = ()
    local_nvme_gib: float = Field(0, ge=0, description="instance-store NVMe per node (0: none)")
    max_pods: int | None = Field(
        None, ge=1, description="EKS: pods per node the VPC CNI allows (eni-max-pods); sizes the kubelet's reservation"
    )


class HostLink(_Frozen):
    """How fast a GPU of a machine family reads host memory (a CPU-tier KV hit), and local NVMe."""

    pcie_gen: int = Field(ge=3, le=6)
    host_to_device_gb_per_s: float = Field(gt=0, description="effective per GPU, pinned host memory")
    nvme_read_gb_per_s: float = Field(2.0, gt=0, description="local NVMe read per node")
    source: str


class NetworkDisk(_Frozen):
    """The cloud's block storage, when a disk tier does not fit the node's local NVMe."""

    name: str
    usd_per_gib_month: float = Field(ge=0)
    read_gb_per_s: float = Field(gt=0)
    source: str


def machine_family(name: str) -> str:
    """`g6e.12xlarge` -> `g6e`, `a3-highgpu-8g` -> `a3`."""
    return name.replace("-", ".").split(".")[0]


# When the catalog has no link for a machine (an existing cluster's own nodes): PCIe Gen4 x16.
DEFAULT_HOST_LINK = HostLink(
    pcie_gen=4, host_to_device_gb_per_s=25.0, nvme_read_gb_per_s=2.0, source="assumed: PCIe Gen4 x16"
)


class ModelInfo(_Frozen):
    name: str
    params_b: float = Field(gt=0, description="parameters, billions")
    layers: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    max_context: int = Field(ge=1)
    weight_bytes_per_param: float = Field(2.0, gt=0, description="2 at bf16")
    kv_bytes_per_element: float = Field(2.0, gt=0, description="2 at bf16/fp16 KV cache")

    @property
    def weight_bytes(self) -> int:
        return round(self.params_b * 1e9 * self.weight_bytes_per_param)

    @property
    def kv_bytes_per_token(self) -> int:
        return int(2 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes_per_element)


class Catalog:
    """Lookups over GPU models, machine types (per cloud) and models."""

    def __init__(
        self,
        gpus: Mapping[str, GpuModel],
        machines: Mapping[tuple[str, str], MachineType],
        models: Mapping[str, ModelInfo],
        sources: Iterable[str] = (),
        as_of: str = "",
        host_links: Mapping[tuple[str, str], HostLink] | None = None,
        network_disks: Mapping[str, NetworkDisk] | None = None,
    ) -> None:
        self.as_of = as_of
        self.host_links = dict(host_links or {})
        self.network_disks = dict(network_disks or {})
        self.gpus = dict(gpus)
        self.machines = dict(machines)
        self.models = dict(models)
        self.sources = tuple(sources)
        # Machine names are unique across the clouds we ship, so `local` pools can name any.
        self._by_name: dict[str, MachineType] = {}
        for (_, name), m in sorted(self.machines.items()):
            self._by_name.setdefault(name, m)

    def machine(self, cloud: str, name: str) -> MachineType | None:
        """The machine type `name` of `cloud`; a `local` pool may name any cloud's machine."""
        if cloud == "local":
            return self._by_name.get(name)
        if cloud == "kubernetes":
            # An existing cluster's nodes may be any machine; the name is looked up everywhere.
            return self._by_name.get(name)
        return self.machines.get((cloud, name))

    def machine_names(self, cloud: str) -> list[str]:
        if cloud in ("local", "kubernetes"):
            return sorted(self._by_name)
        return sorted(n for (c, n) in self.machines if c == cloud)

    def host_link(self, machine: MachineType | None) -> HostLink:
        """The host-to-GPU link of the machine's family (DEFAULT_HOST_LINK when unknown)."""
        if machine is None:
            return DEFAULT_HOST_LINK
        return self.host_links.get((machine.cloud, machine_family(machine.name)), DEFAULT_HOST_LINK)

    def gpu(self, name: str) -> GpuModel | None:
        return self.gpus.get(name)

    def model(self, name: str) -> ModelInfo | None:
        return self.models.get(name)

    def extended(self, paths: Iterable[str | Path]) -> Catalog:
        """A new catalog with the user's files layered over this one."""
        gpus, machines, models = dict(self.gpus), dict(self.machines), dict(self.models)
        links, disks = dict(self.host_links), dict(self.network_disks)
        sources = list(self.sources)
        for path in paths:
            _merge_file(Path(path), gpus, machines, models, links, disks)
            sources.append(str(path))
        return Catalog(gpus, machines, models, sources, self.as_of, links, disks)


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"{origin}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{origin}: expected a mapping at the top level")
    return data


def _merge(
    data: dict[str, Any],
    origin: str,
    gpus: dict[str, GpuModel],
    machines: dict[tuple[str, str], MachineType],
    models: dict[str, ModelInfo],
    links: dict[tuple[str, str], HostLink],
    disks: dict[str, NetworkDisk],
) -> None:
    allowed = {
        "schema", "as_of", "sources", "cloud", "reference_region", "regions", "gpus", "machines", "models",
        "host_links", "network_disk",
    }  # fmt: skip
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise CatalogError(f"{origin}: unknown section(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    try:
        for name, facts in (data.get("gpus") or {}).items():
            gpus[str(name)] = GpuModel(name=str(name), **facts)
        machine_entries = data.get("machines") or {}
        if machine_entries and data.get("cloud") not in ("aws", "gcp"):
            raise CatalogError(f"{origin}: a file with `machines` needs `cloud: aws` or `cloud: gcp`")
        for name, facts in machine_entries.items():
            m = MachineType(cloud=data["cloud"], name=str(name), **facts)
            machines[(m.cloud, m.name)] = m
        if (data.get("host_links") or data.get("network_disk")) and data.get("cloud") not in ("aws", "gcp"):
            raise CatalogError(f"{origin}: `host_links` and `network_disk` need `cloud: aws` or `cloud: gcp`")
        for family, facts in (data.get("host_links") or {}).items():
            links[(data["cloud"], str(family))] = HostLink(**facts)
        if data.get("network_disk"):
            disks[data["cloud"]] = NetworkDisk(**data["network_disk"])
        for name, facts in (data.get("models") or {}).items():
            models[str(name)] = ModelInfo(name=str(name), **facts)
    except (ValidationError, TypeError) as exc:
        raise CatalogError(f"{origin}: {exc}") from None


def _merge_file(
    path: Path,
    gpus: dict[str, GpuModel],
    machines: dict[tuple[str, str], MachineType],
    models: dict[str, ModelInfo],
    links: dict[tuple[str, str], HostLink],
    disks: dict[str, NetworkDisk],
) -> None:
    try:
        text = path.read_text()
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read catalog file: {exc.strerror}") from None
    _merge(_read_yaml(text, str(path)), str(path), gpus, machines, models, links, disks)


@functools.cache
def bundled() -> Catalog:
    """The catalog shipped with gpufleet (cached: it is immutable)."""
    gpus: dict[str, GpuModel] = {}
    machines: dict[tuple[str, str], MachineType] = {}
    models: dict[str, ModelInfo] = {}
    links: dict[tuple[str, str], HostLink] = {}
    disks: dict[str, NetworkDisk] = {}
    pkg = resources.files("gpufleet.infra") / "data"
    sources, dates = [], []
    for name in ("gpus.yaml", "aws.yaml", "gcp.yaml", "models.yaml"):
        origin = f"gpufleet/infra/data/{name}"
        data = _read_yaml((pkg / name).read_text(), origin)
        _merge(data, origin, gpus, machines, models, links, disks)
        sources.append(origin)
        dates.append(str(data.get("as_of", "")))
    catalog = Catalog(gpus, machines, models, sources, as_of=min(dates), host_links=links, network_disks=disks)
    for m in catalog.machines.values():
        if m.gpu not in catalog.gpus:
            raise CatalogError(f"bundled catalog: machine {m.name} names unknown GPU {m.gpu}")
    return catalog


def load(extra: Iterable[str | Path] = ()) -> Catalog:
    """The bundled catalog, extended with the given user files."""
    extra = list(extra)
    return bundled().extended(extra) if extra else bundled()
