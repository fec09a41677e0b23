#!/usr/bin/env bash
# Builds the JobSet controller manager (sigs.k8s.io/jobset, the module's main package, a release
# whose Kubernetes libraries are v0.34 like our control plane; the release Kueue v0.14.8 itself
# requires) from the Go module proxy, once per machine, and copies out of the module source
# what a cluster needs to install it without Go:
#   ${FTO_CACHE:-~/.cache/finetune-operator}/jobset-<version>-<hash>/
#       bin/jobset                the manager
#       crds/*.yaml               config/components/crd/bases of the release
#       webhook/manifests.yaml    config/components/webhook/manifests.yaml of the release, and
#       webhook/patches/*.yaml    its patches (the objectSelectors the release installs on the
#                                 pod webhooks), with webhook/kustomization.yaml naming them
#       VERSION                   the release, e.g. v0.10.1
# <hash> covers this script, so a change of build recipe is a new cache entry.
# Prints the bin folder on stdout, like the other build scripts (the manifests are beside it).
# k8s.io/* are required at the control plane's v0.34.4, so the Go build cache of
# hack/build-control-plane.sh is shared. Never falls back to anything else: if Go or the module
# proxy is missing, it says so and fails.
set -euo pipefail

TOOL=build-jobset
JOBSET_VERSION="${JOBSET_VERSION:-v0.10.1}"
K8S_LIBS="${K8S_LIBS:-v0.34.4}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FTO_CACHE:-$HOME/.cache/finetune-operator}"
hash="$(sha256sum "$ROOT/hack/build-jobset.sh" | cut -c1-12)"
KEY="jobset-${JOBSET_VERSION}-${hash}"
DEST="$CACHE/$KEY"
OUT="$DEST/bin"
BINS=(jobset)

# shellcheck source=lib/build-common.sh
. "$ROOT/hack/lib/build-common.sh"
# The manifests are copied after the binary is built: the binary alone is not enough.
have_all() {
  [ -x "$OUT/jobset" ] && [ -f "$DEST/webhook/kustomization.yaml" ] && [ -f "$DEST/VERSION" ]
}
exit_if_cached_else_lock
require_go "the JobSet controller manager" "sigs.k8s.io/jobset@${JOBSET_VERSION}"
log() { echo "build-jobset: $*" >&2; }

SRC="$DEST/src"
mkdir -p "$SRC" "$OUT"
cd "$SRC"
if ! go mod download "sigs.k8s.io/jobset@${JOBSET_VERSION}" >&2; then
  log "cannot download sigs.k8s.io/jobset@${JOBSET_VERSION} from the module proxy ($proxy)"
  exit 1
fi
MOD="$(go env GOMODCACHE)/sigs.k8s.io/jobset@${JOBSET_VERSION}"

# A scratch module requiring JobSet, with every k8s.io/* library JobSet requires at v0.34.x
# raised to the control plane's version (minimal version selection keeps the higher one).
{
  echo "module finetune.dev/localjobset"
  echo
  echo "go $(awk '$1 == "go" {print $2; exit}' "$MOD/go.mod")"
  echo
  echo "require ("
  echo "	sigs.k8s.io/jobset ${JOBSET_VERSION}"
  awk -v v="$K8S_LIBS" '$1 ~ /^k8s\.io\// && $2 ~ /^v0\.34\./ {print "\t" $1 " " v}' "$MOD/go.mod"
  echo ")"
} > go.mod
# go.sum of the release: the versions it pins are checked against the same hashes.
cp "$MOD/go.sum" go.sum
chmod u+w go.sum
cat > tools.go <<'GO'
//go:build tools

// Package tools pins the JobSet command this module builds.
package tools

import _ "sigs.k8s.io/jobset"
GO
go mod tidy >&2

log "go build jobset (${JOBSET_VERSION}, k8s.io/* ${K8S_LIBS})"
go build -trimpath -ldflags "-s -w" -o "$OUT/jobset.tmp" sigs.k8s.io/jobset >&2
mv "$OUT/jobset.tmp" "$OUT/jobset"

rm -rf "$DEST/crds" "$DEST/webhook"
mkdir -p "$DEST/crds" "$DEST/webhook/patches"
cp "$MOD"/config/components/crd/bases/*.yaml "$DEST/crds/"
cp "$MOD/config/components/webhook/manifests.yaml" "$MOD/config/components/webhook/kustomization.yaml" \
  "$DEST/webhook/"
cp "$MOD"/config/components/webhook/patches/*.yaml "$DEST/webhook/patches/"
chmod -R u+w "$DEST/crds" "$DEST/webhook"
echo "$JOBSET_VERSION" > "$DEST/VERSION"
have_all
echo "$OUT"
