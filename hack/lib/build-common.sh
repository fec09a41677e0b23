# Sourced by hack/build-control-plane.sh and hack/build-gotools.sh: the cache check, the
# per-machine build lock and the Go checks they share (same module and build caches, same
# build flags). The sourcing script sets TOOL (its name, for messages), CACHE, KEY, OUT
# (the cached bin folder) and BINS (the binaries that must be in it) first.

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
