"""The Agent Skills shipped with gpufleet (data only: `gpufleet skills install` copies them)."""
