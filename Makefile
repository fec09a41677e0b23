# finetune-operator: every entry point a developer or CI needs.
#   make demo   - local control plane + operator + a real training, end to end
#   make test   - every tier (lint, unit, integration, e2e); installs what it needs
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV        ?= .venv
PY          := $(VENV)/bin/python
PYTEST      := $(PY) -m pytest
CLUSTER_DIR := .cluster
KUBECTL     := $(CLUSTER_DIR)/bin/kubectl
export KUBECONFIG ?= $(CURDIR)/$(CLUSTER_DIR)/kubeconfig
export PYTHONUNBUFFERED := 1
# The venv's tools (uv, finetune-train, finetune-operator) come first for every recipe and test.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: help setup deps-debian prereqs control-plane gotools kueue jobset helm kustomize helm-files images lint crds test test-unit test-lowest test-integration test-e2e test-chaos \
        bench demo cluster-up cluster-down clean

help:
	@echo "make demo | test | setup | images | lint | crds | helm | helm-files | bench | cluster-up | cluster-down"

## setup: Python packages into .venv (uv), from pyproject.toml and uv.lock
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml $(wildcard uv.lock)
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q uv
	$$(command -v uv || echo python3 -m uv) sync --python 3.11 --extra operator --extra trainer-cpu --extra cli --group dev
	@touch $@

## deps-debian: Debian's packages the tests use, when running as root: promtool and prometheus
## (monitoring rules), podman, runc and debootstrap (the images and the container pod runner),
## chromium (the evaluation report, headless), tmux (the plugin's live view in a real terminal)
DEBIAN_PKGS := prometheus:promtool podman:podman runc:runc debootstrap:debootstrap chromium:chromium tmux:tmux
deps-debian:
	@missing=""; for pc in $(DEBIAN_PKGS); do command -v "$${pc#*:}" >/dev/null 2>&1 || missing="$$missing $${pc%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    (apt-get install -y -q --no-install-recommends $$missing >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null)); \
	  else echo "deps-debian: install Debian's packages:$$missing" >&2; exit 1; fi; \
	fi

## control-plane: build (once per machine, cached) kube-apiserver, kube-controller-manager, kubectl, etcd
control-plane:
	hack/build-control-plane.sh >/dev/null

## kueue: build (once per release, cached) Kueue's controller manager (sigs.k8s.io/kueue) and copy
## its CRDs and webhook manifests beside it; hack/cluster.py runs it unless FTO_KUEUE=0
kueue:
	hack/build-kueue.sh >/dev/null

## jobset: build (once per release, cached) the JobSet controller manager (sigs.k8s.io/jobset) and copy
## its CRDs and webhook manifests beside it; hack/cluster.py runs it unless FTO_JOBSET=0
jobset:
	hack/build-jobset.sh >/dev/null

## gotools: build (once per source version, cached) gitops-status: real kstatus + Argo CD's Lua runtime
gotools:
	hack/build-gotools.sh >/dev/null

## helm: build (once per version, cached) helm from helm.sh/helm/v3, k8s.io/* pinned to the control plane's
helm:
	hack/build-helm.sh >/dev/null

## kustomize: build (once per version, cached) the standalone kustomize v5.7.1, the release `kubectl
## kustomize` of Kubernetes v1.34 embeds: the unit tier renders deploy/ with it (no control plane needed)
kustomize:
	hack/build-kustomize.sh >/dev/null

## helm-files: refresh the chart's copies of deploy/'s files it renders from (the ClusterRoles' rules, the
## alerts, the dashboard); tests/unit/helm fails while a copy differs from its source
HELM_CHART := deploy/helm/finetune-operator
helm-files:
	cp deploy/base/rbac.yaml deploy/base/peering.yaml deploy/components/monitoring/dashboard.json \
	  deploy/components/monitoring/prometheusrule.yaml $(HELM_CHART)/files/

## images: localhost/finetune-operator:dev and localhost/finetune-trainer:dev from the Dockerfile,
## with podman as root, on a Debian bookworm base made with debootstrap (hack/build-images.sh;
## cold about 6 minutes, seconds once built). IMAGES_IF_CONTAINERS: what cluster-up and demo
## need, nothing when the pod runner runs processes (FTO_PODS=process).
images: deps-debian
	hack/build-images.sh
