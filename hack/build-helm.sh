#!/usr/bin/env bash
# Builds helm (helm.sh/helm/v3/cmd/helm at a pinned release) from the Go module proxy, once
# per machine, with the Kubernetes libraries pinned to the control plane's (k8s.io/* v0.34.4)
# so the Go build cache that hack/build-control-plane.sh filled is reused. Cached outside the
# work tree, keyed by the version and a hash of this script (the pins live here):
#   ${FTO_CACHE:-~/.cache/finetune-operator}/helm-<version>-<hash>/bin/helm
# Prints the bin folder on stdout. Never falls back to anything else: if Go or the module
# proxy is missing, it says so and fails.
set -euo pipefail

TOOL=build-helm
HELM_VERSION="${HELM_VERSION:-3.19.5}"
# Kubernetes library release the control plane is built from (its staging modules' v0.x twin).
K8S_LIBS="${K8S_LIBS:-0.34.4}"
CACHE="${FTO_CACHE:-$HOME/.cache/finetune-operator}"
hash="$( { cat "${BASH_SOURCE[0]}"; echo "$HELM_VERSION $K8S_LIBS"; } | sha256sum | cut -c1-12)"
KEY="helm-${HELM_VERSION}-${hash}"
OUT="$CACHE/$KEY/bin"
BINS=(helm)

# shellcheck source=lib/build-common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/build-common.sh"
exit_if_cached_else_lock
require_go helm helm.sh/helm/v3

SRC="$CACHE/$KEY/src"
mkdir -p "$SRC" "$OUT"
cd "$SRC"
if ! go mod download "helm.sh/helm/v3@v${HELM_VERSION}" >&2; then
  echo "build-helm: cannot download helm.sh/helm/v3@v${HELM_VERSION} from the module proxy ($proxy)" >&2
  exit 1
fi
# A scratch module: helm plus every k8s.io library helm requires, raised to the control
# plane's release (a v0.34.x patch: the same API, so helm builds against it unchanged).
hmod="$(go env GOMODCACHE)/cache/download/helm.sh/helm/v3/@v/v${HELM_VERSION}.mod"
{
  echo "module finetune.dev/localhelm"
  echo
  echo "go 1.24.0"
  echo
  echo "require ("
  echo "	helm.sh/helm/v3 v${HELM_VERSION}"
  grep -oE '^\s*k8s\.io/(api|apiextensions-apiserver|apimachinery|apiserver|cli-runtime|client-go|component-base|kubectl) v0\.[0-9]+\.[0-9]+' "$hmod" |
    awk -v v="v${K8S_LIBS}" '{print "\t" $1 " " v}'
  echo ")"
} > go.mod
cat > tools.go <<'GO'
//go:build tools

// Package tools pins the helm command this module builds.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
GO
go mod tidy >&2
minor="${K8S_LIBS#0.}"; minor="${minor%%.*}"
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=v${HELM_VERSION} -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in pkg/lint/rules pkg/chartutil; do
  ldflags="$ldflags -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$minor"
done
echo "build-helm: go build helm (v${HELM_VERSION}, k8s.io/* v${K8S_LIBS})" >&2
go build -trimpath -ldflags "$ldflags" -o "$OUT/helm.tmp" helm.sh/helm/v3/cmd/helm >&2
mv "$OUT/helm.tmp" "$OUT/helm"
have_all
echo "$OUT"
