"""Child processes of the local runtime: spawning, free ports, the parent-death signal, pid checks.

Every child runs in its own process group (so a signal reaches an engine's workers too) and asks
Linux to SIGTERM it when its parent dies (`PR_SET_PDEATHSIG`), so a killed `gpufleet up` leaves
no orphans. `terminate` is the one way children are stopped: SIGTERM to each group, SIGKILL after
a grace period.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from gpufleet.router.upstream.request import url_host

__all__ = [
    "ENGINE_PLACEHOLDERS",
    "LocalRuntimeError",
    "cli_argv",
    "fill_engine_command",
    "free_port",
    "free_ports",
    "log_tail",
    "pid_alive",
    "signal_group",
    "spawn",
    "terminate",
    "url_host",
]

ENGINE_PLACEHOLDERS = (
    "model",
    "port",
    "host",
    "max_model_len",
    "max_concurrent_requests",
    "gpu_memory_utilization",
    "kv_events_port",
    "kv_events_replay_port",
)
"""What a pool's `engine_command` may name in braces (`{model}`, `{port}`, ...)."""


class LocalRuntimeError(Exception):
    """The local fleet cannot be started or run (shown to the user as one line)."""


def pid_alive(pid: int) -> bool:
    """True if `pid` is a live process (a zombie awaiting its parent's wait counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the child when its parent goes away, so a killed `up` leaves no orphans."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def free_port(host: str) -> int:
    """A port the OS says is free on `host` now (the child binds it right after)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(host: str, n: int, attempts: int = 50) -> int:
    """The first of `n` consecutive ports free on `host` now (for an engine whose data-parallel
    ranks bind the port + rank); LocalRuntimeError when no such run turns up."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(attempts):
        first = free_port(host)
        if first + n > 65536:
            continue
        ok = True
        for p in range(first + 1, first + n):
            with socket.socket(family) as s:
                try:
                    s.bind((host, p))
                except OSError:
                    ok = False
                    break
        if ok:
            return first
    raise LocalRuntimeError(f"no {n} consecutive free ports on {host}")


def cli_argv(python: str, *args: str) -> list[str]:
    """The command line running `gpufleet ARGS` with this interpreter (no console script needed)."""
    return [python, "-c", "from gpufleet.infra.cli import main; main()", *args]


def spawn(argv: Sequence[str], log: Path, cwd: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `argv` in its own process group, output to `log`, SIGTERMed if this process dies."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("COLUMNS", "400")  # rich must not wrap the lines we parse
    full_env["PYTHONUNBUFFERED"] = "1"
    fh = open(log, "wb")
    try:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,  # own process group: terminate() signals the whole group
            preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None,
        )
    finally:
        fh.close()


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send `sig` to the process group of `proc` (gone already: nothing to do)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def terminate(procs: Iterable[subprocess.Popen[bytes]], grace_s: float = 5.0) -> None:
    """SIGTERM each process group, wait up to `grace_s` for all, then SIGKILL the stragglers."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_group(p, signal.SIGKILL)
            p.wait(5)


def fill_engine_command(command: Sequence[str], values: Mapping[str, object]) -> list[str]:
    """`command` with its `{placeholder}`s filled from `values`; an unknown one is a ValueError."""

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            allowed = ", ".join("{" + k + "}" for k in ENGINE_PLACEHOLDERS)
            raise ValueError(f"engine_command: unknown placeholder {{{key}}}; allowed: {allowed}")
        return str(values[key])

    return [re.sub(r"\{(\w+)\}", sub, arg) for arg in command]


def log_tail(path: Path | None, lines: int = 5) -> str:
    """The last lines of a child's log, as a suffix for an error message ("" when there are none)."""
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    return (" | last output: " + " / ".join(text)) if text else ""
