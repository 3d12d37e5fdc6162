"""gpufleet.infra: the fleet declaration, the catalog, the compiled plan and its backends."""
