"""Pickers: choose one replica from a profile's weighted costs (one module per plugin)."""
