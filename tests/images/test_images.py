"""The image definitions without building them: pinned inputs, one version for every tag and
default reference, the locks in step with pyproject.toml and with the tested environment."""

from __future__ import annotations

import ast
import json
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from gpufleet.infra import manifests, version
from gpufleet.infra.plan import compile_file
from tests.images import lockfiles

REPO = Path(__file__).resolve().parents[2]
IMAGES = ("router", "controller")
# What each image installs besides gpufleet's base dependencies.
IMAGE_EXTRAS = {"router": {"router", "kubernetes"}, "controller": {"controller"}}
CLOUD_OR_PULUMI = re.compile(r"^(boto3|botocore|s3transfer|google-.*|grpcio.*|pulumi.*|moto)$")


def _containerfile(name: str) -> str:
    return (REPO / "images" / name / "Containerfile").read_text()


def _final_stage(text: str) -> str:
    return text[[m.start() for m in re.finditer(r"^FROM ", text, re.M)][-1] :]


@pytest.mark.parametrize("name", IMAGES)
def test_containerfile_pins_its_base_by_digest_and_runs_as_a_numeric_user(name: str) -> None:
    text = _containerfile(name)
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base, "the base image is one ARG"
    assert re.fullmatch(r"\S+:3\.11[.\d]*-slim-bookworm@sha256:[0-9a-f]{64}", base.group(1))
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) >= 2 and all(f == "${BASE_IMAGE}" for f in froms)  # multi-stage, one base
    final = _final_stage(text)
    user = re.findall(r"^USER (\S+)$", final, re.M)
    assert user and re.fullmatch(r"[1-9]\d*:[1-9]\d*", user[-1])
    entry = re.search(r"^ENTRYPOINT (.+)$", final, re.M)
    assert entry and json.loads(entry.group(1)) == ["/opt/gpufleet/bin/gpufleet"]  # exec form: PID 1 gets SIGTERM
    assert json.loads(re.search(r"^CMD (.+)$", final, re.M).group(1))[0] == name  # type: ignore[union-attr]
    # Nothing is compiled or fetched by a package manager in the image that ships.
    assert not re.search(r"apt-get|apk |gcc|build-essential|pip install", final)
    for label in ("version", "source", "licenses", "revision"):
        assert f"org.opencontainers.image.{label}=" in final
    assert 'image.source="https://github.com/gpufleet/gpufleet"' in final and version.SOURCE_URL in final


def test_both_images_share_one_base() -> None:
    bases = {re.search(r"^ARG BASE_IMAGE=(\S+)$", _containerfile(n), re.M).group(1) for n in IMAGES}  # type: ignore[union-attr]
    assert len(bases) == 1


@pytest.mark.parametrize("name", IMAGES)
def test_containerfile_installs_its_own_lock_without_resolving(name: str) -> None:
    text = _containerfile(name)
    assert f"COPY images/locks/{name}.txt /locks/{name}.txt" in text
    installs = re.findall(r"pip --python /opt/gpufleet/bin/python install ([^\\\n]+)", text)
    assert installs and all("--no-deps" in i for i in installs)
    assert any(f"-r /locks/{name}.txt" in i for i in installs)
    assert "check" in text.split("install --no-deps /wheels/gpufleet-*.whl", 1)[1].split("\n", 2)[1]
    # The build refuses a VERSION build-arg that is not the wheel's (the label would lie).
    assert '[ "$built" = "$VERSION" ]' in text


def test_build_context_has_every_package_folder_and_no_local_environment() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "build", "*.egg-info"} <= ignored
    assert not any(line.startswith("!") or line == "*" for line in ignored)
    setup_py = (REPO / "setup.py").read_text()
    folders = ast.literal_eval(re.search(r"^FOLDERS = (\{.*?\})", setup_py, re.M | re.S).group(1))  # type: ignore[union-attr]
    assert "infra" in folders.values()
    assert not set(folders.values()) & ignored, "a package folder would be missing from the images' wheel"
    for name in IMAGES:
        assert "COPY . ." in _containerfile(name)


def test_package_version_image_tags_and_default_references_are_one_version() -> None:
    assert metadata.version("gpufleet") == version.__version__
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gpufleet.infra.version.__version__"}
    options = manifests.ManifestOptions()
    assert options.router_image == f"{version.IMAGE_REGISTRY}/gpufleet-router:{version.__version__}"
    assert options.controller_image == f"{version.IMAGE_REGISTRY}/gpufleet-controller:{version.__version__}"
    # images/build.sh and images/rootfs.sh read the same two lines of infra/version.py.
    text = (REPO / "infra" / "version.py").read_text()
    assert re.search(rf'^__version__ = "{re.escape(version.__version__)}"$', text, re.M)
    assert re.search(rf'^IMAGE_REGISTRY = "{re.escape(version.IMAGE_REGISTRY)}"$', text, re.M)


