#!/usr/bin/env bash
# Builds the two images of the Dockerfile with podman (as root), tagged
#   ${OPERATOR_IMAGE:-localhost/finetune-operator:dev}  (--target operator)
#   ${TRAINER_IMAGE:-localhost/finetune-trainer:dev}    (--target trainer)
# `make images` runs it. No image registry is needed: with FTO_IMAGE_BASES=local (the default)
# both bases are one Debian bookworm made here with debootstrap (minbase + Python 3.11, pip,
# venv, CA certificates, tzdata), imported into podman under a tag that is a hash of what made
# it, so it is made once per machine; the trainer then installs the lock's tensorflow-cpu
# (TRAINER_EXTRA=trainer-cpu). FTO_IMAGE_BASES=public builds exactly what a release builds:
# the Dockerfile's default bases (pulled) and the GPU TensorFlow of TensorFlow's image.
# Python packages come from PyPI (or the index in UV_DEFAULT_INDEX / UV_INDEX_URL /
# PIP_INDEX_URL, passed on when set) over the host's network; uv's downloads are kept in a
# build cache mount and every step in podman's layer cache, so a second run takes seconds.
# podman's settings: hack/containers/containers.conf (CONTAINERS_CONF), which the container
# pod runner uses too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$ROOT/hack/containers/containers.conf}"
OPERATOR_IMAGE="${OPERATOR_IMAGE:-localhost/finetune-operator:dev}"
TRAINER_IMAGE="${TRAINER_IMAGE:-localhost/finetune-trainer:dev}"
BASES="${FTO_IMAGE_BASES:-local}"
SUITE=bookworm
MIRROR="${FTO_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# What python:3.11-slim-bookworm gives a Dockerfile, from Debian: Python 3.11 with pip and
# venv (ensurepip), `python`, TLS roots, /etc/services and /etc/protocols, time zones.
BASE_PACKAGES=python3,python3-pip,python3-venv,python-is-python3,ca-certificates,netbase,tzdata
CACHE="${FTO_CACHE:-$HOME/.cache/finetune-operator}"

log() { echo "build-images: $*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "podman builds and runs these images as root here; run as root"
for tool in podman runc; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' is missing: make deps-debian installs it"
done
podman info >/dev/null 2>&1 || die "podman does not work here: $(podman info 2>&1 | tail -n 3)"
driver="$(podman info --format '{{.Store.GraphDriverName}}')"

# One build at a time per machine (make targets and test sessions may start it together).
mkdir -p "$CACHE"
exec 9>"$CACHE/images.lock"
flock 9

# The host's extra CA certificates (an egress proxy's, say): the local base trusts what the
# host trusts, so pip and uv reach the index in the build as they do outside it.
extra_cas=()
for crt in /usr/local/share/ca-certificates/*.crt; do
  [ -f "$crt" ] && extra_cas+=("$crt")
done

# make_base DIR: the local base's root filesystem in DIR.
make_base() {
  local dir="$1"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$dir" "$MIRROR" >&2
  if [ "${#extra_cas[@]}" -gt 0 ]; then
    cp "${extra_cas[@]}" "$dir/usr/local/share/ca-certificates/"
    chroot "$dir" update-ca-certificates >&2
  fi
  # What a slim image leaves out: package lists and archives, documentation, translations.
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc/* \
    "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/var/log/*.log
  find "$dir/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
}

# The base's tag is a hash of everything that makes it: this recipe, the suite, the mirror,
# the packages and the extra certificates' contents.
base_tag() {
  {
    declare -f make_base
    echo "$SUITE $MIRROR $BASE_PACKAGES"
    for crt in "${extra_cas[@]}"; do sha256sum "$crt"; done
  } | sha256sum | cut -c1-16
}

build_args=(--network host --layers -f "$ROOT/Dockerfile")
# The host's package index, when it names one (uv's deprecated UV_INDEX_URL too).
uv_index="${UV_DEFAULT_INDEX:-${UV_INDEX_URL:-}}"
if [ -n "$uv_index" ]; then build_args+=(--build-arg "UV_DEFAULT_INDEX=$uv_index"); fi
if [ -n "${PIP_INDEX_URL:-}" ]; then build_args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL"); fi
log "package index: ${uv_index:-PyPI} (uv), ${PIP_INDEX_URL:-PyPI} (pip)"

case "$BASES" in
  local)
    command -v debootstrap >/dev/null 2>&1 || die "'debootstrap' is missing: make deps-debian installs it"
    base="localhost/finetune-base:$SUITE-$(base_tag)"
    if podman image exists "$base"; then
      log "base $base (cached)"
    else
      log "making $base with debootstrap from $MIRROR (once per machine)"
      work="$(mktemp -d /var/tmp/finetune-base.XXXXXX)"
      trap 'rm -rf "$work"' EXIT
      make_base "$work/rootfs"
      # SSL_CERT_FILE: uv reads its roots from there (its own built-in ones otherwise).
      tar -C "$work/rootfs" --numeric-owner -c . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["python3"]' \
        --message "debootstrap $SUITE minbase + $BASE_PACKAGES" - "$base" >/dev/null
      rm -rf "$work"
      trap - EXIT
    fi
    build_args+=(--build-arg "PYTHON_BASE=${base%:*}" --build-arg "PYTHON_BASE_TAG=${base##*:}"
                 --build-arg "TRAINER_BASE=${base%:*}" --build-arg "TRAINER_BASE_TAG=${base##*:}"
                 --build-arg TRAINER_EXTRA=trainer-cpu)
    ;;
  public) ;;
  *) die "FTO_IMAGE_BASES is '$BASES'; it is 'local' (a debootstrap base, tensorflow-cpu) or 'public' (the Dockerfile's bases)" ;;
esac

log "storage driver: $driver; runtime: $(podman info --format '{{.Host.OCIRuntime.Name}}')"
for target in operator trainer; do
  if [ "$target" = operator ]; then tag="$OPERATOR_IMAGE"; else tag="$TRAINER_IMAGE"; fi
  start=$SECONDS
  podman build "${build_args[@]}" --target "$target" -t "$tag" "$ROOT" >&2
  log "$tag built in $((SECONDS - start))s"
done
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$OPERATOR_IMAGE" >&2
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$TRAINER_IMAGE" >&2
