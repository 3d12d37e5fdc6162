"""The errors of every provider adapter, and the ONE place a provider's error code is classified.

Exception tree (every adapter raises only these)::

    AdapterError                 provider, code, message, blocks (zone|region|cloud|request)
    ├── CapacityError            the provider has no machines right now (retry elsewhere)
    ├── QuotaExceeded            the account's quota is spent
    ├── NotOffered               the machine type does not exist in that zone/region
    ├── PermissionDenied         the credentials may not do this
    ├── NotFound                 the pool / cluster / group named does not exist
    ├── InvalidRequest           the provider rejected the request's arguments
    ├── Throttled                too many calls; back off and retry
    ├── Unsupported              the cloud cannot do this verb at all (see base.CANNOT_DO)
    └── SdkMissing               the cloud's SDK is not installed (with the pip hint)

`map_error` is the ONE place that turns a provider's error code into one of these and into
what it blocks; `ERROR_CODES` is its table, documented in docs/adapters.md.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

__all__ = [
    "ERROR_CODES",
    "AdapterError",
    "Blocks",
    "CapacityError",
    "InvalidRequest",
    "NotFound",
    "NotOffered",
    "PermissionDenied",
    "QuotaExceeded",
    "SdkMissing",
    "Throttled",
    "Unsupported",
    "map_error",
    "unknown_error",
]

Blocks = Literal["zone", "region", "cloud", "request"]


class AdapterError(Exception):
    """Base of every adapter error: carries the provider's own code and what it blocks."""

    default_blocks: ClassVar[Blocks] = "request"

    def __init__(
        self,
        message: str,
        *,
        cloud: str,
        code: str = "",
        blocks: Blocks | None = None,
        region: str | None = None,
        zone: str | None = None,
    ) -> None:
        self.cloud = cloud
        self.code = code
        self.blocks: Blocks = blocks or self.default_blocks
        self.region = region
        self.zone = zone
        self.message = message
        where = "/".join(x for x in (cloud, region, zone) if x)
        super().__init__(f"{where}: {code + ': ' if code else ''}{message}")


class CapacityError(AdapterError):
    default_blocks = "zone"


class QuotaExceeded(AdapterError):
    default_blocks = "region"


class NotOffered(AdapterError):
    default_blocks = "zone"


class PermissionDenied(AdapterError):
    default_blocks = "cloud"


class NotFound(AdapterError):
    pass


class InvalidRequest(AdapterError):
    pass


class Throttled(AdapterError):
    pass


class Unsupported(AdapterError):
    default_blocks = "cloud"


class SdkMissing(AdapterError):
    default_blocks = "cloud"


