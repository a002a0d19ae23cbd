# Flotilla — every target has a `## help` line; `make help` lists them.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

.PHONY: setup
setup: ## install Debian packages and the Python venv with the driver (idempotent)
	scripts/setup.sh

.PHONY: setup-test
setup-test: ## setup, plus the test tools (csi-sanity built with go install)
	scripts/setup.sh --test

.PHONY: demo
demo: setup ## run the standalone driver on its embedded default pool and walk a volume through its life
	$(VENV)/bin/flotillactl demo

.PHONY: proto
proto: ## regenerate csi/_proto from proto/csi.proto
	$(PY) setup.py -q generate_proto

.PHONY: lint
lint: ## ruff on csi/ and tests/
	$(VENV)/bin/ruff check csi tests

.PHONY: typecheck
typecheck: ## mypy --strict on csi/ (generated stubs excluded)
	$(VENV)/bin/mypy

# the generated CSI stubs (gitignored): made again when missing or older than the proto
STUBS := csi/_proto/csi_pb2.py
$(STUBS): proto/csi.proto
	$(PY) setup.py -q generate_proto

.PHONY: check
check: $(STUBS) ## lint, types and tests/unit in under a minute (for contributors: no root, no network, nothing beyond .venv)
	@$(MAKE) --no-print-directory lint typecheck
	$(PYTEST) tests/unit

# the test tiers one by one (make test runs them all, after setup-test); each needs what
# `make setup-test` installs, and all but unit need root
.PHONY: unit
unit: ## tests/unit: no root needed
	$(PYTEST) tests/unit

.PHONY: integration
integration: ## tests/integration: real loop devices, filesystems and mounts (root)
	$(PYTEST) tests/integration

.PHONY: sanity
sanity: ## tests/sanity: the official csi-sanity against flotilla --mode all (root)
	$(PYTEST) tests/sanity

.PHONY: reliability
reliability: ## tests/reliability: kill -9 at every crash point, races, storms, hostile input, full pool, restarts (root)
	$(PYTEST) tests/reliability

.PHONY: backup
backup: ## tests/backup: backups to a directory and to the S3 test server on 127.0.0.1, through two drivers (root)
	$(PYTEST) tests/backup

.PHONY: vm
vm: ## tests/vm: lvmthin and nfs in a Debian kernel under qemu (root; assets of scripts/vm-setup.sh)
	$(PYTEST) tests/vm

.PHONY: e2e
e2e: ## tests/e2e: a control plane as processes, the chart installed with helm (root; scripts/e2e-tools.sh)
	$(PYTEST) tests/e2e

.PHONY: cluster
cluster: ## tests/cluster: the chart's pods on a real kubelet + containerd (root; test-cluster also runs setup-test)
	$(PYTEST) tests/cluster

.PHONY: test-hostile
test-hostile: setup ## hostile input at length: 10,000 property-based examples per test, 1,000 undecodable bodies per RPC (root; ~30 min)
	FLOTILLA_HOSTILE_EXAMPLES=10000 FLOTILLA_HOSTILE_UNDECODABLE=1000 $(PYTEST) -s \
		--timeout 10800 tests/reliability/test_hostile.py tests/reliability/test_hostile_node.py

.PHONY: cluster-up
cluster-up: setup-test ## a real single-node cluster (kubelet + containerd) with the chart installed; prints KUBECONFIG
	$(PY) -m tests.cluster.rig up

.PHONY: cluster-down
cluster-down: ## stop the cluster of cluster-up by PID and remove its mounts, loops, links, cgroups
	$(PY) -m tests.cluster.rig down

.PHONY: test-cluster
test-cluster: setup-test ## tests/cluster: user flows on the real node (uses a running cluster-up cluster, else its own)
	$(PYTEST) tests/cluster

.PHONY: test
test: setup-test lint typecheck ## everything CI runs: lint, types and every test tier
	$(PYTEST) tests

.PHONY: bench
bench: setup ## side-by-side benchmarks against csi-driver-host-path (not part of CI)
	bench/run.sh
