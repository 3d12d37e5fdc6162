"""Who is asking: tenant identity (which header names the tenant, who may set it) and where the
admin token comes from.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from gpufleet.router.settings.base import Strict

__all__ = [
    "AdminToken",
    "TenantHeader",
    "TenantSettings",
]


class TenantHeader(Strict):
    """A request header that names the tenant; `trusted_cidrs` limits who may set it (a gateway)."""

    name: str = Field(min_length=1)
    trusted_cidrs: list[str] = Field(
        default_factory=list,
        description="peer addresses allowed to set it (a gateway that authenticated the client); empty: anyone, "
        "for a credential header whose value is a secret",
    )

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @field_validator("trusted_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        import ipaddress

        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP network (like 10.0.0.0/8 or 127.0.0.1/32)") from None
        return value


def _default_tenant_headers() -> list[TenantHeader]:
    return [TenantHeader(name=n) for n in ("authorization", "api-key", "x-api-key")]


class TenantSettings(Strict):
    """How the router tells tenants apart: the first of `headers` present (a hash of its value)."""

    headers: list[TenantHeader] = Field(default_factory=_default_tenant_headers, min_length=1)
    salt_key_env: str = Field(
        default="GPUFLEET_CACHE_SALT_KEY",
        min_length=1,
        description="environment variable holding the key the kv isolation's cache_salt is derived from "
        "(set the same one on every router instance; without it each process draws its own)",
    )


class AdminToken(Strict):
    """Where the admin bearer token comes from: a reference, never the value."""

    env: str | None = Field(default=None, description="environment variable holding the token")
    file: str | None = Field(default=None, description="file holding the token")
    secret: str | None = Field(default=None, description="Kubernetes Secret name (mounted as env by the stacks)")

    @model_validator(mode="after")
    def _one_source(self) -> AdminToken:
        if sum(x is not None for x in (self.env, self.file, self.secret)) > 1:
            raise ValueError("give one of env, file or secret")
        return self
