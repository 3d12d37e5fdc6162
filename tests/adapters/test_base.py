"""The adapter contract: one error map, the can't-do table, lazy SDK imports, and the docs that describe them."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.provider_adapters import base, errors
from gpufleet.provider_adapters import kubernetes as kube_adapter

DOCS = Path(__file__).resolve().parents[2] / "docs" / "adapters.md"


@pytest.mark.parametrize(("key", "expected"), list(errors.ERROR_CODES.items()), ids=lambda v: str(v))
def test_every_provider_code_maps_to_its_typed_error(key: tuple[str, str], expected: tuple[type, str]) -> None:
    cloud, code = key
    error = errors.map_error(cloud, code, "boom", region="r1", zone="r1-a")
    assert type(error) is expected[0] and error.blocks == expected[1]
    assert (error.cloud, error.code, error.region, error.zone) == (cloud, code, "r1", "r1-a")
    assert code in str(error) and "boom" in str(error)


def test_codes_match_case_insensitively_then_by_http_status() -> None:
    assert isinstance(errors.map_error("gcp", "quotaexceeded", "x"), errors.QuotaExceeded)
    fallback = errors.map_error("gcp", "somethingNew", "x", http_status=403)
    assert isinstance(fallback, errors.PermissionDenied) and fallback.code == "somethingNew"
    unknown = errors.map_error("aws", "Mystery", "x")
    assert type(unknown) is errors.AdapterError and unknown.blocks == "request"


def test_unsupported_verbs_quote_the_cannot_do_table() -> None:
    adapter = kube_adapter.KubernetesAdapter.__new__(kube_adapter.KubernetesAdapter)
    with pytest.raises(errors.Unsupported) as info:
        adapter.quotas("anywhere")
    assert base.CANNOT_DO[("kubernetes", "quotas")] in str(info.value) and info.value.blocks == "cloud"


def test_missing_sdk_names_the_extra_to_install() -> None:
    with pytest.raises(errors.SdkMissing, match=r"pip install 'gpufleet\[gcp\]'"):
        base.lazy_import("google.cloud.compute_v1_does_not_exist", cloud="gcp")


def test_gpu_names_are_normalised_across_clouds() -> None:
    assert base.normalise_gpu_name("nvidia-h100-80gb") == base.normalise_gpu_name("H100") == "H100"
    assert base.normalise_gpu_name("A100", 80) == "A100-80GB"
    assert base.gpu_matches("h100", "H100") and not base.gpu_matches("L4", "L40S")


def test_docs_list_every_error_code_and_cannot_do_entry() -> None:
    if not DOCS.exists():
        pytest.skip("docs/adapters.md not present")
    text = DOCS.read_text()
    missing = [code for (_, code) in errors.ERROR_CODES if f"`{code}`" not in text]
    missing += [f"{cloud}/{cap}" for (cloud, cap) in base.CANNOT_DO if f"| {cloud} | `{cap}` |" not in text]
    assert not missing, f"docs/adapters.md does not mention: {missing}"


def test_public_api_is_pinned() -> None:
    import importlib

    for name in ("base", "errors", "aws", "gcp", "kubernetes", "live", "failover", "discovery"):
        module = importlib.import_module(f"gpufleet.provider_adapters.{name}")
        assert module.__all__ and all(hasattr(module, attr) for attr in module.__all__), name
    assert {"check_plan", "LiveFinding"} <= set(importlib.import_module("gpufleet.provider_adapters.live").__all__)
