"""The one place the version lives: the distribution's version (pyproject.toml reads it from here,
`[tool.setuptools.dynamic]`), the image tags `make images` builds, and the default image references
of the manifests and the Pulumi components. Bumping `__version__` moves all of them together.

Imports nothing, so the build backend, the Makefile and the image scripts can read it without
installing anything.
"""

from __future__ import annotations

__all__ = ["CONTROLLER_IMAGE", "IMAGE_REGISTRY", "ROUTER_IMAGE", "SOURCE_URL", "__version__", "image"]

__version__ = "0.1.0"

# Where released images are pushed; users push their own (`make images REGISTRY=...`) and set the
# stack config keys `routerImage` / `controllerImage` (docs/pulumi.md).
IMAGE_REGISTRY = "ghcr.io/gpufleet"
SOURCE_URL = "https://github.com/gpufleet/gpufleet"


def image(component: str, registry: str = IMAGE_REGISTRY, tag: str = __version__) -> str:
    """The reference of one of the project's images: `<registry>/gpufleet-<component>:<tag>`."""
    return f"{registry.rstrip('/')}/gpufleet-{component}:{tag}"


ROUTER_IMAGE = image("router")
CONTROLLER_IMAGE = image("controller")
