"""Failure classification, once for every caller: the replica's fault or the request's.

A *replica* failure (connect, reset, timeout, first-byte deadline, not HTTP, 502/503/504) is
retried elsewhere and counts toward ejection; a *request* failure (the engine answered an error
for this input) is the client's answer; 429 is retried elsewhere but is no fault of the replica.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Failure", "classify_status"]


class Failure(str, Enum):
    """Why an attempt on a replica failed: the one classification every caller uses."""

    CONNECT = "connect"
    """Could not connect (refused, unreachable, connect timeout)."""
    RESET = "reset"
    """The connection was reset or closed before a complete answer."""
    TIMEOUT = "timeout"
    """The request timeout passed."""
    FIRST_BYTE = "first_byte_deadline"
    """Nothing came back within the attempt's first-byte deadline."""
    PROTOCOL = "protocol"
    """The answer was not HTTP/1.x."""
    GATEWAY = "gateway"
    """502, 503 or 504: the replica (or a gateway in front of it) is down or overloaded."""
    BUSY = "busy"
    """429: the replica is at capacity right now. Retried elsewhere; no fault of the replica."""
    REQUEST = "request"
    """The engine answered an error for this input: the client's answer, not the replica's fault."""

    @property
    def replica_fault(self) -> bool:
        """True when it counts toward the replica's ejection."""
        return self not in (Failure.BUSY, Failure.REQUEST)

    @property
    def retryable(self) -> bool:
        """True when another replica may answer it (before any byte reached the client)."""
        return self is not Failure.REQUEST


def classify_status(status: int) -> Failure | None:
    """The failure an HTTP status from a replica means, or None for a success (< 400)."""
    if status < 400:
        return None
    if status in (502, 503, 504):
        return Failure.GATEWAY
    if status == 429:
        return Failure.BUSY
    return Failure.REQUEST
