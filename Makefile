# Beam's two commands: `make dev` runs Beam locally, `make test` runs every gate and test.
# Both create .venv and install the project (pinned dependencies) on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: dev test check lint format typecheck contracts unit integration k8s e2e \
        controlplane bench soak clean proto

$(STAMP): pyproject.toml hatch_build.py $(wildcard proto/beam/*/v1/*.proto) \
          clients/python/pyproject.toml clients/python/hatch_build.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet -e ./clients/python  # beam_client, for tests/client
	touch $(STAMP)

## Run Beam with embedded Redis and PostgreSQL (REST :8080, gRPC :9090).
dev: $(STAMP)
	$(BIN)/beam dev

## Every gate, then the whole suite (unit, integration, Kubernetes, end-to-end).
test: check
	$(BIN)/pytest -q -ra --basetemp=$(CURDIR)/.pytest-tmp

## Static gates only.
check: lint typecheck contracts

lint: $(STAMP)
	$(BIN)/ruff check service operator tests bench hatch_build.py clients/python
	$(BIN)/ruff format --check service operator tests bench hatch_build.py clients/python

format: $(STAMP)
	$(BIN)/ruff check --fix service operator tests bench hatch_build.py clients/python
	$(BIN)/ruff format service operator tests bench hatch_build.py clients/python

typecheck: $(STAMP)
	$(BIN)/mypy service/beam service/beam_dev operator/beam_operator
	cd clients/python && ../../$(BIN)/mypy src/beam_client  # strict (its pyproject)

contracts: $(STAMP)
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

k8s: $(STAMP)
	$(BIN)/pytest -q tests/k8s

e2e: $(STAMP)
	$(BIN)/pytest -q tests/e2e

## The chart end to end on a one-node cluster that runs real pods (root; hack/cluster/README.md):
## builds what is missing (node binaries, images from Debian packages; cached), helm install,
## the scenario of tests/e2e/test_cluster.py, helm uninstall, then checks the host is unchanged.
.PHONY: e2e-cluster
e2e-cluster: $(STAMP)
	bash hack/cluster/e2e.sh

## Build (or reuse from the cache) kube-apiserver, kube-controller-manager, kubectl, etcd, helm.
controlplane:
	bash hack/controlplane/build.sh

## Regenerate the protobuf modules (the editable installs' build hooks compile proto/).
proto: $(STAMP)
	$(BIN)/pip install --quiet --no-deps -e . -e ./clients/python

## The hot-path benchmark (bench/README.md, 7 to 8 minutes): builds ghz and hey once from the Go
## module proxy (hack/bench/build.sh, cached), then measures every call against Beam and an
## empty handler side by side, and a stream through the Python client's guard against the same
## stream unguarded (issue 16); writes bench/results/<date>-<host>.{md,json}.
## BENCH_ARGS passes options, e.g. BENCH_ARGS="--seconds 5 --calls check,deduct".
BENCH_ARGS ?=
bench: $(STAMP)
	bash hack/bench/build.sh >/dev/null
	$(BIN)/python bench/run.py $(BENCH_ARGS)

## The money simulator's soak: SOAK_SEEDS seeded, fault-injecting schedules, SOAK_JOBS worker
## processes each with its own Redis and PostgreSQL (tests/sim; docs/PERFORMANCE.md has the
## last count and duration). Replay a failing seed: .venv/bin/python -m tests.sim --seed N
SOAK_SEEDS ?= 10000
SOAK_START ?= 0
SOAK_JOBS ?= 2
soak: $(STAMP)
	$(BIN)/python -m tests.sim --seeds $(SOAK_SEEDS) --start $(SOAK_START) --jobs $(SOAK_JOBS)

clean:
	rm -rf $(VENV) .beam .mypy_cache .ruff_cache .pytest_cache service/beam/balance service/beam/admin \
	       clients/python/src/beam_client/_generated
