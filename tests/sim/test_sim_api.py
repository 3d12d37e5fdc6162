"""The simulator's and the workload library's public API: every module lists what it exports, and nothing else is public."""

from __future__ import annotations

import importlib

import pytest

MODULES = [
    *(
        f"gpufleet.router.sim.{m}"
        for m in ("trace", "fleet", "policies", "engine", "metrics", "report", "capacity", "live")
    ),
    *(
        f"gpufleet.router.workloads.{m}"
        for m in ("types", "sampling", "generators", "mixed", "ceiling", "driver", "stats")
    ),
]


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_exactly_the_public_names_defined_here(name: str) -> None:
    mod = importlib.import_module(name)
    for export in mod.__all__:
        assert hasattr(mod, export), export
    defined = {
        n for n, v in vars(mod).items() if not n.startswith("_") and getattr(v, "__module__", None) == mod.__name__
    }
    assert defined <= set(mod.__all__)


def test_importing_the_simulator_pulls_no_cloud_sdk_or_pulumi() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import gpufleet.router.sim.engine, gpufleet.router.sim.report, gpufleet.router.sim.trace;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('pulumi','boto3','google','kubernetes')]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
