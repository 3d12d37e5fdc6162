"""What `gpufleet discover` and `gpufleet catalog refresh` ask the clouds, in one place.

`connect(cloud, ...)` builds an adapter; `discover(adapter, regions, ...)` walks regions and
zones and joins offerings, live spot prices and quota headroom into `DiscoveredMachine`s;
`catalog_document(...)` turns those into a user catalog file in the bundled catalog's format.
"""

from __future__ import annotations

import datetime as _dt
import os
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gpufleet.provider_adapters import base, errors

__all__ = ["GCP_ENDPOINT_ENV", "DiscoveredMachine", "catalog_document", "connect", "discover", "dump", "regions_of"]

# Points the GCP adapter at a Compute Engine emulator (plain HTTP, anonymous credentials).
GCP_ENDPOINT_ENV = "GPUFLEET_GCP_ENDPOINT"


def connect(cloud: str, *, project: str | None = None) -> base.ProviderAdapter:
    """An adapter for `cloud` with the environment's usual credentials."""
    if cloud == "aws":
        from gpufleet.provider_adapters import aws

        return aws.AwsAdapter()
    if cloud == "gcp":
        from gpufleet.provider_adapters import gcp

        project = project or os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT")
        if not project:
            raise errors.InvalidRequest(
                "GCP needs a project: --project or GOOGLE_CLOUD_PROJECT", cloud="gcp", code="MissingProject"
            )
        endpoint = os.environ.get(GCP_ENDPOINT_ENV)
        return gcp.GcpAdapter(project, client_factory=gcp.emulator_factory(endpoint) if endpoint else None)
    raise errors.InvalidRequest(f"unknown cloud {cloud!r}; allowed: aws, gcp", cloud=cloud, code="UnknownCloud")


@dataclass(frozen=True)
class DiscoveredMachine:
    """One GPU machine type in one region, with its live spot price and quota headroom."""

    offering: base.GpuOffering
    spot_usd_per_h: float | None  # median over the region's zones; None: not known live
    quota_name: str | None
    quota_headroom_nodes: int | None  # machines the free quota allows; None: unknown

    def as_json(self) -> dict[str, Any]:
        return {
            **self.offering.model_dump(mode="json"),
            "spot_usd_per_h": self.spot_usd_per_h,
            "quota": self.quota_name,
            "quota_headroom_nodes": self.quota_headroom_nodes,
        }


def _headroom(
    adapter: base.ProviderAdapter, offering: base.GpuOffering, quotas: list[base.QuotaInfo]
) -> tuple[str | None, int | None]:
    if offering.cloud == "aws":
        from gpufleet.provider_adapters import aws

        code = aws.gpu_quota_code(offering.machine_type)
        quota = next((q for q in quotas if q.name == code), None)
        per_node = offering.vcpus
    else:
        quota = next((q for q in quotas if not q.spot and offering.gpu_model in q.applies_to), None)
        per_node = offering.gpu_count
    if quota is None or quota.headroom is None or per_node <= 0:
        return (quota.name if quota else None), None
    return quota.name, int(quota.headroom // per_node)


def discover(
    adapter: base.ProviderAdapter,
    regions: Iterable[str],
    *,
    gpu: str | None = None,
    on_region: Callable[[str], None] | None = None,
    on_zone: Callable[[str], None] | None = None,
    notes: list[str] | None = None,
) -> list[DiscoveredMachine]:
    """Offerings of every region, joined with live spot prices and quota headroom.

    Prices and quotas that cannot be read leave None and add a line to `notes`; offerings that
    cannot be read raise (without them there is nothing to show).
    """
    out: list[DiscoveredMachine] = []
    for region in regions:
        offerings = adapter.offerings(region, gpu=gpu, progress=on_zone)
        spot: dict[str, list[float]] = {}
        if offerings:
            try:
                for quote in adapter.prices(region, [o.machine_type for o in offerings]):
                    if quote.spot_usd_per_h is not None:
                        spot.setdefault(quote.machine_type, []).append(quote.spot_usd_per_h)
            except errors.AdapterError as exc:
                if notes is not None and exc.message not in notes:
                    notes.append(exc.message)
        try:
            quotas = adapter.quotas(region) if offerings else []
        except errors.AdapterError as exc:
            quotas = []
            if notes is not None:
                notes.append(f"quotas in {region}: {exc}")
        for offering in offerings:
            name, headroom = _headroom(adapter, offering, quotas)
            prices = spot.get(offering.machine_type)
            out.append(DiscoveredMachine(offering, statistics.median(prices) if prices else None, name, headroom))
        if on_region:
            on_region(region)
    return out


def catalog_document(
    cloud: str, found: list[DiscoveredMachine], reference: Any, *, reference_region: str, skipped: list[str]
) -> dict[str, Any]:
    """A user catalog (`gpufleet.catalog.machines/v1`) from live facts.

    Live APIs give GPU facts, regions and spot prices; on-demand prices have no live source here
    (see `base.CANNOT_DO` and the AWS module), so each machine keeps the on-demand price of
    `reference` (the bundled catalog). Machines it does not price are left out and named in
    `skipped`.
    """
    by_machine: dict[str, list[DiscoveredMachine]] = {}
    for item in found:
        by_machine.setdefault(item.offering.machine_type, []).append(item)
    machines: dict[str, Any] = {}
    for name, items in sorted(by_machine.items()):
        first = items[0].offering
        known = reference.machine(cloud, name)
        if known is None:
            skipped.append(f"{name} ({first.gpu_model}): no on-demand price in the bundled catalog")
            continue
        at_ref = [i.spot_usd_per_h for i in items if i.offering.region == reference_region and i.spot_usd_per_h]
        anywhere = [i.spot_usd_per_h for i in items if i.spot_usd_per_h]
        spot = statistics.median(at_ref) if at_ref else (min(anywhere) if anywhere else known.spot_usd_per_hour)
        machines[name] = {
            # The catalog's own GPU name wins: it keys the GPU facts the planner uses.
            "gpu": known.gpu if reference.gpu(first.gpu_model) is None else first.gpu_model,
            "gpus": first.gpu_count,
            "vcpus": first.vcpus,
            "ram_gib": first.ram_gib,
            "usd_per_hour": known.usd_per_hour,
            "spot_usd_per_hour": spot,
            "regions": sorted({i.offering.region for i in items}),
        }
    today = _dt.date.today().isoformat()
    return {
        "schema": "gpufleet.catalog.machines/v1",
        "cloud": cloud,
        "as_of": today,
        "reference_region": reference_region,
        "sources": [
            f"live {cloud} APIs via gpufleet catalog refresh, {today}",
            f"on-demand prices: bundled catalog as of {reference.as_of}",
        ],
        "machines": machines,
    }


def regions_of(reference: Any, cloud: str) -> list[str]:
    """Regions the reference catalog lists for `cloud`'s machines (a bounded default walk)."""
    regions: set[str] = set()
    for (c, _), machine in reference.machines.items():
        if c == cloud:
            regions.update(machine.regions)
    return sorted(regions)


def dump(document: Mapping[str, Any]) -> str:
    """YAML text of a catalog document, machines one per line like the bundled files."""
    import yaml

    head = {k: v for k, v in document.items() if k != "machines"}
    text = f"# Written by `gpufleet catalog refresh --cloud {document['cloud']}`; edit or re-run to update.\n"
    text += yaml.safe_dump(head, sort_keys=False)
    text += "machines:\n"
    for name, facts in document["machines"].items():
        text += f"  {name}: {yaml.safe_dump(facts, default_flow_style=True, sort_keys=False, width=10_000).strip()}\n"
    return text
