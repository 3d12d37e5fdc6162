"""Offline preview: run a Pulumi program in-process under Pulumi's own mocks.

`preview_stack(STACK_DIR)` reads the stack's `Pulumi.yaml` and `Pulumi.<stack>.yaml`, puts
their config into the mocked runtime, runs the stack's `__main__.py` and records every
resource the program registers (type token, name, parent, inputs) and the stack outputs.
No Pulumi CLI, no credentials and no network: the mocks (`gpufleet.infra.pulumi.mocks`)
answer resource registrations and the few data-source calls the components make.

Secrets never leave as values: every secret input or output is shown as `[secret]`.
Encrypted (`secure:`) stack values cannot be decrypted without the stack's secrets
provider, and project config declared `secret: true` may be unset in a fresh checkout;
both are given a placeholder value inside the preview, and the result says so.

Each run happens in a copy of the current `contextvars` context, so the Pulumi runtime's
global settings, config and root stack never leak from one run into the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import os
import runpy
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpufleet.infra.pulumi import mocks

__all__ = [
    "PreviewError",
    "PreviewResource",
    "PreviewResult",
    "StackSpec",
    "key_inputs",
    "load_stack",
    "preview_stack",
    "run_program",
]

PLACEHOLDER_SECRET = "gpufleet-preview-placeholder"  # a value no real secret has


class PreviewError(Exception):
    """The stack directory or its program is unusable for a preview (one clear message)."""


@dataclass(frozen=True)
class PreviewResource:
    """One registered resource: what `pulumi up` would create."""

    type: str
    name: str
    parent: str | None
    inputs: dict[str, Any]
    custom: bool
    provider: str | None = None  # the provider reference `urn::id`, for custom resources

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "parent": self.parent, "inputs": self.inputs}


@dataclass
class PreviewResult:
    project: str
    stack: str
    resources: list[PreviewResource]
    outputs: dict[str, Any]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StackSpec:
    """A stack directory read for a preview."""

    directory: Path
    project: str
    stack: str
    program: Path
    config: dict[str, str]
    secret_keys: list[str]
    notes: list[str]


# ---------------------------------------------------------------------------------------
# Reading a stack directory


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PreviewError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise PreviewError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None


def _full_key(project: str, key: str) -> str:
    return key if ":" in key else f"{project}:{key}"


def _wire(value: Any) -> str:
    """Config values reach a Pulumi program as strings; objects and lists as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def load_stack(directory: str | Path, stack: str | None = None) -> StackSpec:
    """Read `Pulumi.yaml`, the stack's settings file and the program's path."""
    d = Path(directory)
    if not d.is_dir():
        raise PreviewError(f"{d}: not a directory (give a stack directory with Pulumi.yaml)")
    project_file = d / "Pulumi.yaml"
    if not project_file.is_file():
        raise PreviewError(f"{d}: no Pulumi.yaml: not a Pulumi project directory")
    project = _read_yaml(project_file) or {}
    if not isinstance(project, dict) or not isinstance(project.get("name"), str):
        raise PreviewError(f"{project_file}: `name` (the project name) is required")
    runtime = project.get("runtime")
    runtime_name = runtime.get("name") if isinstance(runtime, dict) else runtime
    if runtime_name != "python":
        raise PreviewError(f"{project_file}: runtime is {runtime_name!r}; the preview runs python programs only")
    name = project["name"]
    main = project.get("main")
    program = d / (main or "__main__.py")
    if program.is_dir():
        program = program / "__main__.py"
    if not program.is_file():
        raise PreviewError(f"{program}: the stack's program is missing")

    stacks = sorted(p.name[len("Pulumi.") : -len(".yaml")] for p in d.glob("Pulumi.*.yaml"))
    if stack is None:
        if len(stacks) != 1:
            found = ", ".join(stacks) or "none"
            raise PreviewError(
                f"{d}: give --stack: the directory has {len(stacks)} stack settings files (found: {found})"
            )
        stack = stacks[0]
    settings_file = d / f"Pulumi.{stack}.yaml"
    if not settings_file.is_file():
        raise PreviewError(f"{settings_file}: no such stack settings file; stacks here: {', '.join(stacks) or 'none'}")
    settings = _read_yaml(settings_file) or {}
    if not isinstance(settings, dict):
        raise PreviewError(f"{settings_file}: expected a mapping with `config:`")

    config: dict[str, str] = {}
    secret_keys: list[str] = []
    notes: list[str] = []
    declared_secret: list[str] = []
    # Project-level config: values (`key: value` or `key: {value: ...}`) and schemas
    # (`key: {type:, default:, secret:}`) for the project's own namespace.
    for key, spec in (project.get("config") or {}).items():
        full = _full_key(name, str(key))
        if isinstance(spec, dict) and (
            "type" in spec or "default" in spec or "secret" in spec or "description" in spec
        ):
            if "default" in spec:
                config[full] = _wire(spec["default"])
            if spec.get("secret"):
                declared_secret.append(full)
        elif isinstance(spec, dict) and "value" in spec:
            config[full] = _wire(spec["value"])
        else:
            config[full] = _wire(spec)
    stack_config = settings.get("config") or {}
    if not isinstance(stack_config, dict):
        raise PreviewError(f"{settings_file}: config: expected a mapping of keys to values")
    for key, value in stack_config.items():
        full = _full_key(name, str(key))
        if isinstance(value, dict) and set(value) == {"secure"}:
            config[full] = PLACEHOLDER_SECRET
            secret_keys.append(full)
            notes.append(f"{full} is encrypted in {settings_file.name}: previewed with a placeholder")
        else:
            config[full] = _wire(value)
    for full in declared_secret:
        if full not in secret_keys:
            secret_keys.append(full)
            if full not in config:
                config[full] = PLACEHOLDER_SECRET
                notes.append(
                    f"{full} is not set yet (pulumi config set --secret {full.split(':', 1)[1]} ...): previewed with a placeholder"
                )
    return StackSpec(d.resolve(), name, stack, program.resolve(), config, secret_keys, notes)


