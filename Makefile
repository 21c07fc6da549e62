# Every target installs what it needs into .venv first (pinned by .ci/constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= -q

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install $(PIP_FLAGS) -c .ci/constraints.txt -e ".[operator,trainer,client,dev]"
	touch $@

.PHONY: install quickstart test test-agent test-fast lint docs docs-gen crd e2e-build cluster cluster-env cluster-down

install: $(VENV)/.installed

## The embedded default: a real fine-tune on CPU, artifacts in runs/quickstart
quickstart: install
	$(VENV)/bin/kubetune run examples/quickstart.yaml

## Everything CI runs: lint, types, the docs site, unit + integration + e2e tests (e2e on the real kubelet
## node; the e2e binaries and images are built on first use and cached, see e2e/README.md). Two pytest-xdist
## workers: one runs the e2e tree (one group, one control plane, mostly waiting on pods), the other the modules
## under tests/ (a group each; the groups: tests/conftest.py); the e2e group goes first, being the longest
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(MAKE) docs
	$(VENV)/bin/pytest -n 2 --no-loadscope-reorder --durations=40 e2e tests

## The same with the e2e pods run by the fast node agent instead of the real kubelet
test-agent: install
	KUBETUNE_E2E_NODE=agent $(MAKE) test

## Fast subset for development (no multi-process training, no control plane)
test-fast: install
	$(VENV)/bin/pytest tests -m "not slow and not e2e"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(MAKE) docs

## The manual (docs/, mkdocs.yml) built into site/ with --strict: a broken link or anchor fails it, and so
## does a generated reference page (API from the CRD, CLI from the parser) that is older than the code
docs: install
	$(PY) docs/gen_reference.py --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

## Regenerate docs/reference/finetunejob.md and docs/reference/cli.md (after `make crd` or a CLI change)
docs-gen: install
	$(PY) docs/gen_reference.py

## Regenerate the CRD (and the chart's copy) from the API models
crd: install
	$(VENV)/bin/kubetune crd --output-file crds/kubetune.io_finetunejobs.yaml
	cp crds/kubetune.io_finetunejobs.yaml charts/kubetune/crds/

e2e-build:
	bash e2e/harness/build.sh

## A local cluster that stays up (docs/local-cluster.md): the e2e harness's real control plane and node, MinIO, a
## registry, and the operator installed by Helm from the images the Dockerfiles build. As root; prints the exports
cluster: install
	cd e2e && $(abspath $(PY)) -m harness.local_cluster up

## The exports of the running cluster again: eval "$$(make -s cluster-env)"
cluster-env:
	@cd e2e && $(abspath $(PY)) -m harness.local_cluster env

## Stop the local cluster and remove everything it made
cluster-down:
	cd e2e && $(abspath $(PY)) -m harness.local_cluster down
