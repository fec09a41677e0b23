#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kubectl (k8s.io/kubernetes at a pinned
# release) and etcd (go.etcd.io/etcd/server/v3) from the Go module proxy, once per machine.
# The binaries are cached outside the work tree, keyed by version:
#   ${FTO_CACHE:-~/.cache/finetune-operator}/k8s-<version>/bin/{kube-apiserver,kube-controller-manager,kubectl,etcd}
# Prints the bin folder on stdout. Never falls back to anything else: if Go or the module
# proxy is missing, it says so and fails.
set -euo pipefail

TOOL=build-control-plane
K8S_VERSION="${K8S_VERSION:-1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-3.6.5}"
CACHE="${FTO_CACHE:-$HOME/.cache/finetune-operator}"
KEY="k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}"
OUT="$CACHE/$KEY/bin"
BINS=(kube-apiserver kube-controller-manager kubectl etcd)

# shellcheck source=lib/build-common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/build-common.sh"
exit_if_cached_else_lock
require_go "the local control plane" k8s.io/kubernetes

SRC="$CACHE/$KEY/src"
mkdir -p "$SRC/k8s" "$SRC/etcd" "$OUT"
log() { echo "build-control-plane: $*" >&2; }

# --- Kubernetes: a scratch module requiring k8s.io/kubernetes, staging modules replaced by
# their published v0.x twins (the repo's own go.mod points them at ./staging, which a
# dependency cannot use).
staging_minor="0.${K8S_VERSION#1.}"
(
  cd "$SRC/k8s"
  if ! go mod download "k8s.io/kubernetes@v${K8S_VERSION}" >&2; then
    echo "build-control-plane: cannot download k8s.io/kubernetes@v${K8S_VERSION} from the module proxy ($proxy)" >&2
    exit 1
  fi
  kmod="$(go env GOMODCACHE)/k8s.io/kubernetes@v${K8S_VERSION}/go.mod"
  {
    echo "module finetune.dev/localcluster"
    echo
    echo "go 1.24.0"
    echo
    echo "require k8s.io/kubernetes v${K8S_VERSION}"
    echo
    echo "replace ("
    grep -E '^\s*k8s.io/[a-z0-9-]+ => \./staging/' "$kmod" | awk -v v="v${staging_minor}" '{print "\t" $1 " => " $1 " " v}'
    echo ")"
  } > go.mod
  cat > tools.go <<'GO'
//go:build tools

// Package tools pins the Kubernetes commands this module builds.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  go mod tidy >&2
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v${K8S_VERSION} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${K8S_VERSION#1.} -X k8s.io/client-go/pkg/version.gitVersion=v${K8S_VERSION}"
  for cmd in kube-apiserver kube-controller-manager kubectl; do
    [ -x "$OUT/$cmd" ] && continue
    log "go build $cmd (v${K8S_VERSION})"
    go build -trimpath -ldflags "$ldflags" -o "$OUT/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" >&2
    mv "$OUT/$cmd.tmp" "$OUT/$cmd"
  done
)

# --- etcd: its server module's etcdmain, in a module of its own (its gRPC and OpenTelemetry
# versions differ from Kubernetes').
(
  cd "$SRC/etcd"
  [ -x "$OUT/etcd" ] && exit 0
  cat > go.mod <<MOD
module finetune.dev/localetcd

go 1.24.0

require go.etcd.io/etcd/server/v3 v${ETCD_VERSION}
MOD
  cat > main.go <<'GO'
// Command etcd runs the etcd server (go.etcd.io/etcd/server/v3/etcdmain).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  go mod tidy >&2
  log "go build etcd (v${ETCD_VERSION})"
  go build -trimpath -ldflags "-s -w" -o "$OUT/etcd.tmp" . >&2
  mv "$OUT/etcd.tmp" "$OUT/etcd"
)

have_all
echo "$OUT"
