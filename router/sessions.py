"""Session bindings several router replicas agree on: signed session tokens and a Redis binding.

The `session_affinity` picker keeps a session on its replica. One router remembers that itself;
several routers without shared state agree through the client or through Redis:

- **Signed tokens.** Every routed answer to a request with a session id carries the header
  `session.token_header` (`x-gpufleet-session`) naming the replica, signed with HMAC-SHA256 under
  the router secret (`session.secret`: an environment variable or a file, the same on every router
  replica), valid for `session.ttl_s`:

      v1.<replica id, base64url>.<expiry, unix seconds>.<HMAC-SHA256, base64url>
      MAC over  "gpufleet-session/v1" NUL session id NUL replica id NUL expiry

  A client that echoes it lets any router replica route the next turn where the session lives.
  The MAC covers the session id, so a token is good for its own session only; a forged, altered,
  expired or other-session token is ignored (counted in `gpufleet_router_session_tokens_total`),
  never an error. Without a secret no tokens are issued or honoured (one line at start says so).
- **Redis** (`session.binding: redis`, the URL in the environment variable `session.redis_url_env`):
  for clients that cannot echo a header, the binding session -> replica is read before routing
  and written after, with `session.ttl_s` as expiry. Every Redis call is bounded (0.25 s); Redis
  down means the router's own memory decides, with one log line per minute.

**Per tenant.** A session id is client input, so two tenants can send the same one. The router
scopes it by the request's tenant (`scoped_session_id`: `<tenant id>/<session id>`, `-/<session
id>` for anonymous requests; tenant ids are hex and never `-`) before anything keys on it: the
token's MAC, the Redis key and the picker's own memory. A tenant therefore cannot steer its
requests with another tenant's token (it is `forged` for its scope), nor land on, or learn,
another tenant's binding by reusing its session id.

What is resolved here becomes `RequestFeatures.session_replica`; the policy stays pure.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gpufleet.router import errors
from gpufleet.router.config import SessionSecret, SessionSettings

__all__ = ["MIN_SECRET_BYTES", "SessionBinder", "SessionTokens", "resolve_secret", "scoped_session_id"]

log = logging.getLogger("gpufleet.router.sessions")

MIN_SECRET_BYTES = 16
_VERSION = "v1"
_DOMAIN = b"gpufleet-session/v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def scoped_session_id(tenant: str | None, session_id: str | None) -> str | None:
    """The session id as the router keys it: within the request's tenant (module docs)."""
    if session_id is None:
        return None
    return f"{tenant if tenant is not None else '-'}/{session_id}"