IMAGES_IF_CONTAINERS := $(if $(filter process,$(FTO_PODS)),,images)

lint: setup
	$(VENV)/bin/ruff check contract operator trainer tests hack
	$(VENV)/bin/mypy contract/finetune_contract operator/finetune_operator trainer/finetune_trainer hack/finetune_testbed

## crds: the FineTuneJob CRD from operator/finetune_operator/api.py, into crds/ and the Helm chart's crds/
crds: setup
	$(PY) -m finetune_operator.crd --output crds/finetune.dev_finetunejobs.yaml
	cp crds/finetune.dev_finetunejobs.yaml $(HELM_CHART)/crds/finetune.dev_finetunejobs.yaml

test-unit: setup kustomize gotools helm
	$(PYTEST) -q tests/unit

## test-lowest: unit tests with every direct dependency at its lower bound (uv --resolution
## lowest-direct: core + operator + trainer-cpu extras + test group, into .venv-lowest).
## All of the operator side; of the trainer, the in-process tests (model, data, train), which
## call every Keras/TensorFlow API the trainer uses. The CLI and signal tests run the same
## training in subprocesses, 2.5 more minutes on two cores for no more API surface: set
## LOWEST_TRAINER_TESTS=tests/unit/trainer to run them too.
LOWEST_VENV          := .venv-lowest
LOWEST_TRAINER_TESTS ?= tests/unit/trainer/test_model.py tests/unit/trainer/test_data.py \
                        tests/unit/trainer/test_train.py
LOWEST_TESTS         := tests/unit/lowest tests/unit/operator tests/unit/operator_progress \
                        tests/unit/trainer_report tests/unit/monitoring $(LOWEST_TRAINER_TESTS)
test-lowest: setup deps-debian
	uv venv --quiet --allow-existing --python 3.11 $(LOWEST_VENV)
	uv pip compile --quiet --no-header --resolution lowest-direct --python $(LOWEST_VENV)/bin/python \
	  pyproject.toml --extra operator --extra trainer-cpu --group pyproject.toml:test \
	  -o $(LOWEST_VENV)/requirements.txt
	uv pip sync --quiet --python $(LOWEST_VENV)/bin/python $(LOWEST_VENV)/requirements.txt
	uv pip install --quiet --python $(LOWEST_VENV)/bin/python --no-deps -e .
	FTO_LOWEST_DIRECT=1 $(LOWEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(LOWEST_TESTS)

test-integration: setup control-plane gotools kueue jobset helm images
	$(PYTEST) -q tests/integration

test-e2e: setup control-plane kueue jobset deps-debian images
	$(PYTEST) -q tests/e2e

## test-chaos: tests/chaos, hostile input and killed trainers on the local control plane; each test has a
## pytest timeout, the whole tier 20 minutes at most (SIGINT first, so the operators it started are stopped)
test-chaos: setup control-plane kueue jobset
	timeout --signal=INT --kill-after=60 1200 $(PYTEST) -q tests/chaos

## prereqs: every cached build before the tiers, overlapped where it pays on a cold machine: the
## images (mostly downloads and debootstrap's I/O) build in the background while the Go builds
## (CPU) run one after another (the control plane first: the others reuse its compiled
## k8s.io packages from the Go build cache). Seconds when everything is cached.
prereqs: setup deps-debian
	@mkdir -p build; hack/build-images.sh >build/images.log 2>&1 & images=$$!; status=0; \
	$(MAKE) --no-print-directory control-plane kueue jobset helm gotools kustomize || status=$$?; \
	if ! wait $$images; then echo "make prereqs: hack/build-images.sh failed:" >&2; tail -n 40 build/images.log >&2; status=1; fi; \
	exit $$status

test: setup deps-debian prereqs control-plane lint test-unit test-lowest test-integration test-chaos test-e2e

bench: setup control-plane
	$(PY) hack/bench.py $(BENCH_ARGS)

cluster-up: setup control-plane kueue jobset $(IMAGES_IF_CONTAINERS)
	$(PY) hack/cluster.py up

cluster-down:
	@if [ -x $(PY) ]; then $(PY) hack/cluster.py down; fi

demo: setup control-plane kueue jobset $(IMAGES_IF_CONTAINERS)
	$(PY) hack/demo.py

clean: cluster-down
	rm -rf $(CLUSTER_DIR) build dist
