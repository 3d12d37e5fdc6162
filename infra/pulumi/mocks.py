"""Pulumi's own mocks, set up for the offline preview (`gpufleet.infra.pulumi.preview`).

The mocks answer resource registrations by echoing the inputs, plus plausible computed outputs
such as a cluster endpoint, and answer the few data-source calls the components make
(`aws.eks.getCluster`, `aws.ec2.getSubnets`, `gcp.container.getCluster`). A recording monitor
keeps what each registration asked for; `sanitize` turns it into plain JSON data with every
secret masked.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SECRET", "UNKNOWN", "Registration", "mocks_and_monitor", "sanitize"]

SECRET = "[secret]"
UNKNOWN = "[unknown]"

# One registration as the monitor saw it: type, name, parent URN, custom?, inputs, provider reference.
Registration = tuple[str, str, str, bool, dict[str, Any], str]


def sanitize(value: Any) -> Any:
    """Plain JSON data with secrets masked and unknowns marked."""
    from pulumi.output import Unknown
    from pulumi.runtime import rpc

    if rpc.is_rpc_secret(value):
        return SECRET
    if isinstance(value, Unknown):
        return UNKNOWN
    if isinstance(value, dict):
        return {str(k): sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitize(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # protobuf carries every number as a double
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _computed_state(typ: str, name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Outputs a cloud would compute, as plausible placeholders (clearly not real)."""
    state = dict(inputs)
    if typ == "aws:eks/cluster:Cluster":
        state.setdefault("name", name)
        state.update(endpoint=f"https://{name}.eks.preview.invalid", certificateAuthority={"data": "cHJldmlldw=="})
    elif typ == "gcp:container/cluster:Cluster":
        state.setdefault("name", name)
        state.update(endpoint="192.0.2.10", masterAuth={"clusterCaCertificate": "cHJldmlldw=="})
    elif typ == "aws:iam/role:Role":
        state.setdefault("name", name)
        state["arn"] = f"arn:aws:iam::000000000000:role/{name}"
    elif typ == "kubernetes:core/v1:Service":
        state.setdefault("status", {"loadBalancer": {}})
    return state


def mocks_and_monitor() -> tuple[Any, Any, list[Registration]]:
    import pulumi
    from pulumi.runtime import mocks as mocks_mod
    from pulumi.runtime import rpc

    records: list[Registration] = []

    class PreviewMocks(pulumi.runtime.Mocks):
        """Echo inputs as state; answer the data sources the components read."""

        def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
            return f"{args.name}-id", _computed_state(args.typ, args.name, args.inputs)

        def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]]]:
            # (outputs, check failures): the mock monitor iterates the failures, so none is [].
            return self._outputs(args), []

        def _outputs(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
            a = args.args
            if args.token == "aws:eks/getCluster:getCluster":
                return {
                    "name": a.get("name"),
                    "endpoint": f"https://{a.get('name')}.eks.preview.invalid",
                    "certificateAuthorities": [{"data": "cHJldmlldw=="}],
                    "vpcConfig": {"subnetIds": ["subnet-preview-1", "subnet-preview-2"]},
                }
            if args.token == "aws:ec2/getSubnets:getSubnets":
                zones: list[str] = next(
                    (f.get("values") for f in a.get("filters") or [] if f.get("name") == "availability-zone"), []
                )
                return {"ids": [f"subnet-preview-{z}" for z in zones]}
            if args.token == "gcp:container/getCluster:getCluster":
                return {
                    "name": a.get("name"),
                    "endpoint": "192.0.2.10",
                    "masterAuths": [{"clusterCaCertificate": "cHJldmlldw=="}],
                }
            return {}

    class RecordingMonitor(mocks_mod.MockMonitor):
        """The mock monitor, also keeping each registration's parent and custom flag."""

        def RegisterResource(self, request: Any) -> Any:
            # pulumi's MockMonitor has no annotations (its protobuf request and response types are untyped)
            response = super().RegisterResource(request)  # type: ignore[no-untyped-call]
            if request.type != "pulumi:pulumi:Stack":
                inputs = rpc.deserialize_properties(request.object, keep_unknowns=True)
                records.append(
                    (request.type, request.name, request.parent, bool(request.custom), inputs, request.provider)
                )
            return response

    mocks = PreviewMocks()
    return mocks, RecordingMonitor(mocks), records
