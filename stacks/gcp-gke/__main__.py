"""A gpufleet stack: read the `gpufleet:*` config and secrets, build the Fleet, export.

Everything comes from the one declaration (see Pulumi.<stack>.yaml and docs/pulumi.md).
"""

import pulumi

from gpufleet.infra.pulumi import Fleet, stack_config

fleet = Fleet("gpufleet", stack_config.read())

pulumi.export("router_endpoint", fleet.router_endpoint)
pulumi.export("pools", fleet.pools)
pulumi.export("cost", fleet.cost)
pulumi.export("clusters", fleet.clusters)
