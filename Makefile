# Every target installs what it needs into .venv first (pinned by .ci/constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= -q

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install $(PIP_FLAGS) -c .ci/constraints.txt -e ".[operator,trainer,client,dev]"
	touch $@

.PHONY: install quickstart test test-agent test-fast lint crd e2e-build

install: $(VENV)/.installed

## The embedded default: a real fine-tune on CPU, artifacts in runs/quickstart
quickstart: install
	$(VENV)/bin/kubetune run examples/quickstart.yaml

## Everything CI runs: lint, types, unit + integration + e2e tests (e2e on the real kubelet node; the
## e2e binaries and images are built on first use and cached, see e2e/README.md)
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest tests e2e

## The same with the e2e pods run by the fast node agent instead of the real kubelet
test-agent: install
	KUBETUNE_E2E_NODE=agent $(MAKE) test

## Fast subset for development (no multi-process training, no control plane)
test-fast: install
	$(VENV)/bin/pytest tests -m "not slow and not e2e"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

## Regenerate the CRD (and the chart's copy) from the API models
crd: install
	$(VENV)/bin/kubetune crd -o crds/kubetune.io_finetunejobs.yaml
	cp crds/kubetune.io_finetunejobs.yaml charts/kubetune/crds/

e2e-build:
	bash e2e/harness/build.sh