# (cloud, provider code) -> (error type, what it blocks). Codes are matched case-sensitively
# first, then lower-cased (GCP mixes `QUOTA_EXCEEDED` operation codes and `quotaExceeded`
# HTTP reasons). One table, so failover code never parses provider strings itself.
ERROR_CODES: dict[tuple[str, str], tuple[type[AdapterError], Blocks]] = {
    # AWS (EC2 / EKS / Auto Scaling / Service Quotas error codes)
    ("aws", "InsufficientInstanceCapacity"): (CapacityError, "zone"),
    ("aws", "InsufficientCapacity"): (CapacityError, "zone"),
    ("aws", "InsufficientHostCapacity"): (CapacityError, "zone"),
    ("aws", "SpotMaxPriceTooLow"): (CapacityError, "zone"),
    ("aws", "InstanceLimitExceeded"): (QuotaExceeded, "region"),
    ("aws", "VcpuLimitExceeded"): (QuotaExceeded, "region"),
    ("aws", "MaxSpotInstanceCountExceeded"): (QuotaExceeded, "region"),
    ("aws", "ResourceLimitExceeded"): (QuotaExceeded, "region"),
    ("aws", "ServiceQuotaExceededException"): (QuotaExceeded, "region"),
    ("aws", "Unsupported"): (NotOffered, "zone"),
    ("aws", "InvalidInstanceType"): (NotOffered, "region"),
    ("aws", "UnauthorizedOperation"): (PermissionDenied, "cloud"),
    ("aws", "AccessDenied"): (PermissionDenied, "cloud"),
    ("aws", "AccessDeniedException"): (PermissionDenied, "cloud"),
    ("aws", "AuthFailure"): (PermissionDenied, "cloud"),
    ("aws", "UnrecognizedClientException"): (PermissionDenied, "cloud"),
    ("aws", "ExpiredToken"): (PermissionDenied, "cloud"),
    ("aws", "OptInRequired"): (PermissionDenied, "region"),
    ("aws", "ResourceNotFoundException"): (NotFound, "request"),
    ("aws", "NoSuchResourceException"): (NotFound, "request"),
    ("aws", "ValidationError"): (InvalidRequest, "request"),  # Auto Scaling uses it for unknown groups too
    ("aws", "InvalidParameterException"): (InvalidRequest, "request"),
    ("aws", "InvalidParameterValue"): (InvalidRequest, "request"),
    ("aws", "InvalidParameterCombination"): (InvalidRequest, "request"),
    ("aws", "InvalidRequestException"): (InvalidRequest, "request"),
    ("aws", "ResourceInUseException"): (InvalidRequest, "request"),
    ("aws", "Throttling"): (Throttled, "request"),
    ("aws", "ThrottlingException"): (Throttled, "request"),
    ("aws", "RequestLimitExceeded"): (Throttled, "request"),
    ("aws", "TooManyRequestsException"): (Throttled, "request"),
    # GCP (Compute Engine operation error codes and HTTP error reasons)
    ("gcp", "ZONE_RESOURCE_POOL_EXHAUSTED"): (CapacityError, "zone"),
    ("gcp", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"): (CapacityError, "zone"),
    ("gcp", "RESOURCE_POOL_EXHAUSTED"): (CapacityError, "zone"),
    ("gcp", "STOCKOUT"): (CapacityError, "zone"),
    ("gcp", "QUOTA_EXCEEDED"): (QuotaExceeded, "region"),
    ("gcp", "quotaExceeded"): (QuotaExceeded, "region"),
    ("gcp", "rateLimitExceeded"): (Throttled, "request"),
    ("gcp", "userRateLimitExceeded"): (Throttled, "request"),
    ("gcp", "UNSUPPORTED_OPERATION"): (NotOffered, "zone"),
    ("gcp", "RESOURCE_NOT_FOUND"): (NotFound, "request"),
    ("gcp", "notFound"): (NotFound, "request"),
    ("gcp", "forbidden"): (PermissionDenied, "cloud"),
    ("gcp", "accessNotConfigured"): (PermissionDenied, "cloud"),
    ("gcp", "insufficientPermissions"): (PermissionDenied, "cloud"),
    ("gcp", "invalid"): (InvalidRequest, "request"),
    ("gcp", "badRequest"): (InvalidRequest, "request"),
    # Kubernetes (HTTP status reasons of the API server, and scheduler events)
    ("kubernetes", "Forbidden"): (PermissionDenied, "cloud"),
    ("kubernetes", "Unauthorized"): (PermissionDenied, "cloud"),
    ("kubernetes", "NotFound"): (NotFound, "request"),
    ("kubernetes", "Invalid"): (InvalidRequest, "request"),
    ("kubernetes", "BadRequest"): (InvalidRequest, "request"),
    ("kubernetes", "Conflict"): (InvalidRequest, "request"),
    ("kubernetes", "TooManyRequests"): (Throttled, "request"),
}

# HTTP statuses, for errors that carry no better code.
_HTTP_FALLBACK: dict[int, tuple[type[AdapterError], Blocks]] = {
    400: (InvalidRequest, "request"),
    401: (PermissionDenied, "cloud"),
    403: (PermissionDenied, "cloud"),
    404: (NotFound, "request"),
    409: (InvalidRequest, "request"),
    422: (InvalidRequest, "request"),
    429: (Throttled, "request"),
}


def map_error(
    cloud: str,
    code: str,
    message: str,
    *,
    http_status: int | None = None,
    region: str | None = None,
    zone: str | None = None,
) -> AdapterError:
    """Turn a provider error code into the typed error and what it blocks.

    Unknown codes become a plain `AdapterError` blocking only the request, carrying the
    provider's code so nothing is lost.
    """
    hit = ERROR_CODES.get((cloud, code))
    if hit is None:
        lowered = {(c, k.lower()): v for (c, k), v in ERROR_CODES.items()}
        hit = lowered.get((cloud, code.lower()))
    if hit is None and http_status is not None:
        hit = _HTTP_FALLBACK.get(http_status)
    error_type, blocks = hit if hit is not None else (AdapterError, "request")
    return error_type(
        message,
        cloud=cloud,
        code=code or (str(http_status) if http_status else ""),
        blocks=blocks,
        region=region,
        zone=zone,
    )


def unknown_error(cloud: str, exc: BaseException, **where: Any) -> AdapterError:
    """Wrap an exception we could not classify, keeping its text (never its credentials)."""
    return AdapterError(str(exc) or type(exc).__name__, cloud=cloud, code=type(exc).__name__, **where)
