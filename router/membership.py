"""Changing the router's membership at run time: the config file reloader and the admin API.

Both edit the `config` source of the `ReplicaSet` (`gpufleet.router.replicas`); Kubernetes
discovery owns sources of its own. Nothing is half-applied: a config file or an admin body with
a problem changes nothing, and every problem is reported (logged for a reload, in the 4xx body
for the admin API).

Config file (`gpufleet router serve --config FILE`): `ConfigReloader` polls the file's stamp
(mtime, size, inode) every `interval_s` and reloads on change; SIGHUP and `POST /admin/reload`
reload at once. A reload applies the new replica list; changed `settings` (or another `fleet`)
are reported and need a restart. Write the file atomically (a temporary file, then rename), or a
half-written file is read, refused, and read again when it changes once more.

Admin API (bearer token, like `GET /admin/replicas`):

    PUT    /admin/replicas           {"replicas": [ReplicaConfig, ...]}   the config source's whole list
    POST   /admin/replicas           ReplicaConfig                        add one, or update it by id
    DELETE /admin/replicas/{id}                                           remove one
    POST   /admin/reload                                                  re-read the config file now

Each answers 200 `{"added": [ids], "removed": [ids], "updated": [ids], "replicas": N}`. A body
that does not validate is 400 (every problem in the message), a replica id owned by discovery is
409, an unknown id to DELETE is 404, a config file that does not load is 422 (the old one stays).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import ValidationError

from gpufleet.router import errors
from gpufleet.router.config import ReplicaConfig, RouterConfig
from gpufleet.router.loader import load_router_config
from gpufleet.router.replicas import CONFIG_SOURCE, MembershipChange

if TYPE_CHECKING:
    from gpufleet.router.app import Router

__all__ = ["ConfigReloader", "ReloadResult", "admin_routes", "parse_replica", "parse_replicas"]

log = logging.getLogger("gpufleet.router.membership")


@dataclass(slots=True)
class ReloadResult:
    """What one reload did: applied (`change`), or refused with every `problems` line."""

    ok: bool
    change: MembershipChange | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Differences reported but not applied (settings, fleet name)."""


def _changed_settings(old: RouterConfig, new: RouterConfig) -> list[str]:
    a, b = old.settings.model_dump(), new.settings.model_dump()
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


class ConfigReloader:
    """Reloads the router config file on change, on SIGHUP and on request (module docs)."""

    def __init__(self, router: Router, path: str | Path, *, interval_s: float = 1.0) -> None:
        self.router = router
        self.path = Path(path)
        self.interval_s = interval_s
        self._stamp = self._read_stamp()

    def _read_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def reload(self) -> ReloadResult:
        """Read the file and apply its replicas; on any problem keep what runs and log each one."""
        self._stamp = self._read_stamp()
        router = self.router
        metrics = router.metrics.config_reloads
        try:
            cfg = load_router_config(self.path)
            if cfg.fleet != router.config.fleet:
                raise errors.ConfigError(
                    f"{self.path}: fleet: {cfg.fleet!r} is not the fleet this router serves "
                    f"({router.config.fleet!r}); start a router for it instead"
                )
            change = router.replicas.replace(cfg.replicas, source=CONFIG_SOURCE)
        except errors.ConfigError as exc:
            problems = [line for part in str(exc).splitlines() for line in part.split("; ") if line]
            for line in problems:
                log.error("config reload refused: %s", line)
            log.error("config reload refused: keeping the previous config (%d replicas)", len(router.replicas))
            metrics.labels("error").inc()
            return ReloadResult(ok=False, problems=problems)
        notes = []
        changed = _changed_settings(router.config, cfg)
        if changed:
            notes.append(f"settings changed ({', '.join(changed)}): they apply when the router restarts")
            log.warning("config reload: %s", notes[-1])
        router.config = router.config.model_copy(update={"replicas": cfg.replicas})
        metrics.labels("ok").inc()
        s = change.summary()
        log.info(
            "config reloaded from %s: %d replicas (added %s, removed %s, updated %s)",
            self.path,
            len(router.replicas),
            ",".join(s["added"]) or "-",
            ",".join(s["removed"]) or "-",
            ",".join(s["updated"]) or "-",
        )
        return ReloadResult(ok=True, change=change, notes=notes)

    def changed(self) -> bool:
        """True when the file's stamp differs from the one last read."""
        return self._read_stamp() != self._stamp

    async def run(self) -> None:
        """Poll forever, every `interval_s`; cancelled by the app's cleanup."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                if self.changed():
                    self.reload()
            except Exception:  # a bug here must not stop reloading for good
                log.exception("config reload failed")


# ---------------------------------------------------------------------------------------
# Admin API


def _validation_problems(exc: ValidationError, prefix: str) -> str:
    lines = []
    for err in exc.errors():
        loc = prefix
        for part in err.get("loc", ()):
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        lines.append(f"{loc or '(body)'}: {err.get('msg', 'invalid')}")
    return "; ".join(lines)


def parse_replica(payload: Any, prefix: str = "") -> ReplicaConfig:
    """One `ReplicaConfig` from a JSON body; `MalformedRequest` naming every problem."""
    try:
        return ReplicaConfig.model_validate(payload)
    except ValidationError as exc:
        raise errors.MalformedRequest(_validation_problems(exc, prefix)) from None


def parse_replicas(payload: Any) -> list[ReplicaConfig]:
    """The replica list of a `PUT /admin/replicas` body (`{"replicas": [...]}`)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("replicas"), list):
        raise errors.MalformedRequest('the body must be {"replicas": [replica, ...]}', param="replicas")
    out, problems = [], []
    for i, item in enumerate(payload["replicas"]):
        try:
            out.append(parse_replica(item, f"replicas[{i}]"))
        except errors.MalformedRequest as exc:
            problems.append(exc.message)
    if problems:
        raise errors.MalformedRequest("; ".join(problems), param="replicas")
    return out


