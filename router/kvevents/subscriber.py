"""The router's side of the KV-event streams: one ZMQ SUB per replica, replay, reset, watchdog.

Per replica (`EventStreams.run`, one task each):

- SUB on the replica's endpoint, subscribed to the topic; every message is three frames
  `(topic, seq, payload)` (`gpufleet.router.kvevents.wire`). Anything else is counted
  (`malformed`) and skipped; a payload's unreadable events are counted (`malformed`,
  `unknown_tag`) and the rest applied.
- Sequence numbers: the live stream of one engine only counts up, so a live seq at or below the
  last one *received live* means the engine restarted (its sequence starts again at 0, and the
  SUB may have missed its first batches while it reconnected): the index is cleared and the
  batch applied. A live seq at or below the last one *applied* but above the last received live
  is a batch a replay already applied (a replay overlaps the live stream), skipped. A gap asks the replica's replay
  endpoint (a DEALER speaking to vLLM's ROUTER: `[b"", start]`, answers `[b"", seq, payload]`
  until `END_SEQ`) for the missing batches, waiting at most `replay_timeout_s`; if the replay
  cannot fill the gap (no endpoint, timeout, the buffer rolled over) the replica's index is reset
  (`resets`): forgetting is safe, a wrong belief is not.
- State: a replica is `events` (exact) once its stream has spoken, `approximate` before. The
  watchdog flips a replica back to `approximate` when a request was routed to it more than
  `silence_s` ago and nothing arrived since: one warning log line, the gauge
  `gpufleet_router_kv_state{replica,state}` and the admin view say so. The next message makes it
  exact again (after the gap handling above).

Data-parallel ranks (`gpufleet.router.kvevents.ranks`): a replica with `data_parallel_size` N has
N streams (rank r on the ports + r), each with its own sequence, replay and gap handling, all fed
into the replica's one index entry. The index counts a block stored by two ranks twice, so it
stays held until both evicted it. A reset or `AllBlocksCleared` on one rank forgets the whole
replica's blocks (forgetting is safe; the others are learned again as they are stored or reused).
With a `rank_index`, each rank's events also feed that index under the rank's stream key, so the
server can tell which rank holds a prompt (`KvEvents.rank_for`).

Nothing here raises out of a task on bad input or a dead peer: sockets reconnect by themselves
(ZMQ), and an unexpected error is logged once per replica and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from gpufleet.router.kvevents import wire
from gpufleet.router.kvevents.index import KvIndex
from gpufleet.router.kvevents.metrics import KvEventMetrics

__all__ = ["EventStreams", "KvEventMetrics", "StreamEndpoint", "StreamStatus"]

log = logging.getLogger("gpufleet.router.kvevents")


@dataclass(frozen=True, slots=True)
class StreamEndpoint:
    """Where one replica publishes: the PUB endpoint and, optionally, its replay ROUTER."""

    endpoint: str
    replay_endpoint: str | None = None


@dataclass(slots=True)
class StreamStatus:
    """One replica's stream, as the admin view shows it."""

    endpoint: StreamEndpoint
    replica: str = ""
    rank: int = 0
    """The engine's data-parallel rank whose stream this is (its ports are offset by it)."""
    last_seq: int | None = None
    """The last batch applied (from the live stream or a replay)."""
    live_seq: int | None = None
    """The last batch received on the live stream: an engine's live sequence only counts up."""
    messages: int = 0
    replays: int = 0
    resets: int = 0
    malformed: int = 0
    unknown_tags: int = 0
    fallbacks: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class EventStreams:
    """Every replica's KV-event subscriber and the watchdog, fed into one `KvIndex`."""

    def __init__(
        self,
        index: KvIndex,
        endpoints: Mapping[str, StreamEndpoint | Sequence[StreamEndpoint]],
        metrics: KvEventMetrics,
        *,
        topic: str = "kv-events",
        silence_s: float = 5.0,
        replay_timeout_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        rank_index: KvIndex | None = None,
    ) -> None:
        self.index = index
        self.rank_index = rank_index
        self.metrics = metrics
        self.topic = topic.encode()
        self.silence_s = silence_s
        self.replay_timeout_s = replay_timeout_s
        self.clock = clock
        self.status: dict[str, StreamStatus] = {}
        """One per stream, keyed by `stream_key`: the replica id for rank 0."""
        self._streams: dict[str, list[str]] = {}  # replica -> its stream keys
        for rid, eps in endpoints.items():
            self._track(rid, eps)
        self._ctx: zmq.asyncio.Context | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._by_replica: dict[str, asyncio.Task[None]] = {}
        self._leaving: set[asyncio.Task[None]] = set()  # cancelled streams of replicas that left
        self._counted: dict[str, tuple[int, int, int, int]] = {}

    @staticmethod
    def stream_key(replica_id: str, rank: int) -> str:
        """The key of one rank's stream: the replica id for rank 0, `<id>#dp<rank>` for the others."""
        return replica_id if rank == 0 else f"{replica_id}#dp{rank}"

    def ranks_of(self, replica_id: str) -> list[str]:
        """The replica's stream keys, rank 0 first (one for a replica without data parallelism)."""
        return self._streams.get(replica_id, [])

    def _track(self, rid: str, eps: StreamEndpoint | Sequence[StreamEndpoint]) -> list[str]:
        ranks = [eps] if isinstance(eps, StreamEndpoint) else list(eps)
        keys = []
        for rank, ep in enumerate(ranks):
            key = self.stream_key(rid, rank)
            self.status[key] = StreamStatus(ep, rid, rank)
            keys.append(key)
        self._streams[rid] = keys
        rb = self.index.replicas.get(rid)
        if self.rank_index is not None and len(keys) > 1 and rb is not None:
            for key in keys:  # each rank has its own KV pool: the replica's share
                self.rank_index.add_replica(key, rb.capacity_blocks // len(keys), exact=True)
        return keys

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect every subscriber and start the watchdog (inside the serving loop)."""
        self._ctx = zmq.asyncio.Context()
        for key in self.status:
            self._by_replica[key] = asyncio.create_task(self._subscribe(key), name=f"kv-events:{key}")
        self._tasks.append(asyncio.create_task(self._watchdog(), name="kv-events-watchdog"))
        log.info(
            "kv events: subscribing to %d replicas (%d streams); each routes approximately until its stream speaks",
            len(self._streams),
            len(self.status),
        )

    def add(self, rid: str, endpoints: StreamEndpoint | Sequence[StreamEndpoint]) -> None:
        """Subscribe to a replica that joined (membership change), one stream per data-parallel
        rank; a running stream is restarted."""
        self.remove(rid)
        keys = self._track(rid, endpoints)
        self.metrics.set_state(rid, False)
        if self._ctx is not None:
            for key in keys:
                self._by_replica[key] = asyncio.create_task(self._subscribe(key), name=f"kv-events:{key}")

    def remove(self, rid: str) -> None:
        """Stop the streams of a replica that left: their sockets close as their tasks end."""
        for key in self._streams.pop(rid, ()):
            task = self._by_replica.pop(key, None)
            if task is not None:
                task.cancel()
                self._leaving.add(task)
                task.add_done_callback(self._leaving.discard)
            self.status.pop(key, None)
            if self.rank_index is not None:
                self.rank_index.remove_replica(key)
        self._counted.pop(rid, None)
        self.metrics.forget(rid)

    async def stop(self) -> None:
        for t in self._by_replica.values():
            t.cancel()
        self._tasks.extend(self._by_replica.values())
        self._tasks.extend(self._leaving)
        self._by_replica.clear()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    # -- one replica ------------------------------------------------------------------------------
    async def _subscribe(self, key: str) -> None:
        st = self.status.get(key)
        if self._ctx is None or st is None:
            return
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        sub.connect(st.endpoint.endpoint)
        replay: zmq.asyncio.Socket | None = None
        logged = False
        try:
            if st.endpoint.replay_endpoint is not None:
                # What the engine did before this router started: its replay buffer from seq 0.
                replay = self._replay_socket(st.endpoint.replay_endpoint)
                if not await self._replay_from(key, replay, 0, None):
                    replay.close(linger=0)  # it may answer late: a later replay starts a new socket
                    replay = None
            while True:
                frames = await sub.recv_multipart()
                try:
                    replay = await self._handle(key, frames, replay)
                except Exception:  # a bug must not end the stream: log once, count, go on
                    self.metrics.problem(st.replica, "error")
                    if not logged:
                        log.exception("kv events: stream %s: error applying a message", key)
                        logged = True
        finally:
            sub.close(linger=0)
            if replay is not None:
                replay.close(linger=0)

    def _replay_socket(self, endpoint: str) -> zmq.asyncio.Socket:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    async def _handle(
        self, key: str, frames: list[bytes], replay: zmq.asyncio.Socket | None
    ) -> zmq.asyncio.Socket | None:
        st = self.status[key]
        rid = st.replica
        seq = wire.seq_from_bytes(frames[1]) if len(frames) == 3 else None
        if seq is None or seq < 0:
            st.malformed += 1
            self.metrics.problem(rid, "malformed")
            return replay
        last = st.last_seq
        restarted = st.live_seq is not None and seq <= st.live_seq
        st.live_seq = seq
        if restarted:
            log.warning("kv events: stream %s restarted its sequence: the replica's index is reset", key)
            self._reset(key)
            last = None
        if last is not None:
            if seq <= last:
                return replay  # already applied (a replay overlapped the live stream)
            elif seq > last + 1:
                self.metrics.problem(rid, "gap")
                if st.endpoint.replay_endpoint is not None:
                    if replay is None:
                        replay = self._replay_socket(st.endpoint.replay_endpoint)
                    filled = await self._replay_from(key, replay, last + 1, seq)
                    if not filled:
                        # A DEALER with an unanswered request would hold stale answers: start anew.
                        replay.close(linger=0)
                        replay = None
                if st.last_seq is None or st.last_seq < seq - 1:
                    log.warning(
                        "kv events: stream %s missed batches %d..%d and replay could not fill them: index reset",
                        key,
                        (st.last_seq if st.last_seq is not None else last) + 1,
                        seq - 1,
                    )
                    self._reset(key)
        self._apply(key, seq, frames[2])
        return replay

    async def _replay_from(self, key: str, sock: zmq.asyncio.Socket, start: int, upto: int | None) -> bool:
        """Ask for every batch from `start`; apply those in order. True when it reached `upto - 1`."""
        st = self.status[key]
        rid = st.replica
        st.replays += 1
        self.metrics.problem(rid, "replay")
        await sock.send_multipart((b"", start.to_bytes(8, "big")))
        deadline = self.clock() + self.replay_timeout_s
        while True:
            left = deadline - self.clock()
            if left <= 0 or not await sock.poll(left * 1000):
                return False
            frames = await sock.recv_multipart()
            if frames and frames[0] == b"":
                frames = frames[1:]
            if len(frames) != 2:
                st.malformed += 1
                self.metrics.problem(rid, "malformed")
                continue
            seq = wire.seq_from_bytes(frames[0])
            if seq is None:
                st.malformed += 1
                self.metrics.problem(rid, "malformed")
                continue
            if seq < 0:  # END_SEQ
                return upto is None or (st.last_seq is not None and st.last_seq >= upto - 1)
            if upto is not None and seq >= upto:
                continue  # the live stream delivers it
            last = st.last_seq
            if last is not None and seq <= last:
                continue
            if last is not None and seq != last + 1:
                return False  # the buffer no longer holds what is missing
            if last is None and start > 0 and seq != start:
                return False
            self._apply(key, seq, frames[1])

    def _apply(self, key: str, seq: int, payload: bytes) -> None:
        st = self.status.get(key)
        if st is None:  # the replica left while this message was on its way
            return
        rid = st.replica
        res = wire.decode_batch(payload)
        st.last_seq = seq
        st.messages += 1
        if res.malformed:
            st.malformed += res.malformed
            self.metrics.problem(rid, "malformed", res.malformed)
        if res.unknown_tags:
            st.unknown_tags += res.unknown_tags
            self.metrics.problem(rid, "unknown_tag", res.unknown_tags)
        index = self.index
        index.apply(rid, res.events, self.clock())
        if self.rank_index is not None and key in self.rank_index.replicas:
            self.rank_index.apply(key, res.events, None)
        self.metrics.messages.labels(rid).inc()
        rb = index.replicas.get(rid)
        if rb is not None:
            c = rb.counters
            now = (c.unknown_blocks, c.unknown_parent, c.skipped, c.overflows)
            before = self._counted.get(rid, (0, 0, 0, 0))
            for kind, n, b in zip(("unknown_block", "unknown_parent", "skipped", "overflow"), now, before):
                self.metrics.problem(rid, kind, n - b)
            self._counted[rid] = now
        if index.set_exact(rid, True):
            self.metrics.set_state(rid, True)
            log.info("kv events: replica %s routes from its KV events (exact)", rid)

    def _reset(self, key: str) -> None:
        st = self.status[key]
        st.resets += 1
        st.last_seq = None
        self.metrics.problem(st.replica, "reset")
        self.index.clear(st.replica)
        if self.rank_index is not None:
            self.rank_index.clear(key)

    # -- the watchdog -------------------------------------------------------------------------------
    async def _watchdog(self) -> None:
        period = max(0.05, min(1.0, self.silence_s / 4))
        while True:
            await asyncio.sleep(period)
            self.check()

    def check(self) -> list[str]:
        """Fall back to approximate for every exact replica silent past the bound; returns them."""
        silent = self.index.silent(self.clock(), self.silence_s)
        for rid in silent:
            if self.index.set_exact(rid, False):
                st = self.status.get(rid)
                if st is not None:
                    st.fallbacks += 1
                self.metrics.set_state(rid, False)
                self.metrics.problem(rid, "fallback")
                log.warning(
                    "kv events: replica %s sent no KV event for %.1f s after a request: routing it approximately",
                    rid,
                    self.silence_s,
                )
        return silent

    def admin_view(self, rid: str) -> dict[str, Any] | None:
        """The replica's KV-state row for /admin/replicas (None when it has no stream); counts
        are summed over its data-parallel ranks, `ranks` lists each rank's stream."""
        streams = [self.status[k] for k in self._streams.get(rid, ()) if k in self.status]
        if not streams:
            return None
        st = streams[0]
        rb = self.index.replicas.get(rid)
        c = rb.counters if rb is not None else None
        row: dict[str, Any] = {
            "state": "events" if self.index.exact(rid) else "approximate",
            "endpoint": st.endpoint.endpoint,
            "replay_endpoint": st.endpoint.replay_endpoint,
            "last_seq": st.last_seq,
            "batches": sum(x.messages for x in streams),
            "blocks": self.index.blocks(rid),
            "replays": sum(x.replays for x in streams),
            "resets": sum(x.resets for x in streams),
            "fallbacks": st.fallbacks,
            "malformed": sum(x.malformed for x in streams),
            "unknown_tags": sum(x.unknown_tags for x in streams),
            "unknown_blocks": c.unknown_blocks if c else 0,
            "unknown_parent": c.unknown_parent if c else 0,
            "skipped": c.skipped if c else 0,
        }
        if len(streams) > 1:
            row["ranks"] = [
                {"rank": x.rank, "endpoint": x.endpoint.endpoint, "last_seq": x.last_seq, "batches": x.messages}
                for x in streams
            ]
        return row
