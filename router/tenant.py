"""Who a request is from (its tenant), and what tenant isolation does with it.

`TenantResolver.tenant(headers, peer)` reads `router.tenant.headers` in order and takes the
first one present: a credential header (`authorization`, `api-key`, `x-api-key` by default;
its value is a secret, so anyone may send it) or an identity header set by a gateway that
authenticated the client (`x-tenant-id`, say), trusted only from the peer addresses in its
`trusted_cidrs`: the same header from anyone else is ignored, as if absent. The peer is the TCP
peer, never a forwarded-for header a client can write. The tenant id is a hash of the header's
name and value, never the value: it appears in cache keys and salts, and must not leak a key.

`router.tenant_isolation` (docs/router.md, "Tenants"):

- `none`: one cache for everyone (a single-tenant fleet);
- `prediction_cache`: cached answers are per tenant; the engines' prefix caches are shared;
- `kv`: also the engines' prefix caches: every request of a tenant carries vLLM's per-request
  `cache_salt`, derived from the tenant with an HMAC key (`tenant.salt_key_env`), so blocks are
  never shared across tenants and a tenant cannot learn by its cached tokens or its latency
  whether another tenant sent a prompt; the router's own prefix index is keyed per tenant too.

`hide_cached_tokens` removes `usage.prompt_tokens_details.cached_tokens` from answers
(`CachedTokensFilter`, also over a stream's event lines).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
from collections.abc import Mapping
from typing import Any

from gpufleet.router.config import TenantSettings

__all__ = ["CachedTokensFilter", "TenantResolver", "hide_cached_tokens"]

log = logging.getLogger("gpufleet.router.tenant")

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TenantResolver:
    """The tenant of a request from its headers and its TCP peer; and the tenant's KV salt."""

    def __init__(self, settings: TenantSettings, environ: Mapping[str, str] | None = None) -> None:
        self.headers: list[tuple[str, list[_Network]]] = [
            (h.name.lower(), [ipaddress.ip_network(c, strict=False) for c in h.trusted_cidrs]) for h in settings.headers
        ]
        env = os.environ if environ is None else environ
        key = env.get(settings.salt_key_env, "")
        if key:
            self._salt_key = key.encode("utf-8", "surrogateescape")
        else:
            # Safe, but each router process salts differently: one tenant's requests then share
            # blocks only through the router that salted them. Set the key on every instance.
            self._salt_key = secrets.token_bytes(32)
            log.info("%s is not set: this router draws its own KV salt key", settings.salt_key_env)

    def tenant(self, headers: Mapping[str, str], peer: str | None) -> str | None:
        """The tenant id (a hash), or None for an anonymous request."""
        for name, nets in self.headers:
            value = headers.get(name)
            if not value or not value.strip():
                continue
            if nets and not _peer_in(peer, nets):
                continue  # an identity header only a gateway may set: ignored from anyone else
            digest = hashlib.sha256(name.encode() + b"\0" + value.strip().encode("utf-8", "surrogateescape"))
            return digest.hexdigest()[:32]
        return None

    def salt(self, tenant: str) -> str:
        """vLLM's `cache_salt` for a tenant: 256 unpredictable bits, base64url (43 characters)."""
        mac = hmac.new(self._salt_key, tenant.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def _peer_in(peer: str | None, nets: list[_Network]) -> bool:
    if not peer:
        return False
    try:
        addr = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in nets)


def _strip(doc: Any) -> bool:
    """Drop usage.prompt_tokens_details.cached_tokens from one answer or event; True if it changed."""
    usage = doc.get("usage") if isinstance(doc, dict) else None
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    if isinstance(details, dict) and "cached_tokens" in details:
        del details["cached_tokens"]
        return True
    return False


def hide_cached_tokens(body: bytes) -> bytes:
    """A complete JSON answer without `cached_tokens` (unchanged when it has none)."""
    if b"cached_tokens" not in body:
        return body
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    return json.dumps(doc, separators=(",", ":")).encode() if _strip(doc) else body


class CachedTokensFilter:
    """Removes `cached_tokens` from the `data:` lines of an SSE stream, whatever its chunking."""

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        """What to pass on of `chunk`: its complete lines, rewritten where needed."""
        data = self._tail + chunk
        cut = data.rfind(b"\n") + 1
        self._tail = data[cut:]
        done = data[:cut]
        if b"cached_tokens" not in done:
            return done
        out = []
        for line in done.split(b"\n"):
            if line.startswith(b"data:") and b"cached_tokens" in line:
                try:
                    ev = json.loads(line[5:])
                except ValueError:
                    ev = None
                if ev is not None and _strip(ev):
                    line = b"data: " + json.dumps(ev, separators=(",", ":")).encode()
            out.append(line)
        return b"\n".join(out)

    def flush(self) -> bytes:
        """Whatever is left at the end of the stream."""
        tail, self._tail = self._tail, b""
        return tail
