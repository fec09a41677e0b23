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
# <hash> covers this script and hack/lib/build-common.sh, so a change of build recipe is a new
# cache entry.
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
hash="$(cat "$ROOT/hack/build-jobset.sh" "$ROOT/hack/lib/build-common.sh" | sha256sum | cut -c1-12)"
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

SRC="$DEST/src"
mkdir -p "$SRC" "$OUT"
cd "$SRC"
# A scratch module requiring JobSet, k8s.io/* at K8S_LIBS (hack/lib/build-common.sh).
scratch_module localjobset sigs.k8s.io/jobset "$JOBSET_VERSION" sigs.k8s.io/jobset
go_build_bin jobset sigs.k8s.io/jobset "-s -w"
copy_release_manifests "$JOBSET_VERSION"
have_all
echo "$OUT"
