#!/usr/bin/env bash
# Builds the standalone kustomize (sigs.k8s.io/kustomize/kustomize/v5 at the release kubectl
# v1.34's `kubectl kustomize` embeds: v5.7.1, kustomize/api v0.20.1) from the Go module proxy,
# once per machine: what the unit tier renders deploy/ with, without building the Kubernetes
# control plane. Cached outside the work tree, keyed by the version and a hash of this script
# and hack/lib/build-common.sh (the recipe):
#   ${FTO_CACHE:-~/.cache/finetune-operator}/kustomize-<version>-<hash>/bin/kustomize
# Prints the bin folder on stdout. Never falls back to anything else: if Go or the module
# proxy is missing, it says so and fails.
set -euo pipefail

TOOL=build-kustomize
KUSTOMIZE_VERSION="${KUSTOMIZE_VERSION:-v5.7.1}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FTO_CACHE:-$HOME/.cache/finetune-operator}"
hash="$( { cat "$ROOT/hack/build-kustomize.sh" "$ROOT/hack/lib/build-common.sh"; echo "$KUSTOMIZE_VERSION"; } |
  sha256sum | cut -c1-12)"
KEY="kustomize-${KUSTOMIZE_VERSION}-${hash}"
DEST="$CACHE/$KEY"
OUT="$DEST/bin"
BINS=(kustomize)

# shellcheck source=lib/build-common.sh
. "$ROOT/hack/lib/build-common.sh"
exit_if_cached_else_lock
require_go kustomize "sigs.k8s.io/kustomize/kustomize/v5@${KUSTOMIZE_VERSION}"

SRC="$DEST/src"
mkdir -p "$SRC" "$OUT"
cd "$SRC"
# No K8S_LIBS: kustomize requires no k8s.io/* library but kube-openapi (pinned by its release).
scratch_module localkustomize sigs.k8s.io/kustomize/kustomize/v5 "$KUSTOMIZE_VERSION" \
  sigs.k8s.io/kustomize/kustomize/v5
go_build_bin kustomize sigs.k8s.io/kustomize/kustomize/v5 \
  "-s -w -X sigs.k8s.io/kustomize/api/provenance.version=${KUSTOMIZE_VERSION}"
have_all
echo "$OUT"