def _deployment_images(options: manifests.ManifestOptions) -> set[str]:
    plan = compile_file(REPO / "stacks" / "multicloud" / "fleet.yaml")
    return {
        c["image"]
        for objs in manifests.all_objects(plan, options).values()
        for obj in objs
        if obj["kind"] == "Deployment"
        for c in obj["spec"]["template"]["spec"]["containers"]
    }


def test_rendered_manifests_use_the_versioned_images_unless_told_otherwise() -> None:
    assert {version.ROUTER_IMAGE, version.CONTROLLER_IMAGE} <= _deployment_images(manifests.ManifestOptions())
    mine = manifests.ManifestOptions(router_image="reg.example/r:1", controller_image="reg.example/c:1")
    images = _deployment_images(mine)
    assert {"reg.example/r:1", "reg.example/c:1"} <= images
    assert not {version.ROUTER_IMAGE, version.CONTROLLER_IMAGE} & images


# ---------------------------------------------------------------------------------------------
# Locks


def _requirements(extras: set[str]) -> list[Requirement]:
    """gpufleet's requirements for these extras, self-references (gpufleet[...]) expanded."""
    reqs = [Requirement(r) for r in metadata.requires("gpufleet") or []]
    wanted, out, seen = set(extras), [], set()
    while wanted - seen:
        extra = (wanted - seen).pop()
        seen.add(extra)
        for req in reqs:
            if req.marker is None or not req.marker.evaluate({"extra": extra}):
                continue
            if lockfiles.canonical(req.name) == "gpufleet":
                wanted |= req.extras
            else:
                out.append(req)
    out += [r for r in reqs if r.marker is None]
    return out


@pytest.mark.parametrize("name", [*IMAGES, "dev"])
def test_lock_satisfies_pyproject(name: str) -> None:
    path = lockfiles.LOCK_DIR / f"{name}.txt"
    assert lockfiles.extras_of(path) == lockfiles.LOCKS[name]
    pins = lockfiles.read_lock(path)
    for req in _requirements(set(lockfiles.LOCKS[name].split(","))):
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        pinned = pins.get(lockfiles.canonical(req.name))
        assert pinned is not None, f"{req.name} is required but not in {path.name}: run `make lock`"
        assert req.specifier.contains(pinned, prereleases=True), f"{req} vs {pinned} in {path.name}: run `make lock`"


@pytest.mark.parametrize("name", IMAGES)
def test_image_locks_pin_the_versions_the_tests_run_with(name: str) -> None:
    dev = lockfiles.read_lock(lockfiles.LOCK_DIR / "dev.txt")
    pins = lockfiles.read_lock(lockfiles.LOCK_DIR / f"{name}.txt")
    assert {n: v for n, v in pins.items() if dev.get(n) != v} == {}
    # The same marker lines (e.g. what Python < 3.11.3 needs), so every interpreter gets the same set.
    old = lockfiles.marker_environment("3.11.2")
    assert set(lockfiles.read_lock(lockfiles.LOCK_DIR / f"{name}.txt", old)) >= set(pins)


def test_router_lock_has_no_cloud_sdk_and_no_pulumi() -> None:
    pins = lockfiles.read_lock(lockfiles.LOCK_DIR / "router.txt")
    assert [n for n in pins if CLOUD_OR_PULUMI.match(n)] == []
    assert {"aiohttp", "kubernetes", "xxhash"} <= set(pins)


def test_test_environment_is_the_dev_lock() -> None:
    installed = {lockfiles.canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    pins = lockfiles.read_lock(lockfiles.LOCK_DIR / "dev.txt")
    differ = {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n) != v}
    assert differ == {}, f"installed differs from images/locks/dev.txt (lock, installed): {differ}; run `make install`"
    unpinned = sorted(set(installed) - set(pins) - {"gpufleet", "pip", "setuptools", "wheel"})
    assert unpinned == [], f"installed but not in images/locks/dev.txt: {unpinned}; run `make lock`"


def test_router_and_controller_pods_have_a_read_only_root_and_a_writable_tmp() -> None:
    plan = compile_file(REPO / "stacks" / "multicloud" / "fleet.yaml")
    pods = {
        c["name"]: (c, obj["spec"]["template"]["spec"])
        for objs in manifests.all_objects(plan).values()
        for obj in objs
        if obj["kind"] == "Deployment"
        for c in obj["spec"]["template"]["spec"]["containers"]
    }
    for name in IMAGES:
        container, pod = pods[name]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["runAsUser"] == 65532  # the images' USER
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert len(tmp) == 1 and not tmp[0].get("readOnly")
        (volume,) = [v for v in pod["volumes"] if v["name"] == tmp[0]["name"]]
        assert "emptyDir" in volume