# ---------------------------------------------------------------------------------------
# Running


@contextlib.contextmanager
def _cwd_and_path(directory: Path) -> Iterator[None]:
    """Pulumi runs a program from its project directory, with that directory importable."""
    old = os.getcwd()
    os.chdir(directory)
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        os.chdir(old)
        with contextlib.suppress(ValueError):
            sys.path.remove(str(directory))


def run_program(
    program: Callable[[], Any],
    *,
    project: str = "project",
    stack: str = "stack",
    config: Mapping[str, str] | None = None,
    secret_keys: list[str] | None = None,
) -> PreviewResult:
    """Run `program` under Pulumi's mocks in a fresh runtime context and record what it registers.

    Exceptions from the program propagate (after the runtime has settled).
    """
    # Pulumi's runtime asks asyncio for the thread's current loop; give each run its own
    # (another library may have left none set, e.g. after asyncio.run) and restore after.
    policy = asyncio.get_event_loop_policy()
    previous = policy._local._loop if hasattr(policy, "_local") else None
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return contextvars.copy_context().run(
            _run, program, project, stack, dict(config or {}), list(secret_keys or [])
        )
    finally:
        asyncio.set_event_loop(previous)
        loop.close()


def _run(
    program: Callable[[], Any], project: str, stack: str, config: dict[str, str], secret_keys: list[str]
) -> PreviewResult:
    import pulumi
    from pulumi.runtime import settings as settings_mod
    from pulumi.runtime.stack import run_pulumi_func
    from pulumi.runtime.sync_await import _sync_await

    mock, monitor, records = mocks.mocks_and_monitor()
    settings_mod.ROOT.set(None)  # a new root Stack for this run
    pulumi.runtime.set_all_config(config, secret_keys)
    pulumi.runtime.set_mocks(mock, project=project, stack=stack, preview=True, monitor=monitor)

    outputs: dict[str, Any] = {}

    def body() -> None:
        program()
        root = settings_mod.get_root_resource()
        exported = dict(getattr(root, "outputs", {}) or {})

        async def settle() -> None:
            for key, value in exported.items():
                out = pulumi.Output.from_input(value)
                resolved = await out.future(with_unknowns=True)
                outputs[key] = mocks.SECRET if await out.is_secret() else mocks.sanitize(resolved)

        return settle()  # type: ignore[return-value]

    _sync_await(run_pulumi_func(body))
    resources = [
        PreviewResource(
            type=t, name=n, parent=_parent_name(p), inputs=mocks.sanitize(i), custom=c, provider=prov or None
        )
        for t, n, p, c, i, prov in records
    ]
    # Registration order depends on task scheduling; sort for a stable listing.
    resources.sort(key=lambda r: (r.name, r.type))
    return PreviewResult(project, stack, resources, outputs)