def resolve_secret(ref: SessionSecret, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The session-token key named by `ref` (a file wins over the env var); None when unset.

    Raises `ConfigError` for an unreadable file or a key shorter than `MIN_SECRET_BYTES`; the
    message names the reference, never the value.
    """
    env = os.environ if environ is None else environ
    if ref.file is not None:
        try:
            value = Path(ref.file).read_bytes().strip()
        except OSError as exc:
            raise errors.ConfigError(f"session secret file {ref.file}: {exc.strerror or exc}") from None
        where = f"file {ref.file}"
    elif ref.env is not None:
        value = env.get(ref.env, "").strip().encode()
        where = f"environment variable {ref.env}"
    else:
        return None
    if not value:
        return None
    if len(value) < MIN_SECRET_BYTES:
        raise errors.ConfigError(f"the session secret in {where} is shorter than {MIN_SECRET_BYTES} bytes")
    return value


class SessionTokens:
    """Issues and verifies signed session tokens (module docs). `clock` is wall time: tokens cross processes."""

    def __init__(self, secret: bytes, ttl_s: float, *, clock: Callable[[], float] = time.time) -> None:
        self._key = secret
        self.ttl_s = ttl_s
        self.clock = clock

    def _mac(self, session_id: str, replica_id: str, expiry: int) -> bytes:
        msg = b"\0".join((_DOMAIN, session_id.encode(), replica_id.encode(), str(expiry).encode()))
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def issue(self, session_id: str, replica_id: str) -> str:
        """A token binding `session_id` to `replica_id` until now + ttl_s."""
        expiry = int(self.clock() + self.ttl_s)
        mac = self._mac(session_id, replica_id, expiry)
        return f"{_VERSION}.{_b64(replica_id.encode())}.{expiry}.{_b64(mac)}"

    def verify(self, token: str, session_id: str) -> tuple[str | None, str]:
        """(replica id, "valid") for a good token of this session; (None, why) otherwise, why one
        of malformed, forged (the MAC does not match: altered, another key or another session), expired."""
        parts = token.strip().split(".")
        if len(parts) != 4 or parts[0] != _VERSION or not parts[2].isdigit():
            return None, "malformed"
        try:
            replica = _unb64(parts[1]).decode()
            mac = _unb64(parts[3])
        except (ValueError, UnicodeDecodeError):
            return None, "malformed"
        expiry = int(parts[2])
        if not hmac.compare_digest(mac, self._mac(session_id, replica, expiry)):
            return None, "forged"
        if expiry <= self.clock():
            return None, "expired"
        return replica, "valid"


class SessionBinder:
    """The server's side of session affinity: tokens and the optional Redis binding (module docs).

    `resolve` runs before the policy, `bound` after the decision; `headers` gives the token to answer with.
    """

    def __init__(
        self,
        settings: SessionSettings,
        environ: Mapping[str, str] | None = None,
        *,
        on_token: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        secret = resolve_secret(settings.secret, environ)
        self.tokens = SessionTokens(secret, settings.ttl_s) if secret is not None else None
        self.on_token = on_token
        self._redis: Any = None
        self._redis_failed_at = float("-inf")
        self._pending: set[asyncio.Task[None]] = set()
        if settings.binding == "redis":
            env = os.environ if environ is None else environ
            url = env.get(settings.redis_url_env, "").strip()
            if not url:
                raise errors.ConfigError(
                    f"session.binding is redis but the environment variable {settings.redis_url_env} "
                    "(session.redis_url_env) holding its URL is not set"
                )
            import redis.asyncio as aioredis  # the router extra installs it; imported only when used

            self._redis = aioredis.Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25)

    def describe(self) -> str:
        """One line for the router's start: how sessions are bound (never the secret)."""
        how = ["tokens " + ("on" if self.tokens is not None else "off (no session.secret set)")]
        if self._redis is not None:
            how.append("redis binding on")
        return "sessions: " + ", ".join(how)

    def _key(self, session_id: str) -> str:
        # Hashed: a session id is client input of any length.
        return self.settings.key_prefix + hashlib.sha256(session_id.encode()).hexdigest()[:32]

    def _redis_down(self, op: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._redis_failed_at >= 60.0:
            log.warning("sessions: redis %s failed (%s); the router's own memory decides", op, type(exc).__name__)
        self._redis_failed_at = now

    async def resolve(self, token: str | None, session_id: str) -> str | None:
        """The replica a request's session is bound to: its valid token's, else Redis's, else None."""
        if token and self.tokens is not None:
            replica, why = self.tokens.verify(token, session_id)
            if self.on_token is not None:
                self.on_token(why)
            if replica is not None:
                return replica
        if self._redis is not None:
            try:
                value = await asyncio.wait_for(self._redis.get(self._key(session_id)), 0.5)
            except Exception as exc:  # redis down or slow: route on what the router knows
                self._redis_down("get", exc)
                return None
            if isinstance(value, bytes):
                return value.decode(errors="replace")
        return None

    def headers(self, session_id: str, replica_id: str) -> dict[str, str]:
        """The response header carrying a fresh token for this session and replica (none without a secret)."""
        if self.tokens is None:
            return {}
        return {self.settings.token_header: self.tokens.issue(session_id, replica_id)}

    def bound(self, session_id: str, replica_id: str) -> None:
        """The session was routed to `replica_id`: write the Redis binding in the background."""
        if self._redis is None:
            return
        task = asyncio.get_running_loop().create_task(self._write(session_id, replica_id))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, session_id: str, replica_id: str) -> None:
        try:
            ttl_ms = max(1, int(self.settings.ttl_s * 1000))
            await asyncio.wait_for(self._redis.set(self._key(session_id), replica_id, px=ttl_ms), 0.5)
        except Exception as exc:  # as in resolve
            self._redis_down("set", exc)

    async def close(self) -> None:
        """Finish pending writes (bounded) and close the Redis connection."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=1.0)
        if self._redis is not None:
            await self._redis.aclose()
