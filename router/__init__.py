"""gpufleet.router: the KV-cache-aware OpenAI-compatible router and its policies."""
