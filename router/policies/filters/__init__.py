"""Filters: narrow the replicas a request may go to (one module per plugin)."""
