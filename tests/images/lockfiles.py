"""images/lock.py (a script, not a package module) loaded for the tests, plus marker helpers."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from packaging.markers import default_environment

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpufleet_images_lock", REPO / "images" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock = _load()
LOCK_DIR: Path = lock.LOCK_DIR
LOCKS: dict[str, str] = lock.LOCKS
canonical = lock.canonical
read_lock = lock.read_lock
extras_of = lock.extras_of


def marker_environment(python_full_version: str) -> dict[str, str]:
    """Marker variables of a CPython on Linux x86_64 of that version (like the image's)."""
    env = dict(default_environment())
    major_minor = ".".join(python_full_version.split(".")[:2])
    env.update(
        python_full_version=python_full_version, python_version=major_minor, implementation_version=python_full_version
    )
    return env
