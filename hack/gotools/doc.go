// Package gotools pins the Go tools the finetune-operator tests run: see cmd/gitops-status.
//
// Build them with hack/build-gotools.sh, which caches the binaries in
// ~/.cache/finetune-operator/ keyed by a hash of this module's sources.
package gotools
