"""Exact-match response cache for deterministic requests, scoped per tenant.

A request is *cacheable* when it asks for one choice (`n` absent or 1) and is deterministic
(`temperature == 0`, or a `seed` is given). The key is a SHA-256 over

    tenant  : the request's tenant (`gpufleet.router.tenant`: a hash of the first configured
              identity header present; "anonymous" without one, and then, by default
              (`prediction_cache.require_tenant`), the request is not cached at all)
    path    : the endpoint (/v1/chat/completions and /v1/completions never share an answer)
    model   : the requested model
    body    : the JSON body with keys sorted and the transport-only fields (`stream`,
              `stream_options`) removed, so a streamed and a plain request share an answer

so a tenant can never be served another tenant's answer: the tenant is part of the key, not a
filter applied afterwards. Answers are stored as the replica's complete (non-streaming) JSON
body; a streaming request that hits is answered by replaying it as SSE (`replay_sse`), and a
streaming miss is assembled back into a complete body (`SSEAssembler`) so it can be stored.

Two backends share one async interface (`lookup`, `store`, `close`):

- `PredictionCache` (memory): bounded by TTL, entry count and total bytes (LRU); each router
  instance has its own.
- `RedisPredictionCache`: shared by every router instance. Entries expire after the TTL (`SET
  ... PX`); an answer over `max_bytes` is not stored; the total is bounded by the Redis server's
  own `maxmemory` with an LRU policy (`allkeys-lru`), which is where a shared bound belongs.
  Redis being down never fails a request: a lookup that errors is a miss, a store that errors is
  skipped, both counted in `errors`.

`make_prediction_cache(settings, environ)` builds the configured one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

from gpufleet.router.config import PredictionCacheSettings

log = logging.getLogger("gpufleet.router.prediction_cache")

__all__ = [
    "ANONYMOUS_TENANT",
    "PredictionCache",
    "RedisPredictionCache",
    "SSEAssembler",
    "is_cacheable",
    "make_prediction_cache",
    "replay_sse",
    "tenant_of",
]

ANONYMOUS_TENANT = "anonymous"
_TRANSPORT_FIELDS = ("stream", "stream_options")


def tenant_of(authorization: str | None) -> str:
    """The tenant id of a request: a hash of its API key, never the key itself."""
    if not authorization:
        return ANONYMOUS_TENANT
    # surrogateescape: aiohttp decoded the header's bytes so; non-UTF-8 keys hash as the bytes sent
    return hashlib.sha256(authorization.strip().encode("utf-8", "surrogateescape")).hexdigest()[:32]


def is_cacheable(body: Mapping[str, Any]) -> bool:
    """One choice and deterministic sampling (temperature 0 or a seed)."""
    n = body.get("n", 1)
    if n not in (None, 1):
        return False
    if body.get("seed") is not None:
        return True
    t = body.get("temperature")
    return isinstance(t, (int, float)) and not isinstance(t, bool) and t == 0


def cache_key(tenant: str, model: str, body: Mapping[str, Any], *, path: str = "") -> str:
    """SHA-256 of tenant, request path, model and the normalised body.

    The path is in it because the same body means different things at different endpoints
    (a chat answer is no completions answer).
    """
    norm = {k: v for k, v in body.items() if k not in _TRANSPORT_FIELDS}
    text = json.dumps(norm, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    h = hashlib.sha256()
    for part in (tenant, path, model, text):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


@dataclass(slots=True)
class _Entry:
    body: bytes
    expires: float


class PredictionCache:
    """LRU of complete JSON answers with TTL, entry and byte bounds."""

    def __init__(self, settings: PredictionCacheSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    key = staticmethod(cache_key)

    def get(self, key: str) -> bytes | None:
        """The cached answer for `key`, or None (expired entries are dropped)."""
        e = self._entries.get(key)
        if e is None:
            return None
        if e.expires <= self.clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return e.body

    def put(self, key: str, body: bytes) -> bool:
        """Store an answer; False when it alone exceeds the byte bound."""
        size = len(body)
        if size > self.settings.max_bytes:
            return False
        if key in self._entries:
            self._drop(key)
        self._entries[key] = _Entry(body, self.clock() + self.settings.ttl_s)
        self.bytes += size
        while len(self._entries) > self.settings.max_entries or self.bytes > self.settings.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
        return True

    def _drop(self, key: str) -> None:
        e = self._entries.pop(key)
        self.bytes -= len(e.body)

    async def lookup(self, key: str) -> bytes | None:
        """Async face of `get`, shared with the redis backend."""
        return self.get(key)

    async def store(self, key: str, body: bytes) -> None:
        """Async face of `put`, shared with the redis backend."""
        self.put(key, body)

    async def close(self) -> None:
        """Nothing to release for the memory backend."""


class RedisPredictionCache:
    """The prediction cache in Redis, shared by router instances (see the module docstring)."""

    def __init__(self, settings: PredictionCacheSettings, url: str) -> None:
        import redis.asyncio as aioredis  # the router extra installs it; imported only when used

        self.settings = settings
        self.prefix = settings.key_prefix
        self.errors = 0
        self._ttl_ms = max(1, int(settings.ttl_s * 1000))
        # Short timeouts: a slow Redis must cost a request milliseconds, not seconds.
        self._redis = aioredis.Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25)

    def _failed(self, op: str, exc: BaseException) -> None:
        self.errors += 1
        if self.errors == 1 or self.errors % 1000 == 0:
            # The URL may hold a password: log the error type only.
            log.warning("prediction cache: redis %s failed (%s); serving without the cache", op, type(exc).__name__)

    async def lookup(self, key: str) -> bytes | None:
        """The cached answer, or None (also when Redis cannot be reached)."""
        try:
            # decode_responses is off (the default), so a hit is the stored bytes
            return cast("bytes | None", await self._redis.get(self.prefix + key))
        except Exception as exc:  # any Redis trouble is a miss, never a failed request
            self._failed("get", exc)
            return None

    async def store(self, key: str, body: bytes) -> None:
        """Store an answer with the TTL; answers over max_bytes are not stored."""
        if len(body) > self.settings.max_bytes:
            return
        try:
            await self._redis.set(self.prefix + key, body, px=self._ttl_ms)
        except Exception as exc:
            self._failed("set", exc)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


def make_prediction_cache(
    settings: PredictionCacheSettings, environ: Mapping[str, str] | None = None
) -> PredictionCache | RedisPredictionCache:
    """The backend named in `settings`. Raises ValueError when redis is chosen without a URL."""
    if settings.backend == "memory":
        return PredictionCache(settings)
    env = os.environ if environ is None else environ
    url = env.get(settings.redis_url_env, "").strip()
    if not url:
        raise ValueError(
            f"prediction_cache.backend is redis but the environment variable {settings.redis_url_env} "
            "(prediction_cache.redis_url_env) holding its URL is not set"
        )
    return RedisPredictionCache(settings, url)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def replay_sse(answer: bytes, *, include_usage: bool = False) -> Iterator[bytes]:
    """Replay a complete chat or text completion as OpenAI-style SSE events."""
    doc = json.loads(answer)
    chat = doc.get("object") == "chat.completion"
    base = {k: doc[k] for k in ("id", "created", "model") if k in doc}
    base["object"] = "chat.completion.chunk" if chat else "text_completion"
    for ch in doc.get("choices", []):
        idx = ch.get("index", 0)
        if chat:
            msg = ch.get("message") or {}
            delta = {"role": msg.get("role", "assistant"), "content": msg.get("content") or ""}
            if msg.get("tool_calls"):
                delta["tool_calls"] = msg["tool_calls"]
            yield _sse({**base, "choices": [{"index": idx, "delta": delta, "finish_reason": None}]})
            yield _sse({**base, "choices": [{"index": idx, "delta": {}, "finish_reason": ch.get("finish_reason")}]})
        else:
            yield _sse({**base, "choices": [{"index": idx, "text": ch.get("text", ""), "finish_reason": None}]})
            yield _sse({**base, "choices": [{"index": idx, "text": "", "finish_reason": ch.get("finish_reason")}]})
    if include_usage and doc.get("usage") is not None:
        yield _sse({**base, "choices": [], "usage": doc["usage"]})
    yield b"data: [DONE]\n\n"


class SSEAssembler:
    """Rebuild a complete completion body from the SSE stream of a chat or text completion.

    Fed raw chunks as they pass through; `usage` is available as soon as the usage event has
    passed. `result()` returns the complete JSON body, or None if the stream did not finish
    cleanly (no [DONE], unparsable event, or an error event), so broken streams are never cached.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._choices: dict[int, dict[str, Any]] = {}
        self._meta: dict[str, Any] = {}
        self._chat = True
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.broken = False

    def feed(self, chunk: bytes) -> None:
        """Consume raw bytes of the stream."""
        if self.broken:
            return
        self._buf += chunk
        while True:
            cut = self._buf.find(b"\n\n")
            if cut < 0:
                return
            event, self._buf = self._buf[:cut], self._buf[cut + 2 :]
            for line in event.split(b"\n"):
                line = line.rstrip(b"\r")
                if line.startswith(b"data:"):
                    self._data(line[5:].strip())

    def _data(self, data: bytes) -> None:
        if data == b"[DONE]":
            self.done = True
            return
        try:
            ev = json.loads(data)
        except ValueError:
            self.broken = True
            return
        if not isinstance(ev, dict) or "error" in ev:
            self.broken = True
            return
        for k in ("id", "created", "model"):
            if k in ev and k not in self._meta:
                self._meta[k] = ev[k]
        if ev.get("object") == "text_completion":
            self._chat = False
        if ev.get("usage"):
            self.usage = ev["usage"]
        for ch in ev.get("choices") or []:
            c = self._choices.setdefault(ch.get("index", 0), {"text": [], "role": "assistant", "finish": None})
            if "delta" in ch:
                d = ch["delta"] or {}
                if d.get("role"):
                    c["role"] = d["role"]
                if d.get("content"):
                    c["text"].append(d["content"])
                if d.get("tool_calls"):
                    self.broken = True  # tool-call deltas need merging; not worth caching
            elif ch.get("text"):
                c["text"].append(ch["text"])
            if ch.get("finish_reason"):
                c["finish"] = ch["finish_reason"]

    def result(self) -> bytes | None:
        """The complete JSON body, or None when the stream was not a clean, finished answer."""
        if self.broken or not self.done or not self._choices:
            return None
        choices = []
        for idx in sorted(self._choices):
            c = self._choices[idx]
            text = "".join(c["text"])
            if self._chat:
                choices.append(
                    {"index": idx, "message": {"role": c["role"], "content": text}, "finish_reason": c["finish"]}
                )
            else:
                choices.append({"index": idx, "text": text, "finish_reason": c["finish"]})
        doc = {**self._meta, "object": "chat.completion" if self._chat else "text_completion", "choices": choices}
        if self.usage is not None:
            doc["usage"] = self.usage
        return json.dumps(doc, separators=(",", ":")).encode()
