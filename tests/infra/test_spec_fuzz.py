"""Random YAML never escapes as anything but the validation error."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpufleet.infra import plan, spec
from tests.infra.conftest import BASE

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True), st.text(max_size=12))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def _compile(text: str) -> None:
    try:
        fleet, smap = spec.load_text(text, "fuzz.yaml")
        plan.compile_fleet(fleet, smap)
    except spec.FleetError as exc:
        assert exc.issues and all(i.file == "fuzz.yaml" for i in exc.issues)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_random_documents_fail_only_with_fleet_error(doc):
    _compile(yaml.safe_dump(doc))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["nodepools", "deployments", "clouds", "router", "fleet"]),
    st.integers(0, 1),
    st.text(max_size=12),
    values,
)
def test_mutated_valid_documents_fail_only_with_fleet_error(section, index, key, value):
    doc = yaml.safe_load(BASE)
    target = doc.setdefault(section, {})
    if isinstance(target, list):
        target = target[min(index, len(target) - 1)]
    if isinstance(target, dict):
        target[key or "name"] = value
    else:
        doc[section] = value
    _compile(yaml.safe_dump(doc))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_random_text_fails_only_with_fleet_error(text):
    _compile(text)
