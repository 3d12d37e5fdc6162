"""Scorers: cost each candidate replica in estimated prefill tokens, lower is better (one module per plugin)."""
