"""The routing simulator: the router's own policies in front of kvmodel replicas, on virtual time.

Workloads come from `gpufleet.router.workloads` (the library `gpufleet demo` uses too).

Modules
    trace      Mooncake-format trace replay (hash ids -> fixed text blocks)
    fleet      the simulated fleet of one deployment, read from a compiled Plan
    policies   the baselines the shipped policies are compared with: consistent hash, a model of
               SGLang's cache_aware, and the oracle
    engine     the discrete-event simulator
    metrics    per-policy results and the issue's goals
    report     rich table, JSON and matplotlib output
    capacity   replicas a deployment needs for a TTFT target, per policy
"""
