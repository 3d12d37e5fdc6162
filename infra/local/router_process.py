"""The local fleet's router process: its config, a hot spare, restarts, and the router's view.

`RouterProcesses` is the part of `LocalRuntime` that runs `gpufleet router serve`: the config is
`gpufleet.infra.router_config.render` over the plan with the runtime's members (planned replicas,
standbys, replicas added by autoscaling) in place of the plan's list, written atomically and
reloaded with SIGHUP when the members change; a hot spare (imports done, waiting for SIGUSR1)
takes over on the same port when the router dies, and a watcher thread restarts it with backoff
while it keeps dying. The replicas keep running throughout.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, cast

import httpx
import yaml

from gpufleet.infra import router_config
from gpufleet.infra.local import processes
from gpufleet.infra.local.processes import LocalRuntimeError
from gpufleet.infra.plan import Plan, ReplicaPlan
from gpufleet.infra.router_config import EventEndpoints
from gpufleet.router.config import RouterConfig, RouterSettings

if TYPE_CHECKING:
    from gpufleet.infra.local.layout import LocalReplica

__all__ = ["ROUTER_RESTART_BACKOFF_S", "KvStateRow", "RouterProcesses", "RouterRow"]

_LISTEN_RE = re.compile(r"listening on (http://[^\s:]+:(\d+))")
ROUTER_RESTART_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0)
"""Delays before restarting a router that died (the next one when it dies again within 30 s)."""


class KvStateRow(TypedDict, total=False):
    """The part of a router row's `kv_state` that the local fleet reads (the router sends more;
    a replica without a KV-event stream has only `state`)."""

    state: str
    endpoint: str
    batches: int
    blocks: int


class RouterRow(TypedDict):
    """The part of a `/admin/replicas` row that the local fleet reads (the router sends more)."""

    id: str
    healthy: bool
    in_flight: int
    queued_prefill_tokens: int
    max_concurrent_requests: int
    kv_state: KvStateRow | None


class RouterProcesses:
    """The router part of `LocalRuntime` (a mixin: the state is the runtime's own attributes)."""

    plan: Plan
    settings: RouterSettings
    host: str
    python: str
    workdir: Path
    replicas: list[LocalReplica]
    ready_timeout_s: float
    router_port: int
    router_admin_token: str | None
    router_proc: subprocess.Popen[bytes] | None
    router_url: str
    router_config: RouterConfig | None
    router_log: Path
    router_spare: tuple[subprocess.Popen[bytes], Path] | None
    lock: threading.RLock
    stopped: bool
    draining: bool
    emit: Callable[[str], None]
    event_endpoints: Callable[[], dict[str, EventEndpoints]]
    _router_bound_port: int | None
    _router_spawned: int
    _router_deaths: list[float]
    _router_watch: threading.Thread | None

    def start_router(self, progress: Callable[[str], None]) -> None:
        """Start the router (the hot spare spawned beside the replicas takes over, else a cold start),
        wait until it routes to the live active replicas, then start a new hot spare and the
        watcher that restarts it."""
        if not self._take_over():
            self._start_router()
        progress(f"router on {self.router_url}")
        self._wait_router_view(time.monotonic() + self.ready_timeout_s)
        self.router_spare = self._spawn_router(standby=True)
        self._router_watch = threading.Thread(target=self._watch_router, name="router-watch", daemon=True)
        self._router_watch.start()

    def members(self) -> list[LocalReplica]:
        """The replicas the router should know: all but new ones not ready yet and retiring ones
        (a dead replica keeps its place: it restarts on the same URL)."""
        return [r for r in self.replicas if not r.fresh and r.state not in ("retiring", "stopped")]

    def router_config_for_run(self) -> RouterConfig:
        """The router config: `router_config.render` over the plan with the runtime's members
        (planned replicas, standbys, replicas added by autoscaling) in place of the plan's list."""
        by_dep: dict[str, list[ReplicaPlan]] = {}
        for rep in self.members():
            mine = by_dep.setdefault(rep.deployment, [])
            mine.append(
                ReplicaPlan(id=rep.id, deployment=rep.deployment, pool=rep.pool, priority=rep.priority, index=len(mine))
            )
        plan = self.plan.model_copy(
            update={
                "deployments": [
                    d.model_copy(update={"replicas": by_dep.get(d.name, [])}) for d in self.plan.deployments
                ]
            }
        )
        urls = {r.id: r.url for r in self.replicas}
        return router_config.render(plan, urls, self.settings, self.event_endpoints())

    def update_router_membership(self) -> bool:
        """Tell the running router the members changed: rewrite its config file (atomically; a
        restarted router reads it too) and SIGHUP it to reload now. True if the router was told."""
        with self.lock:
            if self.router_proc is None or self.router_proc.poll() is not None:
                return False
            self._write_router_config()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.router_proc.pid, signal.SIGHUP)
            return True

    def _write_router_config(self) -> Path:
        cfg = self.router_config_for_run()
        self.router_config = cfg
        path = self.workdir / "router.yaml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
        tmp.replace(path)  # a router reading it never sees half a file
        return path

    def _spawn_router(self, standby: bool) -> tuple[subprocess.Popen[bytes], Path]:
        """A router process: listening at once, or (`standby`) a hot spare waiting for SIGUSR1."""
        env: dict[str, str] = {}
        if self.settings.admin_token.env and self.router_admin_token:
            env[self.settings.admin_token.env] = self.router_admin_token
        self._router_spawned += 1
        n = self._router_spawned
        log = self.workdir / "logs" / ("router.log" if n == 1 else f"router-{n}.log")
        port = self._router_bound_port if self._router_bound_port is not None else self.router_port
        path = self.workdir / "router.yaml"
        argv = processes.cli_argv(
            self.python, "router", "serve", "--config", str(path), "--host", self.host, "--port", str(port)
        )
        return processes.spawn([*argv, "--standby"] if standby else argv, log, self.workdir, env), log

    def _wait_listening(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                raise LocalRuntimeError(f"router exited with code {code} while starting{processes.log_tail(log)}")
            m = _LISTEN_RE.search(log.read_text(errors="replace")) if log.exists() else None
            if m:
                self.router_url = f"http://{processes.url_host(self.host)}:{m.group(2)}"
                self._router_bound_port = int(m.group(2))  # a restarted router listens where clients know it
                return
            time.sleep(0.02)
        raise LocalRuntimeError(f"router did not start listening in time{processes.log_tail(log)}")

    def _start_router(self) -> None:
        """Start a router from scratch (config rendered now) and wait until it listens."""
        self._write_router_config()
        self.router_proc, self.router_log = self._spawn_router(standby=False)
        self._wait_listening(self.router_proc, self.router_log)

    def _take_over(self) -> bool:
        """Make the hot spare the router: the config of this moment, SIGUSR1, wait until it listens."""
        spare, self.router_spare = self.router_spare, None
        if spare is None:
            return False
        # SIGUSR1 before the spare blocks it would kill it: wait for its line (it may still be importing)
        deadline = time.monotonic() + self.ready_timeout_s
        while spare[0].poll() is None and b"router standby: ready" not in spare[1].read_bytes():
            if time.monotonic() > deadline:
                processes.terminate([spare[0]], 1.0)
                return False
            time.sleep(0.02)
        if spare[0].poll() is not None:
            return False
        self._write_router_config()
        os.kill(spare[0].pid, signal.SIGUSR1)
        self.router_proc, self.router_log = spare
        self._wait_listening(*spare)
        return True

    def _stopping(self) -> bool:
        """Whether the runtime is stopping or draining (set by other threads: read afresh each time)."""
        return self.stopped or self.draining

    def _watch_router(self) -> None:
        """Restart the router when it dies (replicas keep running): at once, by waking a hot spare
        that has paid its imports already (a cold start takes seconds on a busy machine), then with
        backoff if it keeps dying. Runs on its own thread from start to stop: the spares are spawned
        here, and the parent-death signal follows the thread that spawned a child."""
        while True:
            proc = self.router_proc
            if proc is None:
                return
            code = proc.wait()
            now = time.monotonic()
            if self._stopping():
                return
            self._router_deaths = [t for t in self._router_deaths if now - t < 30.0] + [now]
            n = len(self._router_deaths)
            delay = ROUTER_RESTART_BACKOFF_S[min(n, len(ROUTER_RESTART_BACKOFF_S)) - 1]
            tail = processes.log_tail(self.router_log, 3)
            loop = f"; crash loop: {n} exits in 30s" if n >= 3 else ""
            self.emit(f"router exited with code {code}{loop}; restarting in {delay:g}s{tail}")
            time.sleep(delay)
            with self.lock:
                if self._stopping():
                    return
                try:
                    how = "hot spare" if self._take_over() else "cold start"
                except LocalRuntimeError as exc:
                    self.emit(f"router restart failed: {exc}")
                    continue
                finally:
                    if self.router_spare is None and not self._stopping():
                        self.router_spare = self._spawn_router(standby=True)
            self.emit(f"router restarted on {self.router_url} ({how}, {time.monotonic() - now:.1f}s after it exited)")

    def router_rows(self) -> list[RouterRow]:
        """The router's view of every replica (its `/admin/replicas` rows: health, in-flight, ...)."""
        headers = {"Authorization": f"Bearer {self.router_admin_token}"} if self.router_admin_token else {}
        r = httpx.get(self.router_url + "/admin/replicas", headers=headers, timeout=2.0, trust_env=False)
        r.raise_for_status()
        return list(cast("list[RouterRow]", r.json()["replicas"]))

    def router_view(self) -> dict[str, bool]:
        """Replica id -> healthy, as the router sees it."""
        return {str(row["id"]): bool(row["healthy"]) for row in self.router_rows()}

    def _wait_router_view(self, deadline: float) -> None:
        """Wait until the router routes to exactly the live active replicas (standbys ejected)."""
        want = {r.id: r.state == "active" for r in self.replicas}
        last: dict[str, bool] | object = None
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                last = self.router_view()
                if last == want:
                    return
            if self.router_proc is not None and self.router_proc.poll() is not None:
                tail = processes.log_tail(self.workdir / "logs" / "router.log")
                raise LocalRuntimeError(f"router exited{tail}")
            time.sleep(0.1)
        raise LocalRuntimeError(f"router did not see the expected replicas in time (saw {last})")

    def wait_routable(self, replica_ids: Iterable[str], timeout_s: float = 30.0) -> bool:
        """Wait until the router routes to every replica of `replica_ids` (e.g. after a promotion)."""
        ids = set(replica_ids)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                view = self.router_view()
                if all(view.get(i) for i in ids):
                    return True
            time.sleep(0.1)
        return False
