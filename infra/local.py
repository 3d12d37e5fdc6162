"""The local runtime: the compiled plan run on this machine (`gpufleet up` on `cloud: local` pools).

From the Plan alone it starts:

- one process per planned replica: a `gpufleet replica-sim` shaped by the pool's machine (KV
  capacity, prefill and decode rates from the plan's `PoolPerf`), or the pool's
  `engine_command` (a real engine such as `vllm serve`, with `{model}`, `{port}`, `{host}`,
  `{max_model_len}`, `{max_concurrent_requests}`, `{gpu_memory_utilization}` filled in and
  `CUDA_VISIBLE_DEVICES` assigned in order);
- per warm node of a pool, a pre-started replica in *standby* (loaded and listening, but its
  `/health` and requests answer 503, so the router keeps it ejected) for a deployment that may
  use the pool (cycling over them in declaration order). Promotion is one admin call: the
  replica turns healthy and the router re-admits it at its next health check;
- the router (`gpufleet router serve`), configured by `gpufleet.infra.render.router_config`
  from the same plan, with the standby replicas listed under their pools.

`check()` supervises: a replica whose process exited is marked dead, and a deployment left with
fewer live replicas than `min_replicas` (a replica died, or its whole top pool failed) gets
standby replicas promoted at once, in failover order. A deployment whose replicas queue more
than `scale_up_waiting_per_replica` requests each (vLLM's `vllm:num_requests_waiting`), or
whose request slots are `scale_up_utilization` full by the router's in-flight count, grows by
one promoted standby per round, up to `max_replicas`.

Every child runs in its own process group and gets SIGTERM if this process dies (Linux
`PR_SET_PDEATHSIG`); `stop()` sends SIGTERM to each group, then SIGKILL after a grace period,
so no process outlives the runtime. Warm standby needs the simulated replica: pools with an
`engine_command` hold no warm replicas (the plan's warm nodes are reported as not held).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import yaml

from gpufleet.infra import render
from gpufleet.infra.plan import DeploymentPlan, Plan, PoolPerf, ReplicaPlan
from gpufleet.router.config import RouterConfig, RouterSettings

__all__ = ["LocalReplica", "LocalRuntime", "LocalRuntimeError", "check_local", "pid_alive"]

SIM_ADMIN_ENV = "GPUFLEET_SIM_ADMIN_TOKEN"
_LISTEN_RE = re.compile(r"listening on (http://[^\s:]+:(\d+))")
_ENGINE_PLACEHOLDERS = ("model", "port", "host", "max_model_len", "max_concurrent_requests", "gpu_memory_utilization")


class LocalRuntimeError(Exception):
    """The local fleet cannot be started or run (shown to the user as one line)."""


@dataclass
class LocalReplica:
    """One replica process of the local fleet."""

    id: str
    deployment: str
    model: str
    pool: str
    priority: int
    role: Literal["active", "warm"]
    kind: Literal["sim", "engine"]
    port: int = 0
    url: str = ""
    state: Literal["starting", "active", "warm", "dead", "stopped"] = "starting"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_path: Path | None = None
    promoted_at: float | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


def check_local(plan: Plan) -> None:
    """Raise `LocalRuntimeError` unless every pool of the plan is `cloud: local`."""
    other = [f"{p.name} ({p.cloud})" for p in plan.pools if p.cloud != "local"]
    if other:
        raise LocalRuntimeError(
            f"gpufleet up runs fleets whose pools are all `cloud: local`; not local: {', '.join(other)} "
            "(deploy those with the Pulumi stacks in stacks/)"
        )


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


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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
    ) -> None:
        check_local(plan)
        self.plan = plan
        self.settings = settings or RouterSettings.model_validate(plan.router)
        local = plan.clouds.local
        self.host = local.host if local is not None else "127.0.0.1"
        self._base_port = local.base_port if local is not None else 0
        self.router_port = self.settings.port if router_port is None else router_port
        self.ready_timeout_s = ready_timeout_s
        self.engine_ready_timeout_s = engine_ready_timeout_s
        self.scale_up_waiting_per_replica = scale_up_waiting_per_replica
        self.scale_up_utilization = scale_up_utilization
        self.python = python
        self.on_event = on_event
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="gpufleet-up-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self.sim_admin_token = secrets.token_urlsafe(24)
        env_name = self.settings.admin_token.env
        self.router_admin_token: str | None = (
            (os.environ.get(env_name) or secrets.token_urlsafe(24)) if env_name else None
        )
        self.replicas: list[LocalReplica] = self._layout()
        self.router_proc: subprocess.Popen[bytes] | None = None
        self.router_url = ""
        self.router_config: RouterConfig | None = None
        self.events: list[str] = []
        self._next_port = self._base_port
        self._next_gpu = 0
        self._lock = threading.RLock()
        self._stopped = False

    # -- layout --------------------------------------------------------------------------
    def _layout(self) -> list[LocalReplica]:
        """The replicas the plan asks for, plus a standby replica per warm slot of each pool."""
        out: list[LocalReplica] = []
        engine_pools = {p.name for p in self.plan.pools if p.engine_command}
        for dep in self.plan.deployments:
            for r in dep.replicas:
                kind: Literal["sim", "engine"] = "engine" if r.pool in engine_pools else "sim"
                out.append(LocalReplica(r.id, dep.name, dep.model, r.pool, r.priority, "active", kind))
        for pool in self.plan.pools:
            if not pool.warm_nodes or pool.engine_command:
                continue
            users = [d for d in self.plan.deployments if pool.name in d.failover]
            if not users:
                continue
            k = 0
            for node in range(pool.warm_nodes):
                dep = users[node % len(users)]
                per_node = self._perf(dep, pool.name).replicas_per_node
                for _ in range(max(1, per_node)):
                    rid = f"{dep.name}-{pool.name}-warm{k}"
                    out.append(LocalReplica(rid, dep.name, dep.model, pool.name, pool.priority, "warm", "sim"))
                    k += 1
        return out

    @staticmethod
    def _perf(dep: DeploymentPlan, pool: str) -> PoolPerf:
        for p in dep.pools:
            if p.pool == pool:
                return p
        raise KeyError(f"{dep.name} has no performance estimate for pool {pool}")

    def _emit(self, msg: str) -> None:
        self.events.append(msg)
        if self.on_event is not None:
            self.on_event(msg)

    # -- process helpers -----------------------------------------------------------------
    def _port(self) -> int:
        if self._base_port:
            p = self._next_port
            self._next_port += 1
            return p
        return 0

    def _spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("COLUMNS", "400")  # rich must not wrap the lines we parse
        full_env["PYTHONUNBUFFERED"] = "1"
        fh = open(log, "wb")
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=self.workdir,
                start_new_session=True,  # own process group: stop() signals the whole group
                preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None,
            )
        finally:
            fh.close()

    def _cli(self, *args: str) -> list[str]:
        return [self.python, "-c", "from gpufleet.infra.cli import main; main()", *args]

    def _start_replica(self, rep: LocalReplica) -> None:
        dep = self.plan.deployment(rep.deployment)
        perf = self._perf(dep, rep.pool)
        rep.log_path = self.workdir / "logs" / f"{rep.id}.log"
        if rep.kind == "sim":
            s = self.settings
            port_file = self.workdir / f"{rep.id}.port"
            argv = [
                self.python,
                "-m",
                "gpufleet.infra.cli.replica_sim",
                "replica-sim",
                "--model",
                dep.model,
                "--replica-id",
                rep.id,
                "--host",
                self.host,
                "--port",
                str(self._port()),
                "--kv-capacity-tokens",
                str(perf.kv_cache_tokens_per_replica),
                "--prefill-tokens-per-s",
                str(perf.prefill_tokens_per_s),
                "--decode-tokens-per-s",
                str(perf.decode_tokens_per_s),
                "--max-running",
                str(dep.max_concurrent_requests),
                "--max-model-len",
                str(dep.max_model_len),
                "--block-size-tokens",
                str(s.block_size_tokens),
                "--chars-per-token",
                str(s.chars_per_token),
                "--port-file",
                str(port_file),
            ]
            if rep.role == "warm":
                argv.append("--standby")
            rep.proc = self._spawn(argv, rep.log_path, {SIM_ADMIN_ENV: self.sim_admin_token})
        else:
            pool = self.plan.pool(rep.pool)
            assert pool.engine_command is not None
            port = self._port() or _free_port(self.host)
            values = {
                "model": dep.model,
                "port": port,
                "host": self.host,
                "max_model_len": dep.max_model_len,
                "max_concurrent_requests": dep.max_concurrent_requests,
                "gpu_memory_utilization": dep.gpu_memory_utilization,
            }
            argv = [self._fill(a, values) for a in pool.engine_command]
            gpus = ",".join(str(self._next_gpu + i) for i in range(dep.gpus_per_replica))
            self._next_gpu += dep.gpus_per_replica
            rep.proc = self._spawn(argv, rep.log_path, {"CUDA_VISIBLE_DEVICES": gpus})
            rep.port = port
            rep.url = f"http://{_url_host(self.host)}:{port}"

    @staticmethod
    def _fill(arg: str, values: dict[str, object]) -> str:
        def sub(m: re.Match[str]) -> str:
            key = m.group(1)
            if key not in values:
                raise LocalRuntimeError(
                    f"engine_command: unknown placeholder {{{key}}}; allowed: {', '.join('{' + k + '}' for k in _ENGINE_PLACEHOLDERS)}"
                )
            return str(values[key])

        return re.sub(r"\{(\w+)\}", sub, arg)

    def _tail(self, path: Path | None, lines: int = 5) -> str:
        if path is None or not path.exists():
            return ""
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
        return (" | last output: " + " / ".join(text)) if text else ""

    def _wait_replica(self, rep: LocalReplica, deadline: float) -> None:
        assert rep.proc is not None
        port_file = self.workdir / f"{rep.id}.port"
        while time.monotonic() < deadline:
            code = rep.proc.poll()
            if code is not None:
                raise LocalRuntimeError(
                    f"replica {rep.id} exited with code {code} while starting{self._tail(rep.log_path)}"
                )
            if rep.kind == "sim":
                if port_file.exists() and (txt := port_file.read_text().strip()):
                    rep.port = int(txt)
                    rep.url = f"http://{_url_host(self.host)}:{rep.port}"
                    rep.state = "active" if rep.role == "active" else "warm"
                    return
            else:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(rep.url + "/health", timeout=1.0, trust_env=False).status_code == 200:
                        rep.state = "active"
                        return
            time.sleep(0.05)
        raise LocalRuntimeError(f"replica {rep.id} did not become ready in time{self._tail(rep.log_path)}")

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
            self._start_replica(rep)
        for rep in self.replicas:
            timeout = self.engine_ready_timeout_s if rep.kind == "engine" else self.ready_timeout_s
            self._wait_replica(rep, time.monotonic() + timeout)
            progress(f"replica {rep.id} ({rep.role}) on {rep.url}")
        for pool in self.plan.pools:
            if pool.warm_nodes and pool.engine_command:
                self._emit(
                    f"pool {pool.name}: {pool.warm_nodes} warm node(s) not held (warm standby needs replica-sim)"
                )
        self._start_router()
        progress(f"router on {self.router_url}")
        self._wait_router_view(time.monotonic() + self.ready_timeout_s)

    def router_config_for_run(self) -> RouterConfig:
        """The router config: `render.router_config` over the plan plus the standby replicas."""
        warm: dict[str, list[ReplicaPlan]] = {}
        for rep in self.replicas:
            if rep.role == "warm":
                idx = len(warm.setdefault(rep.deployment, []))
                warm[rep.deployment].append(
                    ReplicaPlan(
                        id=rep.id, deployment=rep.deployment, pool=rep.pool, priority=rep.priority, index=1000 + idx
                    )
                )
        plan = self.plan.model_copy(
            update={
                "deployments": [
                    d.model_copy(update={"replicas": [*d.replicas, *warm.get(d.name, [])]})
                    for d in self.plan.deployments
                ]
            }
        )
        urls = {r.id: r.url for r in self.replicas}
        return render.router_config(plan, urls, self.settings)

    def _start_router(self) -> None:
        cfg = self.router_config_for_run()
        self.router_config = cfg
        path = self.workdir / "router.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
        env: dict[str, str] = {}
        if self.settings.admin_token.env and self.router_admin_token:
            env[self.settings.admin_token.env] = self.router_admin_token
        log = self.workdir / "logs" / "router.log"
        self.router_proc = self._spawn(
            self._cli("router", "serve", "--config", str(path), "--host", self.host, "--port", str(self.router_port)),
            log,
            env,
        )
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            code = self.router_proc.poll()
            if code is not None:
                raise LocalRuntimeError(f"router exited with code {code} while starting{self._tail(log)}")
            m = _LISTEN_RE.search(log.read_text(errors="replace")) if log.exists() else None
            if m:
                self.router_url = f"http://{_url_host(self.host)}:{m.group(2)}"
                return
            time.sleep(0.05)
        raise LocalRuntimeError(f"router did not start listening in time{self._tail(log)}")

    def router_rows(self) -> list[dict[str, object]]:
        """The router's view of every replica (its `/admin/replicas` rows: health, in-flight, ...)."""
        headers = {"Authorization": f"Bearer {self.router_admin_token}"} if self.router_admin_token else {}
        r = httpx.get(self.router_url + "/admin/replicas", headers=headers, timeout=2.0, trust_env=False)
        r.raise_for_status()
        return list(r.json()["replicas"])

    def router_view(self) -> dict[str, bool]:
        """Replica id -> healthy, as the router sees it."""
        return {str(row["id"]): bool(row["healthy"]) for row in self.router_rows()}

    def _router_utilization(self, ids: set[str]) -> float:
        """In-flight requests over concurrency limits of these replicas, as the router counts them."""
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError, TypeError):
            rows = [row for row in self.router_rows() if row["id"] in ids]
            cap = sum(int(row["max_concurrent_requests"]) for row in rows)  # type: ignore[call-overload]
            return sum(int(row["in_flight"]) for row in rows) / cap if cap else 0.0  # type: ignore[call-overload]
        return 0.0

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
                raise LocalRuntimeError(f"router exited{self._tail(self.workdir / 'logs' / 'router.log')}")
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
        return [p.pid for p in procs]

    # -- supervision ---------------------------------------------------------------------
    def promote(self, deployment: str, reason: str) -> LocalReplica | None:
        """Promote the first live standby of `deployment`, in its failover order."""
        with self._lock:
            order = {p: i for i, p in enumerate(self.plan.deployment(deployment).failover)}
            standby = sorted(
                (r for r in self.replicas if r.deployment == deployment and r.state == "warm"),
                key=lambda r: order.get(r.pool, len(order)),
            )
            for rep in standby:
                try:
                    resp = httpx.post(
                        rep.url + "/admin/promote",
                        headers={"Authorization": f"Bearer {self.sim_admin_token}"},
                        timeout=2.0,
                        trust_env=False,
                    )
                    resp.raise_for_status()
                except httpx.HTTPError as exc:
                    self._emit(f"could not promote {rep.id}: {exc}")
                    continue
                rep.state, rep.role, rep.promoted_at = "active", "active", time.monotonic()
                self._emit(f"promoted warm replica {rep.id} (pool {rep.pool}) for {deployment}: {reason}")
                return rep
            return None

    def _waiting(self, reps: list[LocalReplica]) -> float:
        total = 0.0
        for rep in reps:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                text = httpx.get(rep.url + "/metrics", timeout=1.0, trust_env=False).text
                for line in text.splitlines():
                    if line.startswith("vllm:num_requests_waiting"):
                        total += float(line.rsplit(" ", 1)[1])
        return total

    def check(self, load: bool = True) -> list[str]:
        """One supervision round: mark dead replicas, promote standbys where a deployment is short.

        Returns the events of this round. `load` also polls replica queues for load-based growth.
        """
        before = len(self.events)
        with self._lock:
            if self._stopped:
                return []
            for rep in self.replicas:
                if rep.proc is not None and rep.state in ("active", "warm", "starting") and rep.proc.poll() is not None:
                    rep.state = "dead"
                    self._emit(f"replica {rep.id} (pool {rep.pool}) exited with code {rep.proc.returncode}")
            if self.router_proc is not None and self.router_proc.poll() is not None:
                self._emit(f"router exited with code {self.router_proc.returncode}")
            for dep in self.plan.deployments:
                live = [r for r in self.replicas if r.deployment == dep.name and r.state == "active"]
                short = dep.min_replicas - len(live)
                top = dep.failover[0] if dep.failover else None
                top_lost = (
                    bool(top)
                    and not any(r.pool == top for r in live)
                    and any(r.pool == top and r.state == "dead" for r in self.replicas if r.deployment == dep.name)
                )
                for _ in range(max(0, short)):
                    why = f"pool {top} failed" if top_lost else f"{len(live)} of {dep.min_replicas} replicas live"
                    if self.promote(dep.name, why) is None:
                        break
                if (
                    load
                    and live
                    and len(live) < dep.max_replicas
                    and any(r.deployment == dep.name and r.state == "warm" for r in self.replicas)
                ):
                    # Two signals: requests queued inside the replicas, and, since the router holds
                    # requests back at each replica's concurrency limit, the router's own in-flight count.
                    waiting = self._waiting([r for r in live if r.kind == "sim"])
                    busy = self._router_utilization({r.id for r in live}) if self.router_url else 0.0
                    if waiting > self.scale_up_waiting_per_replica * len(live):
                        self.promote(dep.name, f"{waiting:.0f} requests waiting on {len(live)} replicas")
                    elif busy >= self.scale_up_utilization:
                        self.promote(dep.name, f"router has {busy:.0%} of its replicas' request slots in flight")
        return self.events[before:]

    def kill_pool(self, pool: str, sig: int = signal.SIGKILL) -> list[str]:
        """Kill every live replica process of `pool` (the demo's and tests' pool failure)."""
        killed = []
        with self._lock:
            for rep in self.replicas:
                if rep.pool == pool and rep.proc is not None and rep.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(rep.proc.pid, sig)
                    rep.proc.wait(10)
                    killed.append(rep.id)
        return killed

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the router and every replica: SIGTERM to each process group, SIGKILL after `grace_s`."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            procs = ([self.router_proc] if self.router_proc is not None else []) + [
                r.proc for r in self.replicas if r.proc is not None
            ]
            for p in procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for p in procs:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
            # an engine's group may hold grandchildren (its workers): make sure none is left
            for r in self.replicas:
                if r.kind == "engine" and r.proc is not None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(r.proc.pid, signal.SIGKILL)
            for r in self.replicas:
                if r.state != "dead":
                    r.state = "stopped"
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalRuntime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
