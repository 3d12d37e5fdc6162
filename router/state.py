"""`Router`: the router's state, built from a `RouterConfig`, and how it follows changes.

It holds the replica set, the policy, the prediction cache, the session binding, the metrics,
the health tracker (with its hooks: an ejection resets the policy's predictions, a suspect
replica is checked at once), the upstream pool and the request pipeline (`Proxy`), and keeps
them in step when membership changes (`_membership_changed`). What runs beside the request path
is started and stopped by `gpufleet.router.lifespan`; `gpufleet.router.app` serves it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gpufleet.router import endpoints, errors
from gpufleet.router.config import RouterConfig
from gpufleet.router.discovery import EndpointSliceWatcher
from gpufleet.router.endpoints import resolve_admin_token
from gpufleet.router.health import HealthChecker, HealthTracker
from gpufleet.router.kvevents import runtime as kvevents_runtime
from gpufleet.router.lifespan import run_lifespan
from gpufleet.router.membership import ConfigReloader
from gpufleet.router.metrics import RouterMetrics
from gpufleet.router.peers import new_router_id
from gpufleet.router.policies import Policy, registry
from gpufleet.router.prediction_cache import make_prediction_cache
from gpufleet.router.proxy import Proxy
from gpufleet.router.replicas import MembershipChange, ReplicaSet
from gpufleet.router.sessions import SessionBinder
from gpufleet.router.tenant import TenantResolver
from gpufleet.router.types import ReplicaState
from gpufleet.router.upstream import UpstreamPool
from gpufleet.router.upstream.request import UpstreamTarget

__all__ = ["Router"]

log = logging.getLogger("gpufleet.router")


class Router:
    """The router's state: config, replica set, policy, caches, metrics, health, upstream pool."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        policy: Policy | None = None,
        admin_token: str | None = None,
        environ: Mapping[str, str] | None = None,
        config_path: str | Path | None = None,
        reload_interval_s: float = 1.0,
        kube_api_client: Any = None,
    ) -> None:
        self.config = config
        s = self.settings = config.settings
        self.replicas = ReplicaSet(config.replicas)
        self.metrics = RouterMetrics(((r.id, r.model) for r in self.replicas), policy.name if policy else s.policy)
        self.metrics.watch_replicas(lambda: self.replicas)  # queued prefill, read at each scrape
        # Precise mode (KV events) when enabled and a tokenizer loads; else None, said once in the log.
        self.kv = kvevents_runtime.build(config, self.metrics.registry)
        kv_ctx: dict[str, Any] = {"kv_index": self.kv.index} if self.kv is not None else {}
        self.policy = policy or registry.make(s.policy, s, **kv_ctx)
        if policy is not None and self.kv is not None:
            policy.bind(clock=policy.clock, kv_index=self.kv.index)
        try:
            self.cache = make_prediction_cache(s.prediction_cache, environ) if s.prediction_cache.enabled else None
        except ValueError as exc:
            raise errors.ConfigError(str(exc)) from None
        self.admin_token = admin_token if admin_token is not None else resolve_admin_token(s.admin_token, environ)
        self.router_id = new_router_id()
        """This process's id among its peer routers (`router.peers`)."""
        tokens = self.metrics.session_tokens
        self.sessions = SessionBinder(s.session, environ, on_token=lambda why: tokens.labels(why).inc())
        self.health = HealthTracker(
            s.health, self.replicas, on_eject=self._ejected, on_readmit=self._readmitted, on_suspect=self._suspect
        )
        self.upstream = UpstreamPool(connect_timeout_s=s.connect_timeout_s)  # the proxied requests
        self.session: aiohttp.ClientSession | None = None  # health checks only; opened by the lifespan
        self.checker: HealthChecker | None = None
        self.proxy = Proxy(
            s,
            self.replicas,
            self.policy,
            self.metrics,
            self.health,
            self.upstream,
            self.cache,
            TenantResolver(s.tenant, environ),
            sessions=self.sessions,
        )
        self.proxy.attempts.kv = self.kv
        self.draining = False
        """Set on SIGTERM/SIGINT: /ready answers 503 while in-flight requests finish (`gpufleet router serve`)."""
        self.replicas.subscribe(self._membership_changed)
        self.reloader = ConfigReloader(self, config_path, interval_s=reload_interval_s) if config_path else None
        self.kube_api_client = kube_api_client
        """A kubernetes `ApiClient` for discovery (tests); None: from the kubeconfig or the pod's account."""
        k8s = config.discovery.kubernetes
        self.discovery = (
            EndpointSliceWatcher(k8s, self.replicas, self.metrics, api_client=kube_api_client) if k8s else None
        )

    # -- membership -----------------------------------------------------------------------
    def _membership_changed(self, change: MembershipChange) -> None:
        """Replicas joined or left (`ReplicaSet.replace`): health records, metrics, policy, connections."""
        for r in change.removed:
            self.health.remove(r.id)
            self.metrics.remove_replica(r.id)
            self.policy.on_replica_removed(r.id)
            if self.kv is not None:
                self.kv.replica_removed(r.id)
            t = UpstreamTarget(r.url)
            if not any(x.host == t.host and x.port == t.port for x in self.replicas.targets.values()):
                self.upstream.forget(t.host, t.port, t.tls)
            self.metrics.membership.labels(change.source, "removed").inc()
        for r in change.added:
            self.health.add(r)
            if self.kv is not None:  # it routes approximately until its event stream speaks
                cfg = next((c for c in self.replicas.configs(change.source) if c.id == r.id), None)
                if cfg is not None:
                    self.kv.replica_added(cfg)
            self.metrics.add_replica(r.id)
            self.metrics.membership.labels(change.source, "added").inc()
        if change.updated:
            self.metrics.membership.labels(change.source, "updated").inc(len(change.updated))
        s = change.summary()
        log.info(
            "membership of %s: added %s, removed %s, updated %s; %d replicas",
            change.source,
            ",".join(s["added"]) or "-",
            ",".join(s["removed"]) or "-",
            ",".join(s["updated"]) or "-",
            len(self.replicas),
        )

    # -- health hooks ---------------------------------------------------------------------
    def _ejected(self, r: ReplicaState, kind: str, reason: str) -> None:
        log.warning("replica %s ejected: %s", r.id, reason)
        self.metrics.ejections.labels(r.id).inc()
        self.metrics.ejection_reasons.labels(kind).inc()
        self.metrics.healthy.labels(r.id).set(0)
        self.policy.on_replica_reset(r.id)  # whatever it held is no longer a safe prediction

    def _suspect(self, r: ReplicaState) -> None:
        if self.checker is not None:
            self.checker.probe_soon(r)  # a hung or dead replica is out within one check timeout

    def _readmitted(self, r: ReplicaState) -> None:
        log.info("replica %s re-admitted", r.id)
        self.metrics.readmissions.labels(r.id).inc()
        self.metrics.healthy.labels(r.id).set(1)

    # -- lifespan and admin authorization -------------------------------------------------
    def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: own the client session, the upstream pool and the health-check task."""
        return run_lifespan(self, app)

    def authorize_admin(self, request: web.Request) -> None:
        """Raise `Unauthorized` / `Forbidden` unless the request carries the admin bearer token."""
        endpoints.authorize_admin(self, request)