async def _json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise errors.MalformedRequest("the body is not valid JSON") from None


def _replace(router: Router, configs: list[ReplicaConfig]) -> MembershipChange:
    problems = router.replicas.problems(configs, source=CONFIG_SOURCE)
    if problems:
        cls = errors.MembershipConflict if any("already comes from" in p for p in problems) else errors.MalformedRequest
        raise cls("; ".join(problems))
    return router.replicas.replace(configs, source=CONFIG_SOURCE)


def _answer(router: Router, change: MembershipChange | None, **extra: Any) -> web.Response:
    summary = change.summary() if change is not None else {"added": [], "removed": [], "updated": []}
    body = {**summary, "replicas": len(router.replicas), **extra}
    return web.Response(status=200, body=json.dumps(body).encode(), content_type="application/json")


def admin_routes(router: Router) -> list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]]:
    """(method, path, handler) of the membership admin endpoints of `router` (module docs)."""
    from gpufleet.router.proxy import error_response

    def guarded(
        fn: Callable[[web.Request], Awaitable[web.Response]],
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                router.authorize_admin(request)
                return await fn(request)
            except errors.RouterError as exc:
                log.warning("admin %s %s refused: %s", request.method, request.path, exc.message)
                return error_response(exc)

        return handler

    async def put(request: web.Request) -> web.Response:
        return _answer(router, _replace(router, parse_replicas(await _json_body(request))))

    async def post(request: web.Request) -> web.Response:
        new = parse_replica(await _json_body(request))
        rest = [c for c in router.replicas.configs(CONFIG_SOURCE) if c.id != new.id]
        return _answer(router, _replace(router, [*rest, new]))

    async def delete(request: web.Request) -> web.Response:
        rid = request.match_info["replica_id"]
        owner = router.replicas.source_of(rid)
        if owner is None:
            exc = errors.RequestError(f"no replica {rid!r} in the set")
            exc.status, exc.code = 404, "replica_not_found"
            raise exc
        if owner != CONFIG_SOURCE:
            raise errors.MembershipConflict(f"replica {rid!r} comes from {owner}: it leaves when its endpoint does")
        return _answer(router, router.replicas.remove(rid, source=CONFIG_SOURCE))

    async def reload(request: web.Request) -> web.Response:
        reloader = router.reloader
        if reloader is None:
            raise errors.MalformedRequest("this router was not started from a config file: nothing to reload")
        result = reloader.reload()
        if not result.ok:
            exc = errors.RequestError(
                "the config file was refused, the previous one stays: " + "; ".join(result.problems)
            )
            exc.status, exc.code = 422, "invalid_config"
            raise exc
        return _answer(router, result.change, notes=result.notes)

    return [
        ("PUT", "/admin/replicas", guarded(put)),
        ("POST", "/admin/replicas", guarded(post)),
        ("DELETE", "/admin/replicas/{replica_id}", guarded(delete)),
        ("POST", "/admin/reload", guarded(reload)),
    ]
