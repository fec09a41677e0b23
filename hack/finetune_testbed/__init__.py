"""The local test bed as a package: `finetune_testbed`.

What `make test`, `make demo` and `make bench` run the operator against, importable by the
tests (pytest puts hack/ on sys.path) and by the scripts beside this folder (a script's own
folder is on sys.path when it runs), never loaded by file path:

- `cluster`: the local control plane (`hack/cluster.py up|down|status` is its entry point):
  etcd, kube-apiserver, kube-controller-manager, the pod runner, Kueue and JobSet on loopback.
- `operator_proc`: `finetune-operator` started outside a cluster as its ServiceAccount.
- `demo`: `make demo` (`hack/demo.py`).
- `net`, `polling`, `kubeconfigs`, `tools`: what the tools and the tests' fixtures share
  (free loopback ports, polls with a timeout, ServiceAccount kubeconfigs, the cached Go tools
  that hack/build-*.sh build).
- `imagesets`: tiny generated class-per-folder image sets and specs (the trainer's tests, `make bench`).

The scripts that stay files of their own: hack/localcluster_exec.py (run by path with
`python -I`, as root, in a new mount namespace: the standard library only) and the hack/bench*.py
sections.
"""
