"""Run Pulumi programs under Pulumi's mocks (each in a fresh runtime context) and query what they registered."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.infra import plan as plan_mod
from gpufleet.infra.pulumi.preview import PreviewResource, PreviewResult, run_program

ROOT = Path(__file__).resolve().parents[2]
STACKS = ROOT / "stacks"


class Registered:
    """The resources one program run registered, with lookups by type and name."""

    def __init__(self, result: PreviewResult) -> None:
        self.result = result
        self.resources = result.resources

    def of_type(self, token: str) -> list[PreviewResource]:
        return [r for r in self.resources if r.type == token]

    def one(self, token: str, name: str | None = None) -> PreviewResource:
        found = [
            r
            for r in self.of_type(token)
            if name is None or r.name == name or r.inputs.get("metadata", {}).get("name") == name
        ]
        assert len(found) == 1, f"expected one {token} {name or ''}, found {[r.name for r in found]}"
        return found[0]

    def children(self, parent: str) -> list[PreviewResource]:
        return [r for r in self.resources if r.parent == parent]


def inline_fleet(stack: str) -> dict[str, Any]:
    """The declaration inline in an example stack's settings file."""
    data = yaml.safe_load((STACKS / stack / f"Pulumi.{stack}.yaml").read_text())
    return data["config"]["gpufleet:fleet"]


def compile_inline(stack: str) -> plan_mod.Plan:
    return plan_mod.compile_data(inline_fleet(stack), f"Pulumi.{stack}.yaml")


@pytest.fixture
def run() -> Callable[..., Registered]:
    """`run(program, config=..., secret_keys=...)` -> Registered."""

    def _run(program: Callable[[], Any], **kw: Any) -> Registered:
        return Registered(run_program(program, **kw))

    return _run


@pytest.fixture
def registrations(monkeypatch: pytest.MonkeyPatch) -> list[list[Any]]:
    """What each program run registered, even when the run raised: one list per run."""
    from gpufleet.infra.pulumi import mocks

    seen: list[list[Any]] = []
    real = mocks.mocks_and_monitor

    def spy() -> Any:
        mocks, monitor, records = real()
        seen.append(records)
        return mocks, monitor, records

    monkeypatch.setattr(mocks, "mocks_and_monitor", spy)
    return seen


@pytest.fixture(scope="session")
def eks_plan() -> plan_mod.Plan:
    return compile_inline("aws-eks")


@pytest.fixture(scope="session")
def gke_plan() -> plan_mod.Plan:
    return compile_inline("gcp-gke")


@pytest.fixture(scope="session")
def multicloud_plan() -> plan_mod.Plan:
    return plan_mod.compile_file(str(STACKS / "multicloud" / "fleet.yaml"))
