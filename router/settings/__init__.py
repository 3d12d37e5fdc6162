"""The router settings' sub-models, grouped by concern; import them from `gpufleet.router.config`.

That module's docstring lists which model lives in which module here. Nothing here imports more
than pydantic, so a fleet declaration validates without the router's extras.
"""
