"""Maps the fixed top-level folders onto the `gpufleet.*` namespace.

Everything else lives in pyproject.toml. Subpackages are found by walking each folder,
so adding one needs no edit here.
"""

import os

from setuptools import setup

FOLDERS = {
    "gpufleet.infra": "infra",
    "gpufleet.provider_adapters": "provider_adapters",
    "gpufleet.router": "router",
    "gpufleet.skills": "skills",  # data: the Agent Skills (`gpufleet skills install`)
}


def _packages() -> list[str]:
    found = []
    for name, folder in FOLDERS.items():
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            if "__init__.py" in files:
                rel = os.path.relpath(root, folder)
                found.append(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    return sorted(found)


setup(packages=_packages(), package_dir=FOLDERS)
