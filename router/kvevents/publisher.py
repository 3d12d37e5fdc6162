"""A KV-event publisher speaking vLLM's protocol: PUB `(topic, seq, payload)` and a replay ROUTER.

What `gpufleet replica-sim` publishes with, and what the tests talk to: the same framing as
vLLM's `ZmqEventPublisher` (sequence numbers from 0, 8 bytes big-endian; a bounded buffer of past
payloads; a replay request `[identity, b"", start_seq]` answered with `[identity, b"", seq,
payload]` for every buffered `seq >= start_seq`, then `[identity, b"", END_SEQ, b""]`).
Endpoints follow vLLM's rule: bind when the address has a wildcard (`tcp://*:5557`), else bind
the address as given (the simulated replica owns its ports).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import zmq
import zmq.asyncio

from gpufleet.router.kvevents import ranks, wire

__all__ = ["EventPublisher"]

log = logging.getLogger("gpufleet.kvevents")


class EventPublisher:
    """PUB + replay ROUTER on the running event loop; `publish` is synchronous and never blocks."""

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        *,
        topic: str = "kv-events",
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        data_parallel_rank: int = 0,
    ) -> None:
        # As vLLM's: rank r binds the endpoints with their ports + r and stamps its batches.
        self.data_parallel_rank = data_parallel_rank
        endpoint = ranks.offset_endpoint_port(endpoint, data_parallel_rank)
        if replay_endpoint is not None:
            replay_endpoint = ranks.offset_endpoint_port(replay_endpoint, data_parallel_rank)
        self._ctx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.set_hwm(hwm)
        self.endpoint = self._bind(self._pub, endpoint)
        self._replay: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        if replay_endpoint is not None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self.replay_endpoint = self._bind(self._replay, replay_endpoint)
        self._topic = topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self._lose = 0
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def _bind(sock: zmq.asyncio.Socket, endpoint: str) -> str:
        sock.bind(endpoint)
        last = sock.getsockopt(zmq.LAST_ENDPOINT)
        return last.decode() if isinstance(last, bytes) else str(last)

    @property
    def next_seq(self) -> int:
        return self._seq

    def lose_next(self, n: int = 1) -> None:
        """Buffer the next `n` batches for replay but do not send them (a lossy link, for tests)."""
        self._lose += n

    def publish(self, events: list[wire.BlockStored | wire.BlockRemoved | wire.AllBlocksCleared], ts: float) -> int:
        """Send one batch; returns its sequence number."""
        seq = self._seq
        self._seq += 1
        payload = wire.encode_batch(events, ts, self.data_parallel_rank)
        self._buffer.append((seq, payload))
        if self._lose > 0:
            self._lose -= 1
            return seq
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
        return seq

    def send_raw(self, frames: list[bytes]) -> None:
        """Send arbitrary frames on the PUB socket (tests of malformed input)."""
        self._pub.send_multipart(frames, flags=zmq.NOBLOCK)

    async def start(self) -> None:
        if self._replay is not None and self._task is None:
            self._task = asyncio.create_task(self._serve_replay(), name="kv-events-replay")

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        sock = self._replay
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3:
                log.warning("kv events: replay request with %d frames ignored", len(frames))
                continue
            ident, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    await sock.send_multipart((ident, b"", seq.to_bytes(8, "big"), payload))
            await sock.send_multipart((ident, b"", wire.END_SEQ, b""))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()
