#!/usr/bin/env bash
# Build the images the test cluster runs, with buildah (no registry is reachable, so nothing is
# pulled), and export each to a docker-archive for `ctr images import`:
#   node-base  Debian bookworm (debootstrap, minbase) with python3/pip/venv, redis-server and
#              redis-cli: the Redis pod's image and the base of the kubellm image (it stands in for
#              python:3.11-slim: bookworm's python3 is 3.11);
#   node-addons node-base plus /usr/local/bin/{coredns,metrics-server,pause} from
#              scripts/k8s-node-addons.sh: CoreDNS, metrics-server and the pod sandbox image;
#   kubellm    the checkout's Dockerfile with PYTHON_IMAGE=node-base, keyed by a hash of the files
#              the Dockerfile copies, so an edited checkout gets a new image.
#
#   eval "$(scripts/k8s-images.sh)"   # KUBELLM_IMAGE_{BASE,ADDONS,KUBELLM}[_ARCHIVE]
#
# stdout carries only `export` lines; progress goes to stderr. Everything is cached under
# ${KUBELLM_CACHE_ROOT:-~/.cache/kubellm}/images (buildah's own storage is there too; the host's
# container storage is not touched). Needs root, buildah and debootstrap (scripts/test.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

CACHE_ROOT="${KUBELLM_CACHE_ROOT:-${HOME}/.cache/kubellm}"
IMG_CACHE="${CACHE_ROOT}/images"
STORE="${IMG_CACHE}/buildah"
SUITE=bookworm
MIRROR="${KUBELLM_DEBIAN_MIRROR:-}"
BASE_PACKAGES="python3,python3-pip,python3-venv,ca-certificates,redis-server,redis-tools"

log() { printf '[k8s-images] %s\n' "$*" >&2; }
key() { sha256sum | cut -c1-12; }

if [[ -z "${MIRROR}" ]]; then # the Debian mirror apt already uses
  MIRROR="$(awk '/^URIs:/ && $2 ~ /debian\/?$/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
  [[ -n "${MIRROR}" ]] || MIRROR="$(awk '$1 == "deb" && $3 == "'"${SUITE}"'" { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)"
  [[ -n "${MIRROR}" ]] || { log "no Debian mirror found in apt's sources; set KUBELLM_DEBIAN_MIRROR"; exit 1; }
fi

eval "$(bash scripts/k8s-node-addons.sh)"

BASE_KEY="$(printf '%s\n' "${SUITE}" "${BASE_PACKAGES}" base-v1 | key)"
ADDONS_KEY="$(cat "${KUBELLM_COREDNS_BIN}" "${KUBELLM_METRICS_SERVER_BIN}" "${KUBELLM_PAUSE_BIN}" |
  { cat; echo "${BASE_KEY}"; } | key)"
# The kubellm image depends on what the Dockerfile copies, the Dockerfile and its base.
KUBELLM_KEY="$({
  echo "${BASE_KEY}"
  git -C "${REPO}" ls-files -s -- Dockerfile pyproject.toml README.md kubellm router operator 2>/dev/null ||
    find Dockerfile pyproject.toml README.md kubellm/ router/ operator/ -type f -print0 | sort -z | xargs -0 sha256sum
  # uncommitted edits count too
  git -C "${REPO}" diff HEAD -- Dockerfile pyproject.toml README.md kubellm router operator 2>/dev/null || true
} | key)"

IMAGE_BASE="localhost/kubellm/node-base:${BASE_KEY}"
IMAGE_ADDONS="localhost/kubellm/node-addons:${ADDONS_KEY}"
IMAGE_KUBELLM="localhost/kubellm/kubellm:${KUBELLM_KEY}"
archive() { printf '%s/%s.tar' "${IMG_CACHE}" "$(basename "${1%%:*}")-${1##*:}"; }

print_exports() {
  local n
  for n in BASE ADDONS KUBELLM; do
    local v="IMAGE_${n}"
    printf 'export KUBELLM_IMAGE_%s=%q\n' "${n}" "${!v}"
    printf 'export KUBELLM_IMAGE_%s_ARCHIVE=%q\n' "${n}" "$(archive "${!v}")"
  done
}

all_present() { [[ -f "$(archive "${IMAGE_BASE}")" && -f "$(archive "${IMAGE_ADDONS}")" && -f "$(archive "${IMAGE_KUBELLM}")" ]]; }
if all_present; then
  print_exports
  exit 0
fi
mkdir -p "${IMG_CACHE}"
exec 9>"${IMG_CACHE}/.lock"
flock 9
if all_present; then
  print_exports
  exit 0
fi

for tool in buildah debootstrap; do
  command -v "${tool}" >/dev/null || { log "${tool} is missing (apt-get install ${tool})"; exit 1; }
