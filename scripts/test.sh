#!/usr/bin/env bash
# The project's one test command: installs what the tests need, then lints, type-checks and runs pytest.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}

# Python dependencies (the package itself, editable, with its test extras).
"$PY" -m pip install -q --disable-pip-version-check -e '.[test]'

# Servers the tests start on loopback, from Debian's packages: Redis (shared router state; its
# redis-cli builds the 3-master cluster and redis-sentinel watches the failover in
# tests/test_redis_cluster.py) and nginx (the load balancer in front of several routers in
# tests/test_chaos.py).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)  # tests/support/prometheus.py
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "scripts/test.sh: missing ${missing[*]}; install Debian's packages of that name" >&2
    exit 1
  fi
fi

# The Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager), helm and kubectl,
# built from the Go module proxy once and cached outside the repo.
if [ -x scripts/k8s-binaries.sh ] || [ -f scripts/k8s-binaries.sh ]; then
  bash scripts/k8s-binaries.sh >/dev/null
fi

"$PY" -m ruff check .
"$PY" -m mypy

"$PY" -m pytest "$@"
