"""The work directory of a `gpufleet up` run: logs, port files, the router's config; owned and stale.

Each run writes `owner` (its pid and start time) into its directory, so the next run can tell a
directory left by a SIGKILLed `up` (removed) from one whose run still goes on (kept).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from gpufleet.infra.local import processes

__all__ = ["OWNER_FILE", "WORKDIR_PREFIX", "claim", "proc_start_ticks", "remove_stale_workdirs"]

WORKDIR_PREFIX = "gpufleet-up-"
OWNER_FILE = "owner"


def proc_start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a pid from a reused one)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def remove_stale_workdirs(root: Path | None = None) -> list[Path]:
    """Remove work directories of `gpufleet up` runs whose process is gone (killed with SIGKILL).

    Each run writes `owner` (its pid and start time) into its directory; a directory without
    one, or whose owner still runs, is left alone.
    """
    root = Path(root or tempfile.gettempdir())
    removed = []
    for d in root.glob(WORKDIR_PREFIX + "*"):
        try:
            pid_s, ticks = (d / OWNER_FILE).read_text().split()
            pid = int(pid_s)
        except (OSError, ValueError):
            continue
        if processes.pid_alive(pid) and proc_start_ticks(pid) == ticks:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def claim(workdir: Path | None) -> tuple[Path, list[Path]]:
    """The run's work directory with its `logs/`, and the stale directories removed first.

    None: a new temporary directory that this process owns (and the caller removes on stop),
    after removing the stale ones of killed runs; a given directory is used as it is."""
    stale = remove_stale_workdirs() if workdir is None else []
    path = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    path.mkdir(parents=True, exist_ok=True)
    (path / "logs").mkdir(exist_ok=True)
    if workdir is None:
        (path / OWNER_FILE).write_text(f"{os.getpid()} {proc_start_ticks(os.getpid())}")
    return path, stale
