# Sourced by the hack/build-*.sh Go builds: the cache check, the per-machine build lock, the
# Go checks and the scratch-module recipe they share (same module and build caches, same
# build flags). The sourcing script sets TOOL (its name, for messages), CACHE, KEY, OUT
# (the cached bin folder) and BINS (the binaries that must be in it) first.

# The repository and the cache, unless the sourcing script set them.
ROOT="${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
CACHE="${CACHE:-${FTO_CACHE:-$HOME/.cache/finetune-operator}}"

have_all() { for b in "${BINS[@]}"; do [ -x "$OUT/$b" ] || return 1; done; }

# Prints OUT and exits when every binary is cached. Otherwise takes the build lock (one build
# at a time per machine: make targets and test sessions may start it together) and looks
# again: whoever waited finds the binaries there.
exit_if_cached_else_lock() {
  if have_all; then echo "$OUT"; exit 0; fi
  mkdir -p "$CACHE"
  exec 9>"$CACHE/$KEY.lock"
  if command -v flock >/dev/null 2>&1; then flock 9; fi
  if have_all; then echo "$OUT"; exit 0; fi
}

# require_go WHAT FETCHES: fails, saying so, without the go command (needed "to build WHAT")
# or without a Go module proxy (needed "to fetch FETCHES"); sets GOFLAGS, CGO_ENABLED and proxy.
require_go() {
  if ! command -v go >/dev/null 2>&1; then
    echo "$TOOL: the 'go' command is missing; install Go >= 1.24 to build $1" >&2
    exit 1
  fi
  export GOFLAGS="${GOFLAGS:-} -mod=mod"
  export CGO_ENABLED=0
  proxy="$(go env GOPROXY)"
  if [ "$proxy" = "off" ] || [ -z "$proxy" ]; then
    echo "$TOOL: GOPROXY is '$proxy'; the Go module proxy is needed to fetch $2" >&2
    exit 1
  fi
}

# go_download MODULE VERSION: the module's source into the module cache (fails, saying so,
# when the proxy does not have it); sets MOD to its folder there.
go_download() {
  if ! go mod download "$1@$2" >&2; then
    echo "$TOOL: cannot download $1@$2 from the module proxy ($proxy)" >&2
    exit 1
  fi
  MOD="$(go env GOMODCACHE)/$1@$2"
}

# scratch_module NAME MODULE VERSION PACKAGE: in the current folder, a module
# finetune.dev/NAME that requires MODULE at VERSION (downloaded first: go_download, which sets
# MOD) and builds PACKAGE (tools.go imports it), with the release's go.sum (the versions it
# pins are checked against the same hashes) and every k8s.io/* library the release requires at
# the control plane's minor raised to K8S_LIBS when that is set (minimal version selection
# keeps the higher one, and the Go build cache of hack/build-control-plane.sh is shared);
# then go mod tidy.
scratch_module() {
  local name="$1" module="$2" version="$3" package="$4" libs="${K8S_LIBS:-}"
  go_download "$module" "$version"
  {
    echo "module finetune.dev/$name"
    echo
    echo "go $(awk '$1 == "go" {print $2; exit}' "$MOD/go.mod")"
    echo
    echo "require ("
    echo "	$module $version"
    if [ -n "$libs" ]; then
      awk -v v="$libs" -v minor="${libs%.*}." \
        '$1 ~ /^k8s\.io\// && index($2, minor) == 1 {print "\t" $1 " " v}' "$MOD/go.mod"
    fi
    echo ")"
  } > go.mod
  cp "$MOD/go.sum" go.sum
  chmod u+w go.sum
  cat > tools.go <<GO
//go:build tools

// Package tools pins the command this module builds.
package tools

import _ "$package"
GO
  go mod tidy >&2
}

# go_build_bin NAME PACKAGE LDFLAGS: go build -trimpath of PACKAGE into \$OUT/NAME (through a
# temporary name, so an interrupted build leaves no binary behind).
go_build_bin() {
  echo "$TOOL: go build $1 ($2)" >&2
  go build -trimpath -ldflags "$3" -o "$OUT/$1.tmp" "$2" >&2
  mv "$OUT/$1.tmp" "$OUT/$1"
}

# copy_release_manifests: what a cluster needs to install a controller release without Go,
# from its module source (MOD) into DEST: crds/ (config/components/crd/bases), webhook/
# (config/components/webhook's manifests.yaml and kustomization.yaml, and its patches/ when
# the release has them), VERSION (the first argument).
copy_release_manifests() {
  local webhook="$MOD/config/components/webhook"
  rm -rf "$DEST/crds" "$DEST/webhook"
  mkdir -p "$DEST/crds" "$DEST/webhook"
  cp "$MOD"/config/components/crd/bases/*.yaml "$DEST/crds/"
  cp "$webhook/manifests.yaml" "$webhook/kustomization.yaml" "$DEST/webhook/"
  if [ -d "$webhook/patches" ]; then
    mkdir -p "$DEST/webhook/patches"
    cp "$webhook"/patches/*.yaml "$DEST/webhook/patches/"
  fi
  chmod -R u+w "$DEST/crds" "$DEST/webhook"
  echo "$1" > "$DEST/VERSION"
}

# release_start NAME VERSION MODULE WHAT: the start of hack/build-NAME.sh, a controller release
# (Kueue, JobSet) built against the control plane's Kubernetes libraries (K8S_LIBS, v0.34.4
# unless set): TOOL, release_cache, exit_if_cached_else_lock, require_go (to build WHAT,
# fetching MODULE@VERSION), then into SRC (DEST/src) for scratch_module.
release_start() {
  TOOL="build-$1"
  K8S_LIBS="${K8S_LIBS:-v0.34.4}"
  release_cache "$1" "$2"
  exit_if_cached_else_lock
  require_go "$4" "$3@$2"
  SRC="$DEST/src"
  mkdir -p "$SRC" "$OUT"
  cd "$SRC"
}

# release_cache NAME VERSION: the cache entry of a controller release built by hack/build-NAME.sh
# (Kueue, JobSet): KEY NAME-VERSION-<hash of that script and this file: the recipe>, DEST, OUT
# (DEST/bin) and BINS (NAME); have_all also wants the manifests copy_release_manifests writes
# after the build (the binary alone is not enough).
release_cache() {
  local hash
  hash="$(cat "$ROOT/hack/build-$1.sh" "$ROOT/hack/lib/build-common.sh" | sha256sum | cut -c1-12)"
  KEY="$1-$2-$hash"
  DEST="$CACHE/$KEY"
  OUT="$DEST/bin"
  BINS=("$1")
  have_all() { [ -x "$OUT/${BINS[0]}" ] && [ -f "$DEST/webhook/kustomization.yaml" ] && [ -f "$DEST/VERSION" ]; }
}
