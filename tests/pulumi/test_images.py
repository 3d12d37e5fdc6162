"""The stack's image references: the versioned defaults of infra/version.py unless the stack
config names others (`gpufleet:routerImage`, `gpufleet:controllerImage`)."""

from __future__ import annotations

from typing import Any

from gpufleet.infra import version
from gpufleet.infra.pulumi import Fleet, FleetArgs, stack_config

DEPLOY = "kubernetes:apps/v1:Deployment"


def _images(reg: Any) -> dict[str, str]:
    """container name -> image, over every Deployment the program registered."""
    return {
        c["name"]: c["image"] for r in reg.of_type(DEPLOY) for c in r.inputs["spec"]["template"]["spec"]["containers"]
    }


def _program(plan: Any) -> Any:
    def program() -> None:
        args = stack_config.read()
        Fleet("f", FleetArgs(admin_token=args.admin_token, plan=plan, options=args.options))

    return program


def test_stack_without_image_config_runs_the_images_of_this_version(run, eks_plan) -> None:
    config = {"gpufleet:adminToken": "t", "gpufleet:fleetFile": "unused.yaml"}
    images = _images(run(_program(eks_plan), config=config, secret_keys=["gpufleet:adminToken"]))
    assert images["router"] == version.ROUTER_IMAGE
    assert images["controller"] == version.CONTROLLER_IMAGE
    assert version.ROUTER_IMAGE.endswith(f"/gpufleet-router:{version.__version__}")


def test_stack_image_config_replaces_both_images(run, eks_plan) -> None:
    config = {
        "gpufleet:adminToken": "t",
        "gpufleet:fleetFile": "unused.yaml",
        "gpufleet:routerImage": "registry.example/ml/gpufleet-router@sha256:" + "a" * 64,
        "gpufleet:controllerImage": "registry.example/ml/gpufleet-controller:0.1.0",
    }
    images = _images(run(_program(eks_plan), config=config, secret_keys=["gpufleet:adminToken"]))
    assert images["router"] == "registry.example/ml/gpufleet-router@sha256:" + "a" * 64
    assert images["controller"] == "registry.example/ml/gpufleet-controller:0.1.0"
