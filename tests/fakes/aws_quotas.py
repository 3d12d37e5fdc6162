"""EC2 GPU quotas for moto's Service Quotas backend, which only knows VPC quotas.

`ec2_gpu_quotas({"us-east-1": {"L-417A185B": 384}})` makes `get_service_quota(ServiceCode="ec2",
QuotaCode=...)` answer those values inside `mock_aws`, in moto's own response shape; every other
call still goes to moto unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from moto.servicequotas import models as sq_models

__all__ = ["ec2_gpu_quotas"]


@contextlib.contextmanager
def ec2_gpu_quotas(values: Mapping[str, Mapping[str, float]]) -> Iterator[None]:
    """Serve EC2 quota values per region (region -> quota code -> value) from moto."""
    original = sq_models.ServiceQuotasBackend.get_service_quota

    def get_service_quota(self: Any, service_code: str, quota_code: str) -> dict[str, Any]:
        region_values = values.get(self.region_name, {})
        if service_code == "ec2" and quota_code in region_values:
            return {
                "ServiceCode": "ec2",
                "ServiceName": "Amazon Elastic Compute Cloud (Amazon EC2)",
                "QuotaArn": f"arn:aws:servicequotas:{self.region_name}:{self.account_id}:ec2/{quota_code}",
                "QuotaCode": quota_code,
                "QuotaName": quota_code,
                "Value": float(region_values[quota_code]),
                "Unit": "None",
                "Adjustable": True,
                "GlobalQuota": False,
            }
        return original(self, service_code, quota_code)

    sq_models.ServiceQuotasBackend.get_service_quota = get_service_quota  # type: ignore[method-assign]
    try:
        yield
    finally:
        sq_models.ServiceQuotasBackend.get_service_quota = original  # type: ignore[method-assign]
