"""Peer routers: router replicas read each other's own per-replica queue state.

Each router knows its own requests exactly (`ReplicaState.queued_prefill_tokens`,
`queued_requests`, `in_flight`); another router's load reaches it otherwise only through the
engines' samples (`router.engine_load`), which cannot tell how much prefill a request still
queues (vLLM counts a prefilling request as running). So every router serves its own counts,

    GET /admin/peer-state      (admin bearer token)
    {"router": "<this process's id>",
     "replicas": {"<replica id>": {"queued_prefill_tokens": 2048, "queued_requests": 1, "in_flight": 3}, ...}}

and `PeerPoller` reads every other router's every `peer_interval_s` (default 0.1 s), each read
bounded by `peer_timeout_s` and run by its own task (a slow peer delays only its own reports;
one whose previous read is still running is skipped that round), and records each replica's
counts (`ReplicaState.report_peer_load`, 0s for a replica the peer does not list); the `ttft`
scorer then prices those routers' queued prefill exactly (router/policies/scorers/ttft.py).

The peers are `discovery.peers.urls` and, with `discovery.peers.kubernetes`, the ready endpoints
of the router Service's EndpointSlices (`router.discovery.list_peer_urls`, listed again every
`refresh_s`). A router recognises itself among them by the id it answers with and skips that
address. A read that fails, times out, is refused or does not parse drops that peer's reports
(the engine samples cover its requests again, as for a router that does not report), is counted
in `gpufleet_router_peer_reads_total{result}` and logged once when the peer's state changes
(up, down). Without peers, without an admin token (the peers authenticate with it) or with
`peer_interval_s: 0` nothing is read and routing is as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from gpufleet.router.engine_load import run_rounds
from gpufleet.router.types import ReplicaState

if TYPE_CHECKING:
    import aiohttp

__all__ = ["MAX_BODY_BYTES", "RESULTS", "PeerPoller", "new_router_id", "parse_peer_state", "peer_state"]

log = logging.getLogger("gpufleet.router.peers")

RESULTS = ("ok", "failed", "refused", "invalid", "self")
"""ok; failed: no answer in time, or not 200 (beyond 401/403); refused: 401/403 (the tokens
differ); invalid: the body is not a peer state; self: the address is this router's own."""

MAX_BODY_BYTES = 4 * 1024 * 1024
"""A peer state larger than this is invalid (a few dozen bytes per replica)."""

_MAX_COUNT = 1 << 40

Counts = tuple[int, int, int]
"""(queued prefill tokens, queued requests, in-flight requests)."""


def new_router_id() -> str:
    """This process's id among its peers: host name (a pod's name), pid and a random part."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


def peer_state(router_id: str, replicas: Iterable[ReplicaState]) -> dict[str, Any]:
    """This router's own counts per replica: the body of GET /admin/peer-state."""
    return {
        "router": router_id,
        "replicas": {
            r.id: {
                "queued_prefill_tokens": r.queued_prefill_tokens,
                "queued_requests": r.queued_requests,
                "in_flight": r.in_flight,
            }
            for r in replicas
        },
    }


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_COUNT:
        raise ValueError(f"not a count: {value!r}")
    return value


def parse_peer_state(body: bytes) -> tuple[str, dict[str, Counts]]:
    """(router id, counts per replica id) of a peer-state body; ValueError when it is not one."""
    data = json.loads(body)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(data, dict):
        raise ValueError("a peer state is a JSON object")
    rid = data.get("router")
    reps = data.get("replicas")
    if not isinstance(rid, str) or not rid or len(rid) > 256:
        raise ValueError("a peer state needs its router id")
    if not isinstance(reps, dict):
        raise ValueError("a peer state needs its replicas")
    out: dict[str, Counts] = {}
    for k, v in reps.items():
        if not isinstance(v, dict):
            raise ValueError(f"replica {k!r}: not an object")
        out[k] = (_count(v.get("queued_prefill_tokens")), _count(v.get("queued_requests")), _count(v.get("in_flight")))
    return rid, out


