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

JOBSET_VERSION="${JOBSET_VERSION:-v0.10.1}"
# shellcheck source=lib/build-common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/build-common.sh"
release_start jobset "$JOBSET_VERSION" sigs.k8s.io/jobset "the JobSet controller manager"

# A scratch module requiring JobSet, k8s.io/* at K8S_LIBS (hack/lib/build-common.sh).
scratch_module localjobset sigs.k8s.io/jobset "$JOBSET_VERSION" sigs.k8s.io/jobset
go_build_bin jobset sigs.k8s.io/jobset "-s -w"
copy_release_manifests "$JOBSET_VERSION"
have_all
echo "$OUT"
