"""The local runtime: a compiled plan's `cloud: local` pools run as processes on this machine.

From the Plan alone (`layout`) it starts:

- one process per planned replica: a `gpufleet replica-sim` shaped by the pool's machine (KV
  capacity, prefill and decode rates from the plan's `PoolPerf`), or the pool's
  `engine_command` (a real engine such as `vllm serve`, placeholders filled in, see
  `processes.ENGINE_PLACEHOLDERS`, and `CUDA_VISIBLE_DEVICES` assigned in order);
- per warm node of a pool, a pre-started replica in *standby* (loaded and listening, but its
  `/health` and requests answer 503, so the router keeps it ejected) for a deployment that may
  use the pool (cycling over them in declaration order);
- the router (`gpufleet router serve`), configured by `gpufleet.infra.router_config.render`
  from the same plan, with the standby replicas listed under their pools.

Supervision (dead replicas, promotion of standbys) is `gpufleet.infra.local.supervisor`; the
process mechanics are `gpufleet.infra.local.processes`. `start_replica` and `stop_replica` are
the one place a replica process starts and the one place it is stopped. Warm standby needs the
simulated replica: pools with an `engine_command` hold no warm replicas (reported as not held).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx
import yaml

from gpufleet.infra import router_config
from gpufleet.infra.controller.autoscale import AutoscaleSettings
from gpufleet.infra.local import processes
from gpufleet.infra.local.autoscaler import LocalAutoscaler
from gpufleet.infra.local.layout import LocalReplica, layout, pool_perf
from gpufleet.infra.local.supervisor import Supervisor
from gpufleet.infra.plan import DeploymentPlan, Plan, PoolPerf, ReplicaPlan
from gpufleet.router.config import RouterConfig, RouterSettings

__all__ = [
    "SIM_ADMIN_ENV",
    "WORKDIR_PREFIX",
    "LocalRuntime",
    "LocalRuntimeError",
    "check_local",
    "remove_stale_workdirs",
]

SIM_ADMIN_ENV = "GPUFLEET_SIM_ADMIN_TOKEN"
"""The variable through which simulated replicas get their admin token (for promotion)."""
_LISTEN_RE = re.compile(r"listening on (http://[^\s:]+:(\d+))")
WORKDIR_PREFIX = "gpufleet-up-"
_OWNER_FILE = "owner"
ROUTER_RESTART_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0)
"""Delays before restarting a router that died (the next one when it dies again within 30 s)."""


def _proc_start_ticks(pid: int) -> str | None:
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
            pid_s, ticks = (d / _OWNER_FILE).read_text().split()
            pid = int(pid_s)
        except (OSError, ValueError):
            continue
        if processes.pid_alive(pid) and _proc_start_ticks(pid) == ticks:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


class LocalRuntimeError(Exception):
    """The local fleet cannot be started or run (shown to the user as one line)."""


def check_local(plan: Plan) -> None:
    """Raise `LocalRuntimeError` unless every pool of the plan is `cloud: local`."""
    other = [f"{p.name} ({p.cloud})" for p in plan.pools if p.cloud != "local"]
    if other:
        raise LocalRuntimeError(
            f"gpufleet up runs fleets whose pools are all `cloud: local`; not local: {', '.join(other)} "
            "(deploy those with the Pulumi stacks in stacks/)"
        )


class LocalRuntime:
    """Runs a compiled plan's local pools as processes on this machine. Use as a context manager."""

    def __init__(
        self,
        plan: Plan,
        *,
        router_port: int | None = None,
        settings: RouterSettings | None = None,
        workdir: Path | None = None,
        ready_timeout_s: float = 60.0,
        engine_ready_timeout_s: float = 900.0,
        scale_up_waiting_per_replica: float = 4.0,
        scale_up_utilization: float = 0.9,
        python: str = sys.executable,
        on_event: Callable[[str], None] | None = None,
        autoscale: bool = False,
        autoscale_settings: AutoscaleSettings | None = None,
    ) -> None:
        check_local(plan)
        self.plan = plan
        self.settings = settings or plan.router
        local = plan.clouds.local
        self.host = local.host if local is not None else "127.0.0.1"
        self._base_port = local.base_port if local is not None else 0
        self.router_port = self.settings.port if router_port is None else router_port
        self.ready_timeout_s = ready_timeout_s
        self.engine_ready_timeout_s = engine_ready_timeout_s
        self.python = python
        self.on_event = on_event
        self._own_workdir = workdir is None
        self.events: list[str] = []
        stale = remove_stale_workdirs() if workdir is None else []
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        if self._own_workdir:
            (self.workdir / _OWNER_FILE).write_text(f"{os.getpid()} {_proc_start_ticks(os.getpid())}")
        self.sim_admin_token = secrets.token_urlsafe(24)
        env_name = self.settings.admin_token.env
        self.router_admin_token: str | None = (
            (os.environ.get(env_name) or secrets.token_urlsafe(24)) if env_name else None
        )
        self.replicas: list[LocalReplica] = layout(plan)
        self.router_proc: subprocess.Popen[bytes] | None = None
        self.router_url = ""
        self.router_config: RouterConfig | None = None
        self._router_bound_port: int | None = None
        self.router_log = self.workdir / "logs" / "router.log"
        self.router_spare: tuple[subprocess.Popen[bytes], Path] | None = None
        """A hot-spare router (imports done, waiting for SIGUSR1) that takes over when the router dies."""
        self._router_spawned = 0
        self._router_deaths: list[float] = []
        self._router_watch: threading.Thread | None = None
        self.draining = False
        """Set by `drain`: the router drains, nothing is restarted any more."""
        self._next_port = self._base_port
        self._next_gpu = 0
        self.lock = threading.RLock()
        """Held by every change of replica state (supervision runs on another thread than stop)."""
        self.stopped = False
        self.supervisor = Supervisor(
            self, waiting_per_replica=scale_up_waiting_per_replica, utilization=scale_up_utilization
        )
        self.autoscaler: LocalAutoscaler | None = LocalAutoscaler(self, autoscale_settings) if autoscale else None
        """With `autoscale`: each supervision round runs `controller.autoscale.scale` (standby
        promotion by load and for min_replicas is then its job)."""
        for d in stale:
            self.emit(f"removed stale work directory {d} (left by a gpufleet up that was killed)")

    def emit(self, msg: str) -> None:
        """Record a runtime event (a death, a promotion) and pass it to `on_event`."""
        self.events.append(msg)
        if self.on_event is not None:
            self.on_event(msg)

    # -- replica processes ---------------------------------------------------------------
    def _port(self) -> int:
        if self._base_port:
            p = self._next_port
            self._next_port += 1
            return p
        return 0

    def _sim_argv(self, rep: LocalReplica, dep: DeploymentPlan, perf: PoolPerf, port: int) -> list[str]:
        """`gpufleet replica-sim` shaped by the pool's machine, speaking the router's blocks and tokens."""
        flags = {
            "--model": dep.model,
            "--replica-id": rep.id,
            "--host": self.host,
            "--port": port,
            "--kv-capacity-tokens": perf.kv_cache_tokens_per_replica,
            "--prefill-tokens-per-s": perf.prefill_tokens_per_s,
            "--decode-tokens-per-s": perf.decode_tokens_per_s,
            "--max-running": dep.max_concurrent_requests,
            "--max-model-len": dep.max_model_len,
            "--block-size-tokens": self.settings.block_size_tokens,
            "--chars-per-token": self.settings.chars_per_token,
            "--port-file": self.workdir / f"{rep.id}.port",
        }
        tiers = perf.kv_tiers
        if tiers is not None:  # the deployment's kv_offload, as the plan sized it for this pool
            flags["--cpu-kv-capacity-tokens"] = tiers.cpu_kv_tokens
            flags["--cpu-load-tokens-per-s"] = tiers.cpu_hit_tokens_per_s
            if tiers.disk_kv_tokens:
                flags["--disk-kv-capacity-tokens"] = tiers.disk_kv_tokens
                flags["--disk-load-tokens-per-s"] = tiers.disk_hit_tokens_per_s
        argv = [self.python, "-m", "gpufleet.infra.cli.replica_sim", "replica-sim"]
        argv += [arg for flag, value in flags.items() for arg in (flag, str(value))]
        return [*argv, "--standby"] if rep.role == "warm" else argv

    def start_replica(self, rep: LocalReplica) -> None:
        """Start the process of `rep` (a simulated replica or the pool's engine); `wait_replica` waits for it.

        A replica that ran before starts again on its port (the router keeps its URL), its engine
        on the same GPUs; its previous log is kept beside the new one (`.prev.log`)."""
        dep = self.plan.deployment(rep.deployment)
        perf = pool_perf(dep, rep.pool)
        rep.log_path = self.workdir / "logs" / f"{rep.id}.log"
        if rep.log_path.exists():
            rep.log_path.replace(rep.log_path.with_suffix(".prev.log"))
        (self.workdir / f"{rep.id}.port").unlink(missing_ok=True)
        rep.started_at = time.monotonic()
        if rep.kind == "sim":
            argv = self._sim_argv(rep, dep, perf, rep.port or self._port())
            rep.proc = processes.spawn(argv, rep.log_path, self.workdir, {SIM_ADMIN_ENV: self.sim_admin_token})
            return
        pool = self.plan.pool(rep.pool)
        assert pool.engine_command is not None
        port = rep.port or self._port() or processes.free_port(self.host)
        values = {
            "model": dep.model,
            "port": port,
            "host": self.host,
            "max_model_len": dep.max_model_len,
            "max_concurrent_requests": dep.max_concurrent_requests,
            "gpu_memory_utilization": dep.gpu_memory_utilization,
        }
        try:
            argv = processes.fill_engine_command(pool.engine_command, values)
        except ValueError as exc:
            raise LocalRuntimeError(str(exc)) from None
        if rep.gpus is None:
            rep.gpus = ",".join(str(self._next_gpu + i) for i in range(dep.gpus_per_replica))
            self._next_gpu += dep.gpus_per_replica
        rep.proc = processes.spawn(argv, rep.log_path, self.workdir, {"CUDA_VISIBLE_DEVICES": rep.gpus})
        rep.port = port
        rep.url = f"http://{processes.url_host(self.host)}:{port}"

    def replica_ready(self, rep: LocalReplica) -> bool:
        """Check once whether `rep` is ready (port file written, or the engine's /health 200); if so, mark it."""
        if rep.kind == "sim":
            port_file = self.workdir / f"{rep.id}.port"
            if not (port_file.exists() and (txt := port_file.read_text().strip())):
                return False
            rep.port = int(txt)
            rep.url = f"http://{processes.url_host(self.host)}:{rep.port}"
        else:
            try:
                if httpx.get(rep.url + "/health", timeout=1.0, trust_env=False).status_code != 200:
                    return False
            except httpx.HTTPError:
                return False
        rep.state = "active" if rep.role == "active" else "warm"
        rep.ready_by = None
        return True

    def wait_replica(self, rep: LocalReplica, deadline: float) -> None:
        """Wait until `rep` is ready (its port file is written, or its engine's /health answers 200)."""
        assert rep.proc is not None
        while time.monotonic() < deadline:
            code = rep.proc.poll()
            if code is not None:
                tail = processes.log_tail(rep.log_path)
                raise LocalRuntimeError(f"replica {rep.id} exited with code {code} while starting{tail}")
            if self.replica_ready(rep):
                return
            time.sleep(0.05)
        raise LocalRuntimeError(f"replica {rep.id} did not become ready in time{processes.log_tail(rep.log_path)}")

    def ready_timeout(self, rep: LocalReplica) -> float:
        """Seconds `rep` may take to start."""
        return self.engine_ready_timeout_s if rep.kind == "engine" else self.ready_timeout_s

    def stop_replica(self, rep: LocalReplica, sig: int | None = None, grace_s: float = 5.0) -> bool:
        """Stop the process of `rep`: `sig` to its group then wait, or (no `sig`) SIGTERM, SIGKILL after
        `grace_s`. Its state is left to the supervisor (a killed replica is a dead one). True if it ran."""
        if rep.proc is None or not rep.running:
            return False
        if sig is None:
            processes.terminate([rep.proc], grace_s)
        else:
            processes.signal_group(rep.proc, sig)
            rep.proc.wait(10)
        return True

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, progress: Callable[[str], None] | None = None) -> LocalRuntime:
        """Start every replica, then the router; return once traffic can flow. Stops all on failure."""
        try:
            self._start(progress or (lambda _msg: None))
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, progress: Callable[[str], None]) -> None:
        for rep in self.replicas:  # start them all first: they load in parallel
            self.start_replica(rep)
        for rep in self.replicas:
            self.wait_replica(rep, time.monotonic() + self.ready_timeout(rep))
            progress(f"replica {rep.id} ({rep.role}) on {rep.url}")
        for pool in self.plan.pools:
            if pool.warm_nodes and pool.engine_command:
                self.emit(f"pool {pool.name}: {pool.warm_nodes} warm node(s) not held (warm standby needs replica-sim)")
        self._start_router()
        progress(f"router on {self.router_url}")
        self._wait_router_view(time.monotonic() + self.ready_timeout_s)
        self.router_spare = self._spawn_router(standby=True)
        self._router_watch = threading.Thread(target=self._watch_router, name="router-watch", daemon=True)
        self._router_watch.start()

    # -- the router ----------------------------------------------------------------------
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
        return router_config.render(plan, urls, self.settings)

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
            if self.stopped or self.draining:
                return
            self._router_deaths = [t for t in self._router_deaths if now - t < 30.0] + [now]
            n = len(self._router_deaths)
            delay = ROUTER_RESTART_BACKOFF_S[min(n, len(ROUTER_RESTART_BACKOFF_S)) - 1]
            tail = processes.log_tail(self.router_log, 3)
            loop = f"; crash loop: {n} exits in 30s" if n >= 3 else ""
            self.emit(f"router exited with code {code}{loop}; restarting in {delay:g}s{tail}")
            time.sleep(delay)
            with self.lock:
                if self.stopped or self.draining:
                    return
                try:
                    how = "hot spare" if self._take_over() else "cold start"
                except LocalRuntimeError as exc:
                    self.emit(f"router restart failed: {exc}")
                    continue
                finally:
                    if self.router_spare is None and not (self.stopped or self.draining):
                        self.router_spare = self._spawn_router(standby=True)
            self.emit(f"router restarted on {self.router_url} ({how}, {time.monotonic() - now:.1f}s after it exited)")

    def router_rows(self) -> list[dict[str, object]]:
        """The router's view of every replica (its `/admin/replicas` rows: health, in-flight, ...)."""
        headers = {"Authorization": f"Bearer {self.router_admin_token}"} if self.router_admin_token else {}
        r = httpx.get(self.router_url + "/admin/replicas", headers=headers, timeout=2.0, trust_env=False)
        r.raise_for_status()
        return list(r.json()["replicas"])

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

    @property
    def endpoint(self) -> str:
        """The router's base URL (OpenAI-compatible: `{endpoint}/v1/chat/completions`)."""
        return self.router_url

    def pids(self) -> list[int]:
        """Process ids of every child still tracked (router included)."""
        procs = [r.proc for r in self.replicas if r.proc is not None] + ([self.router_proc] if self.router_proc else [])
        if self.router_spare is not None:
            procs.append(self.router_spare[0])
        return [p.pid for p in procs]

    # -- supervision (gpufleet.infra.local.supervisor) -----------------------------------
    def check(self, load: bool = True) -> list[str]:
        """One supervision round (`Supervisor.check`): the events it produced."""
        return self.supervisor.check(load)

    def promote(self, deployment: str, reason: str, pool: str | None = None) -> LocalReplica | None:
        """Promote the first live standby of `deployment` (of `pool`, when given), in its failover
        order (`Supervisor.promote`)."""
        return self.supervisor.promote(deployment, reason, pool=pool)

    def kill_pool(self, pool: str, sig: int = signal.SIGKILL) -> list[str]:
        """Kill every live replica process of `pool` (the demo's and tests' pool failure)."""
        with self.lock:
            return [rep.id for rep in self.replicas if rep.pool == pool and self.stop_replica(rep, sig)]

    def drain(self, timeout_s: float | None = None) -> bool:
        """Stop gracefully: the router drains (readiness 503, no new connections, in-flight requests
        finish within `timeout_s`, default `settings.drain_timeout_s`), then every process stops.
        True if the router finished draining in time. `force` (e.g. from a second Ctrl-C) cuts it short."""
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        self.draining = True
        proc = self.router_proc
        drained = True
        if proc is not None and proc.poll() is None:
            processes.signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout_s + 5.0)  # the router cuts what is left at timeout_s itself
            except subprocess.TimeoutExpired:
                drained = False
        self.stop()
        return drained

    def force(self) -> None:
        """SIGKILL every child now (the second signal during a drain); `stop` then only reaps."""
        self.draining = True
        spare = [self.router_spare[0]] if self.router_spare is not None else []
        for p in [self.router_proc, *spare, *(r.proc for r in self.replicas)]:
            if p is not None and p.poll() is None:
                processes.signal_group(p, signal.SIGKILL)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the router and every replica: SIGTERM to each process group, SIGKILL after `grace_s`."""
        self.draining = True  # the router watcher must not restart what is being stopped
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            procs = ([self.router_proc] if self.router_proc is not None else []) + [
                r.proc for r in self.replicas if r.proc is not None
            ]
            if self.router_spare is not None:
                procs.append(self.router_spare[0])
            processes.terminate(procs, grace_s)
            # an engine's group may hold grandchildren (its workers): make sure none is left
            for r in self.replicas:
                if r.kind == "engine" and r.proc is not None:
                    processes.signal_group(r.proc, signal.SIGKILL)
            for r in self.replicas:
                if r.state != "dead":
                    r.state = "stopped"
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalRuntime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