class PeerPoller:
    """Reads every peer's state every interval into the replicas' states (module docs)."""

    def __init__(
        self,
        router_id: str,
        peers: Callable[[], Iterable[str]],
        replicas: Callable[[], Iterable[ReplicaState]],
        session: aiohttp.ClientSession,
        token: str,
        *,
        interval_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_result: Callable[[str], None] | None = None,
        refresh: Callable[[], Coroutine[Any, Any, None]] | None = None,
        refresh_s: float = 10.0,
    ) -> None:
        """`peers()` is read every round (base URLs); `refresh()`, when given, runs in a task of its own every
        `refresh_s` (discovery updates what `peers()` returns); `on_result(result)` sees each
        read's result (RESULTS)."""
        self.router_id = router_id
        self.peers = peers
        self.replicas = replicas
        self.session = session
        self.token = token
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.on_result = on_result
        self.refresh = refresh
        self.refresh_s = refresh_s
        self.own_urls: set[str] = set()
        """Addresses that answered with this router's id: never read again."""
        self._peer_of: dict[str, str] = {}  # url -> the router id it answered with last
        self._up: dict[str, bool] = {}  # url -> last state, for one log line per change

    def _forget(self, url: str) -> None:
        peer = self._peer_of.pop(url, None)
        if peer is not None and peer not in self._peer_of.values():
            for r in self.replicas():
                r.forget_peer(peer)

    def _state(self, url: str, up: bool, why: str) -> None:
        if self._up.get(url) != up:
            self._up[url] = up
            if up:
                log.info("peer router %s: reading its state", url)
            else:
                log.warning("peer router %s: %s; its load comes from the engine samples meanwhile", url, why)

    async def read(self, url: str) -> str:
        """Read one peer's state into the replicas' states; the result (RESULTS)."""
        import aiohttp

        result, why = "failed", "no answer"
        state: tuple[str, dict[str, Counts]] | None = None
        try:
            async with self.session.get(
                url.rstrip("/") + "/admin/peer-state",
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                allow_redirects=False,
            ) as resp:
                if resp.status in (401, 403):
                    result, why = "refused", f"refused ({resp.status}): is its admin token the same?"
                elif resp.status != 200:
                    why = f"answered {resp.status}"
                else:
                    body = await resp.content.read(MAX_BODY_BYTES + 1)
                    result, why = "invalid", "its answer is not a peer state"
                    if len(body) <= MAX_BODY_BYTES:
                        state = parse_peer_state(body)
                        result = "ok"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            why = f"unreachable ({type(exc).__name__})"
        except ValueError:
            pass
        if state is not None and state[0] == self.router_id:
            result = "self"
            self.own_urls.add(url)
            self._forget(url)
        elif state is not None:
            peer, counts = state
            if self._peer_of.get(url) not in (None, peer):
                self._forget(url)  # another router answers there now (a restart)
            self._peer_of[url] = peer
            now = self.clock()
            for r in self.replicas():
                q_tokens, q_requests, in_flight = counts.get(r.id, (0, 0, 0))
                r.report_peer_load(peer, q_tokens, q_requests, in_flight, now)
            self._state(url, True, "")
        else:
            self._forget(url)
            self._state(url, False, why)
        if self.on_result is not None:
            self.on_result(result)
        return result

    async def run(self) -> None:
        """Read forever, one task per peer per round; cancelled by the app's cleanup."""
        next_refresh = float("-inf")

        async def round_(running: dict[str, asyncio.Task[Any]]) -> None:
            nonlocal next_refresh
            listing = running.get("")
            if self.refresh is not None and time.monotonic() >= next_refresh and (listing is None or listing.done()):
                # In its own task: a slow API server delays the next list, never the peers' reads.
                next_refresh = time.monotonic() + self.refresh_s
                running[""] = asyncio.create_task(self.refresh())
            urls = {u for u in self.peers() if u not in self.own_urls}
            for gone in [u for u in self._peer_of if u not in urls]:
                self._forget(gone)
                self._up.pop(gone, None)
            for u in urls:
                task = running.get(u)
                if task is None or task.done():
                    running[u] = asyncio.create_task(self.read(u))
            for u in [u for u, t in running.items() if u and u not in urls and t.done()]:
                del running[u]

        await run_rounds(round_, self.interval_s, "peer-state")
