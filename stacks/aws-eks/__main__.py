"""A gpufleet stack: everything comes from the one declaration (Pulumi.<stack>.yaml, docs/pulumi.md)."""

from gpufleet.infra.pulumi import stack_config

stack_config.program()
