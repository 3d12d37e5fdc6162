"""Pin the Python dependencies: `make lock` writes images/locks/*.txt.

One lock per installed set, each `name==version` line for CPython 3.11 on Linux x86_64:

- `dev.txt`: `gpufleet[dev]`, what `make install` (and so every test run) installs, as constraints;
- `router.txt`: `gpufleet[router,kubernetes]`, exactly what the router image holds besides gpufleet;
- `controller.txt`: `gpufleet[controller]`, exactly what the controller image holds.

The image locks are resolved under `dev.txt` as constraints, so an image ships the very versions
the tests ran against. The images install a lock with `--no-deps` and then the wheel with
`--no-deps`, followed by `pip check`: nothing is resolved at image build time.

Usage: python images/lock.py [--check]   (--check: resolve again, exit 1 if a lock would change)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOCK_DIR = ROOT / "images" / "locks"
# lock name -> the extras of gpufleet it pins
LOCKS = {"dev": "dev", "router": "router,kubernetes", "controller": "controller"}
PROJECT = "gpufleet"
# Interpreters the locks cover besides the one resolving them. Debian bookworm's python3.11
# (`make image-rootfs`) is 3.11.2, and some packages need more below 3.11.3 (redis: async-timeout).
OTHER_PYTHONS = ("3.11.2",)


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path, environment: dict[str, str] | None = None) -> dict[str, str]:
    """A lock file as {canonical name: version}: the lines whose marker holds in `environment`
    (marker variables; default: this interpreter's)."""
    from packaging.markers import Marker

    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        spec, _, marker = line.partition(";")
        name, sep, ver = spec.partition("==")
        if not sep:
            raise ValueError(f"{path}: {raw!r}: expected name==version [; marker]")
        if marker.strip() and not Marker(marker.strip()).evaluate(environment):
            continue
        pins[canonical(name.strip())] = ver.strip()
    return pins


def extras_of(path: Path) -> str:
    """The extras a lock file pins (its `# extras:` header line)."""
    for line in path.read_text().splitlines():
        if line.startswith("# extras:"):
            return line.split(":", 1)[1].strip()
    raise ValueError(f"{path}: no '# extras:' header")


def _pip_report(requirements: list[str], constraints: Path | None) -> list[dict[str, Any]]:
    """pip's installation report for `requirements` into an empty environment (nothing installed)."""
    with tempfile.TemporaryDirectory(prefix="gpufleet-lock-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        cmd += ["--report", str(report)]
        if constraints is not None:
            cmd += ["--constraint", str(constraints)]
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        subprocess.run(cmd + requirements, check=True, env=env, stdout=subprocess.DEVNULL)
        items: list[dict[str, Any]] = json.loads(report.read_text())["install"]
        return items


def resolve(extras: str, constraints: Path | None) -> dict[str, str]:
    """{name: "version" or "version ; marker"} for `gpufleet[extras]`: what pip installs here, and
    what the dependencies need on the OTHER_PYTHONS only, under its marker."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    items = _pip_report([f"{ROOT}[{extras}]"], constraints)
    pins = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in items}
    pins.pop(PROJECT, None)
    others = [{**default_environment(), "python_full_version": v, "extra": ""} for v in OTHER_PYTHONS]
    extra: dict[str, tuple[Requirement, str]] = {}
    for item in items:
        for spec in item["metadata"].get("requires_dist", []):
            req = Requirement(spec)
            name = canonical(req.name)
            if req.marker is None or name in pins or name == PROJECT:
                continue
            if any(req.marker.evaluate(env) for env in others):
                extra[name] = (req, str(req.marker))
    for _name, (req, marker) in sorted(extra.items()):
        req.marker = None
        for dep in _pip_report([str(req)], constraints):
            dep_name = canonical(dep["metadata"]["name"])
            if dep_name not in pins:
                pins[dep_name] = f"{dep['metadata']['version']} ; {marker}"
    return pins


def render(name: str, extras: str, pins: dict[str, str]) -> str:
    head = [
        f"# images/locks/{name}.txt: gpufleet[{extras}] for CPython 3.11 on Linux x86_64.",
        "# Generated by `make lock` (images/lock.py) from pyproject.toml; do not edit by hand.",
        f"# extras: {extras}",
    ]
    return "\n".join(head + [f"{n}=={v}" for n, v in sorted(pins.items())]) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    if sys.version_info[:2] != (3, 11):
        print(f"images/lock.py: run it with Python 3.11 (this is {sys.version.split()[0]})", file=sys.stderr)
        return 2
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    changed = []
    dev_path = LOCK_DIR / "dev.txt"
    for name, extras in LOCKS.items():
        path = LOCK_DIR / f"{name}.txt"
        print(f"resolving gpufleet[{extras}] ...", file=sys.stderr)
        pins = resolve(extras, None if name == "dev" else dev_path)
        text = render(name, extras, pins)
        if not path.exists() or path.read_text() != text:
            changed.append(path.name)
            if not check:
                path.write_text(text)
        print(f"{path.relative_to(ROOT)}: {len(pins)} packages", file=sys.stderr)
    if check and changed:
        print(f"out of date: {', '.join(changed)} (run `make lock`)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