def _parent_name(urn: str) -> str | None:
    """`urn:pulumi:stack::project::a$b::name` -> `name`; None for the root stack."""
    if not urn:
        return None
    parts = urn.split("::")
    if len(parts) < 4 or parts[2].split("$")[-1] == "pulumi:pulumi:Stack":
        return None
    return parts[-1]


def preview_stack(directory: str | Path, stack: str | None = None) -> PreviewResult:
    """Preview the stack in `directory` (its only stack, or `stack`)."""
    spec = load_stack(directory, stack)

    def program() -> None:
        with _cwd_and_path(spec.directory):
            runpy.run_path(str(spec.program), run_name="__main__")

    result = run_program(
        program, project=spec.project, stack=spec.stack, config=spec.config, secret_keys=spec.secret_keys
    )
    result.notes.extend(spec.notes)
    return result


# ---------------------------------------------------------------------------------------
# Summaries for people

_KEY_INPUTS: dict[str, tuple[str, ...]] = {
    "aws:eks/nodeGroup:NodeGroup": (
        "nodeGroupName",
        "instanceTypes",
        "amiType",
        "capacityType",
        "scalingConfig",
        "taints",
    ),
    "gcp:container/nodePool:NodePool": (
        "name",
        "nodeConfig.machineType",
        "nodeConfig.guestAccelerators",
        "nodeConfig.spot",
        "autoscaling",
        "nodeLocations",
    ),
    "aws:eks/cluster:Cluster": ("name", "version"),
    "gcp:container/cluster:Cluster": ("name", "location"),
    "pulumi:providers:aws": ("region",),
    "pulumi:providers:gcp": ("project", "region"),
    "pulumi:providers:kubernetes": ("context",),
    "aws:iam/rolePolicyAttachment:RolePolicyAttachment": ("policyArn",),
    "kubernetes:scheduling.k8s.io/v1:PriorityClass": ("metadata.name", "value", "preemptionPolicy"),
    "kubernetes:core/v1:ConfigMap": ("metadata.namespace", "metadata.name"),
    "kubernetes:core/v1:Secret": ("metadata.namespace", "metadata.name", "stringData"),
    "kubernetes:apps/v1:StatefulSet": ("metadata.namespace", "metadata.name", "spec.replicas"),
    "kubernetes:apps/v1:Deployment": ("metadata.namespace", "metadata.name", "spec.replicas"),
}


def _get(data: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def key_inputs(resource: PreviewResource) -> dict[str, Any]:
    """The few inputs that say what a resource is (for the tree view)."""
    paths = _KEY_INPUTS.get(resource.type)
    if paths is None:
        if resource.type.startswith("kubernetes:"):
            paths = ("metadata.namespace", "metadata.name")
        else:
            paths = tuple(k for k, v in resource.inputs.items() if isinstance(v, (str, int, float, bool)))[:4]
    out = {}
    for path in paths:
        value = _get(resource.inputs, path)
        if value is not None:
            out[path.rsplit(".", 1)[-1] if path.startswith("metadata.") else path] = value
    return out
