# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: install demo test test-fast lint typecheck bench preview clean lock images image-rootfs

# The locked versions (images/locks/dev.txt) are constraints: tests run what the images ship.
$(STAMP): pyproject.toml setup.py images/locks/dev.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c images/locks/dev.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gpufleet demo

test: lint typecheck
	$(PY) -m pytest

# Lint and format check (ruff); `make test` runs it and `typecheck` first.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# Every benchmark prints a table; the peer routers are compared when installed (docs/router.md).
bench: $(STAMP)
	$(PY) bench/plan_scale.py
	$(PY) bench/replica_sim.py
	$(PY) bench/router_overhead.py
	$(PY) bench/controller_sim.py
	$(PY) bench/autoscale_sim.py
	$(PY) bench/routing.py
	$(PY) bench/soak.py

preview: $(STAMP)
	$(VENV)/bin/gpufleet preview stacks/multicloud

# mypy --strict on every package but the skills (data): the router, infra (core and edges: CLI,
# local runtime, Pulumi, controller) and the provider adapters.
TYPED := -p gpufleet.router -p gpufleet.infra -p gpufleet.provider_adapters
typecheck: $(STAMP)
	@mkdir -p build/mypy/gpufleet
	@for d in infra router provider_adapters; do ln -sfn ../../../$$d build/mypy/gpufleet/$$d; done
	cd build/mypy && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml $(TYPED)

# Re-pin every Python dependency (images/locks/*.txt) after changing pyproject.toml.
lock: $(STAMP)
	$(PY) images/lock.py

# The router and controller images with docker or podman (REGISTRY=..., PUSH=1): images/README.md.
images:
	bash images/build.sh

# The same images without a container runtime: Debian packages (mmdebstrap) + umoci, as root.
image-rootfs: $(STAMP)
	PYTHON=$(PY) bash images/rootfs.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