done
DRIVER="${KUBELLM_BUILDAH_DRIVER:-overlay}"
BUILDAH=(buildah --root "${STORE}/root-${DRIVER}" --runroot "${STORE}/run-${DRIVER}" --storage-driver "${DRIVER}")

have_image() { "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1; }
export_image() { # export_image IMAGE: writes its docker-archive atomically
  local out
  out="$(archive "$1")"
  rm -f "${out}.tmp"
  "${BUILDAH[@]}" push --quiet "$1" "docker-archive:${out}.tmp:$1" >&2
  mv "${out}.tmp" "${out}"
}
timed() { # timed LABEL CMD...: runs CMD and logs its wall time
  local label="$1" t0
  shift
  t0=$(date +%s)
  "$@"
  log "${label}: $(($(date +%s) - t0))s"
}

build_base() {
  local rootfs="${IMG_CACHE}/rootfs.tmp.$$"
  rm -rf "${rootfs}"
  log "debootstrap ${SUITE} (minbase + ${BASE_PACKAGES}) from ${MIRROR}"
  debootstrap --variant=minbase --include="${BASE_PACKAGES}" "${SUITE}" "${rootfs}" "${MIRROR}" >"${IMG_CACHE}/debootstrap.log" 2>&1 ||
    { tail -20 "${IMG_CACHE}/debootstrap.log" >&2; exit 1; }
  # What python:3.11-slim offers the Dockerfile: `python`/`pip` on PATH and pip installs allowed
  # (PEP 668's marker is Debian's, not the image's concern here).
  ln -sf /usr/bin/python3 "${rootfs}/usr/local/bin/python"
  [[ -e "${rootfs}/usr/bin/pip" ]] || ln -sf /usr/bin/pip3 "${rootfs}/usr/local/bin/pip"
  rm -f "${rootfs}"/usr/lib/python3*/EXTERNALLY-MANAGED
  rm -rf "${rootfs}"/var/cache/apt/archives/*.deb "${rootfs}"/var/lib/apt/lists/* "${rootfs}/usr/share/doc" \
    "${rootfs}/usr/share/man" "${rootfs}/usr/share/locale"
  local ctr mnt
  ctr="$("${BUILDAH[@]}" from scratch)"
  mnt="$("${BUILDAH[@]}" mount "${ctr}")"
  tar -C "${rootfs}" -cf - . | tar -C "${mnt}" -xpf -
  "${BUILDAH[@]}" umount "${ctr}" >/dev/null
  "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd /bin/bash "${ctr}"
  "${BUILDAH[@]}" commit --quiet --rm "${ctr}" "${IMAGE_BASE}" >/dev/null
  rm -rf "${rootfs}"
}

build_addons() {
  local ctr
  ctr="$("${BUILDAH[@]}" from --pull-never "${IMAGE_BASE}")"
  "${BUILDAH[@]}" copy --chmod 0755 "${ctr}" "${KUBELLM_COREDNS_BIN}" "${KUBELLM_METRICS_SERVER_BIN}" \
    "${KUBELLM_PAUSE_BIN}" /usr/local/bin/ >/dev/null
  "${BUILDAH[@]}" config --cmd /usr/local/bin/pause "${ctr}"
  "${BUILDAH[@]}" commit --quiet --rm "${ctr}" "${IMAGE_ADDONS}" >/dev/null
}

build_kubellm() {
  # pip inside the build reaches PyPI; it trusts the same CAs as this machine (an egress proxy's
  # CA may be among them), so the host's bundle is mounted over the image's for the RUN steps.
  local ca=/etc/ssl/certs/ca-certificates.crt vols=()
  [[ -f "${ca}" ]] && vols=(-v "${ca}:${ca}:ro")
  "${BUILDAH[@]}" bud --quiet --format docker --isolation chroot --pull-never --layers=false "${vols[@]}" \
    --build-arg "PYTHON_IMAGE=${IMAGE_BASE}" -t "${IMAGE_KUBELLM}" -f Dockerfile "${REPO}" >&2
}

have_image "${IMAGE_BASE}" || timed "node-base image" build_base
[[ -f "$(archive "${IMAGE_BASE}")" ]] || timed "node-base archive" export_image "${IMAGE_BASE}"
have_image "${IMAGE_ADDONS}" || timed "node-addons image" build_addons
[[ -f "$(archive "${IMAGE_ADDONS}")" ]] || timed "node-addons archive" export_image "${IMAGE_ADDONS}"
have_image "${IMAGE_KUBELLM}" || timed "kubellm image" build_kubellm
[[ -f "$(archive "${IMAGE_KUBELLM}")" ]] || timed "kubellm archive" export_image "${IMAGE_KUBELLM}"
all_present
print_exports
