#!/usr/bin/env bash
# Builds Kueue's controller manager (sigs.k8s.io/kueue/cmd/kueue, a release whose Kubernetes
# libraries are v0.34 like our control plane) from the Go module proxy, once per machine, and
# copies out of the module source what a cluster needs to install it without Go:
#   ${FTO_CACHE:-~/.cache/finetune-operator}/kueue-<version>-<hash>/
#       bin/kueue                 the manager
#       crds/*.yaml               config/components/crd/bases of the release
#       webhook/manifests.yaml    config/components/webhook/manifests.yaml of the release, and
#       webhook/kustomization.yaml  its patches (the namespaceSelectors the release installs)
#       VERSION                   the release, e.g. v0.14.8
# <hash> covers this script and hack/lib/build-common.sh, so a change of build recipe is a new
# cache entry.
# Prints the bin folder on stdout, like the other build scripts (the manifests are beside it). k8s.io/* are required at the control plane's
# v0.34.4, so the Go build cache of hack/build-control-plane.sh is shared. Never falls back
# to anything else: if Go or the module proxy is missing, it says so and fails.
set -euo pipefail

KUEUE_VERSION="${KUEUE_VERSION:-v0.14.8}"
# shellcheck source=lib/build-common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/build-common.sh"
release_start kueue "$KUEUE_VERSION" sigs.k8s.io/kueue "Kueue's controller manager"

# A scratch module requiring Kueue, k8s.io/* at K8S_LIBS (hack/lib/build-common.sh).
scratch_module localkueue sigs.k8s.io/kueue "$KUEUE_VERSION" sigs.k8s.io/kueue/cmd/kueue
version_pkg=sigs.k8s.io/kueue/pkg/version
go_build_bin kueue sigs.k8s.io/kueue/cmd/kueue \
  "-s -w -X ${version_pkg}.GitVersion=${KUEUE_VERSION} -X ${version_pkg}.GitCommit=module-proxy"
copy_release_manifests "$KUEUE_VERSION"
have_all
echo "$OUT"
