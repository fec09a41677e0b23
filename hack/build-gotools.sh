#!/usr/bin/env bash
# Builds the Go tools the tests run (hack/gotools: gitops-status, which classifies objects
# with the real kstatus library, sigs.k8s.io/cli-utils, and runs Argo CD health Lua in
# gopher-lua as Argo CD does) from the Go module proxy, once per machine and source version.
# The binaries are cached outside the work tree, keyed by the module's versions and a hash
# of its sources:
#   ${FTO_CACHE:-~/.cache/finetune-operator}/gotools-<cli-utils>-<gopher-lua>-<hash>/bin/gitops-status
# Prints the bin folder on stdout. It shares the Go module and build caches (and the build
# flags) with hack/build-control-plane.sh, so the Kubernetes libraries compile only once.
# Never falls back to anything else: if Go or the module proxy is missing, it says so and fails.
set -euo pipefail

TOOL=build-gotools
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/hack/gotools"
CACHE="${FTO_CACHE:-$HOME/.cache/finetune-operator}"
BINS=(gitops-status)

version_of() { awk -v m="$1" '$1 == m {print $2; exit}' "$SRC/go.mod"; }
hash="$(cd "$SRC" && find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 | LC_ALL=C sort -z |
  xargs -0 sha256sum | sha256sum | cut -c1-12)"
KEY="gotools-cli-utils-$(version_of sigs.k8s.io/cli-utils)-gopher-lua-$(version_of github.com/yuin/gopher-lua)-$hash"
OUT="$CACHE/$KEY/bin"

# shellcheck source=lib/build-common.sh
. "$ROOT/hack/lib/build-common.sh"
exit_if_cached_else_lock
require_go hack/gotools sigs.k8s.io/cli-utils

mkdir -p "$OUT"
cd "$SRC"
for b in "${BINS[@]}"; do
  echo "build-gotools: go build $b ($KEY)" >&2
  go build -trimpath -ldflags "-s -w" -o "$OUT/$b.tmp" "./cmd/$b" >&2
  mv "$OUT/$b.tmp" "$OUT/$b"
done
have_all
echo "$OUT"
