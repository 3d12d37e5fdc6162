"""One workload library for the demo, the simulator and the benchmarks.

Modules
    types       the request forms: `WorkRequest` (a body to send), `SimRequest` (what the router
                sees at an arrival time), `Workload` (a named list of them)
    sampling    seeded draws: Zipf popularity, weighted choice, Poisson arrivals, filler text
    generators  the simulator's workloads: shared_prompts, rag, multiturn, mix, demo
    mixed       the demo's traffic as HTTP bodies (`WorkloadSpec`, `generate`, `demo_spec`)
    ceiling     the infinite-cache hit ratio, the ceiling of every policy
    driver      the HTTP drive of `WorkRequest`s against an OpenAI-compatible endpoint
    stats       the one percentile, and summaries of HTTP results
"""

__all__: list[str] = []
