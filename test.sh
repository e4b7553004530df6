#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh machine, then runs the whole suite.
#   ./test.sh [dotnet test options, e.g. --filter FullyQualifiedName~Core]
# Needs the .NET 10 SDK and root (or sudo) for the network namespace of the --kubernetes test. Installs when missing:
# Debian's redis-server (the Redis cluster tests start a real one, with TLS too), iproute2,
# docker-compose (`config` checks the compose file offline), node/npm and deploy/k8s's npm packages (the offline
# Kubernetes schema check). kubectl >= 1.21 must be on PATH for the kustomize tests (Debian's kubernetes-client
# is 1.20, whose kustomize lacks components): get it from pkgs.k8s.io where it is missing.
set -euo pipefail
cd "$(dirname "$0")"

as_root=()
[ "$(id -u)" -ne 0 ] && as_root=(sudo)
export DEBIAN_FRONTEND=noninteractive
apt_install() {
  "${as_root[@]}" apt-get install -y -q "$@" >/dev/null ||
    { "${as_root[@]}" apt-get update -q >/dev/null && "${as_root[@]}" apt-get install -y -q "$@" >/dev/null; }
}
need() {   # need COMMAND PACKAGE...
  command -v "$1" >/dev/null && return
  echo "test.sh: installing $*" >&2
  apt_install "${@:2}" || { echo "test.sh: could not install ${*:2} (needed for $1)" >&2; exit 1; }
}

need redis-server redis-server
# The --kubernetes test runs a silo in a network namespace of its own (root): ip and ss.
need ip iproute2
need ss iproute2
need docker-compose docker-compose
need npm nodejs npm
# The run page is loaded in headless Chromium (tests/Backprop.Tests/EndToEnd/WebPageTests.cs).
need chromium chromium
# Reinstalled when the lock file changed since the last install.
if [ ! -f deploy/k8s/node_modules/.package-lock.json ] || [ deploy/k8s/package-lock.json -nt deploy/k8s/node_modules/.package-lock.json ]; then
  echo "test.sh: npm ci in deploy/k8s" >&2
  npm ci --prefix deploy/k8s --no-audit --no-fund --loglevel=error
fi
command -v kubectl >/dev/null || echo "test.sh: warning: kubectl not found: the Kubernetes manifest tests will fail (needs kubectl >= 1.21)" >&2

exec dotnet test Backprop.Distributed.sln "$@"
